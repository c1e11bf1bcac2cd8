from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..backends import BackendUnavailable
from ..deps import BackendDep, SettingsDep
from ..repository import readiness
from ..schemas import Readiness, errors

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers; checks no dependency."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "not ready, and why"},
                       **errors(422)})
def readyz(backend: BackendDep, settings: SettingsDep, model: str | None = None) -> JSONResponse:
    """Readiness: the model repository has `model` (or any model), the queue is reachable and
    a worker serves it (every worker serves every model)."""
    ok, reason = readiness(settings.model_dir, model)
    if ok:
        ok, reason = backend.ready()
    return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, backend: BackendDep) -> Response:
    """Prometheus metrics."""
    m = request.app.state.metrics
    try:
        m.queue_depth.set(backend.queue_depth())
    except BackendUnavailable:
        m.queue_depth.set(float("nan"))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
