"""Prometheus metrics (one registry per app) and a pure ASGI middleware that records requests."""

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .backends import BackendUnavailable

log = logging.getLogger("splitz.api")
JOB_STATES = ("submitted", "finished", "failed", "canceled")


class Metrics:
    def __init__(self, job_counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("splitz_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("splitz_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue_depth = Gauge("splitz_queue_depth", "Jobs waiting in the queue",
                                 registry=self.registry)
        self.registry.register(JobCounts(job_counts))


class JobCounts:
    """splitz_jobs_total{status} and splitz_samples_total, read from the backend at each scrape:
    jobs are counted where they end (the worker, or the in-process pool), whoever polls them,
    and across API replicas. Absent while the backend is unreachable."""

    def __init__(self, job_counts: Callable[[], dict[str, int]]):
        self.job_counts = job_counts

    def describe(self) -> Iterator[CounterMetricFamily]:
        return self._families({})

    def collect(self) -> Iterator[CounterMetricFamily]:
        try:
            counts = self.job_counts()
        except BackendUnavailable:
            return iter(())
        return self._families(counts)

    @staticmethod
    def _families(counts: dict[str, int]) -> Iterator[CounterMetricFamily]:
        jobs = CounterMetricFamily("splitz_jobs", "Jobs submitted, then by final state",
                                   labels=["status"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield CounterMetricFamily("splitz_samples", "Noise samples in finished jobs' results",
                                  value=counts.get("samples", 0))


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
