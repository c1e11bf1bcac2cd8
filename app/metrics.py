"""Prometheus metrics (one registry per app) and a pure ASGI middleware that records requests."""

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("splitz.api")
SEEN_CAP = 100_000


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("splitz_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("splitz_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue_depth = Gauge("splitz_queue_depth", "Jobs waiting in the queue",
                                 registry=self.registry)
        self.jobs = Counter("splitz_jobs_total", "Jobs by status (submitted, then final)",
                            ["status"], registry=self.registry)
        self.samples = Counter("splitz_samples_total", "Noise samples in delivered results",
                               registry=self.registry)
        self._seen: dict[str, None] = {}  # job ids already counted (insertion-ordered, capped)

    def job_done(self, job_id: str, status: str, results: list[dict] | None) -> None:
        """Count a job's final status and its samples once, when the API first sees it."""
        if job_id in self._seen:
            return
        self._seen[job_id] = None
        if len(self._seen) > SEEN_CAP:
            del self._seen[next(iter(self._seen))]
        self.jobs.labels(status).inc()
        # a certificate used n0 + n samples; an early-stopped radius answer n0 + samples
        self.samples.inc(sum(r["n0"] + (r["samples"] if "samples" in r else r["n"])
                             for r in results or []))


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            log.info("%s %s %s %.3fs", scope["method"], scope["path"], status, elapsed)
