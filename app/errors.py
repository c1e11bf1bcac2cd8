"""Every error a client can cause, mapped once to an HTTP status with a JSON body."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from splitz.errors import (
    HTTP_STATUS,
    CheckpointError,
    http_status,
)

from .backends import BackendUnavailable, QueueFull
from .repository import RepositoryUnavailable


def error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message} | extra, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    handlers = {kind: lambda e: error(http_status(e), str(e)) for kind, _ in HTTP_STATUS} | {
        CheckpointError: lambda e: error(500, f"model repository problem: {e}"),
        QueueFull: lambda e: error(429, "queue is full, retry later", {"Retry-After": "30"}),
        BackendUnavailable: _unavailable,
        RepositoryUnavailable: lambda e: error(503, str(e), {"Retry-After": "30"}),
        HTTPException: lambda e: error(e.status_code, str(e.detail), getattr(e, "headers", None)),
        RequestValidationError: lambda e: error(422, _validation_message(e)),
    }
    for kind, make in handlers.items():
        app.add_exception_handler(kind, _handler(make))


def _unavailable(e: BackendUnavailable) -> JSONResponse:
    """503; when the job was already created, its id and URL (it may still run)."""
    known = {"job_id": e.job_id, "status_url": e.status_url} if e.job_id else {}
    return error(503, str(e), {"Retry-After": "5"}, **known)


def _handler(make):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return make(exc)

    return handle


def _validation_message(e: RequestValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
