from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..backends import BackendUnavailable
from ..deps import BackendDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """Liveness: the process answers; checks no dependency."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(backend: BackendDep, model: str | None = None) -> JSONResponse:
    """Readiness: the queue is reachable and a worker serves `model` (or any model)."""
    ok, reason = backend.ready(model)
    return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)


@router.get("/metrics")
def metrics(request: Request, backend: BackendDep) -> Response:
    m = request.app.state.metrics
    try:
        m.queue_depth.set(backend.queue_depth())
    except BackendUnavailable:
        m.queue_depth.set(float("nan"))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
