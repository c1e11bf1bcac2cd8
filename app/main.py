"""Builds the FastAPI app: settings, backend and metrics live in the lifespan state."""

import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from . import errors, repository
from .backends import make_backend
from .limits import BodySizeLimit
from .metrics import Metrics, RequestMetrics
from .routes import certify, health, models
from .settings import Settings

log = logging.getLogger("splitz.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics(lambda: app.state.backend.job_counts())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if removed := repository.remove_stale(settings.model_dir):
            log.info("removed what a crash left in the model repository: %s", ", ".join(removed))
        app.state.backend = make_backend(settings)
        # threads blocked waiting for results of synchronous requests: one per queued job
        app.state.waiters = anyio.CapacityLimiter(settings.max_queue)
        yield
        app.state.backend.close()

    app = FastAPI(title="splitz", version="0.1.0", lifespan=lifespan,
                  description="Certified l2 robustness with SPLITZ. Open when no API keys are "
                              "configured; otherwise send X-API-Key. Adding, replacing and "
                              "deleting models needs an admin key.")
    app.state.settings, app.state.metrics = settings, metrics
    errors.install(app)
    for router in (certify.router, models.router, health.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       upload_max_bytes=settings.max_model_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    log.setLevel(logging.INFO)
    return app
