"""Where certification runs: in-process (embedded default) or on RQ workers through Redis.
One interface, two implementations; the routes never know which."""

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry, Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from worker.jobs import JobSpec, ModelCache, outcome, run_job, samples_used
from worker.main import METRICS_KEY, QUEUE, cancel_key, certify_job, count_failure, count_success

from .settings import Settings

TERMINAL = ("finished", "failed", "canceled")
WAIT_CHUNK_S = 1.0  # one blocking Redis read lasts at most this (under the socket timeout)


class QueueFull(Exception):
    """More queued jobs than the configured cap."""


class BackendUnavailable(Exception):
    """The queue (Redis) cannot be reached. job_id / status_url: the job a request had already
    created (set by the route), so the client can still find it."""

    job_id: str | None = None
    status_url: str | None = None


@dataclass
class JobView:
    id: str
    status: str  # queued | started | finished | failed | canceled
    model_id: str
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    error_status: int | None = None  # a failed job's HTTP status (jobs.failure); None: 500
    created: float = field(default_factory=time.time)


class Backend(Protocol):
    def submit(self, spec: JobSpec) -> str: ...
    def get(self, job_id: str) -> JobView | None: ...
    def wait(self, job_id: str, deadline: float) -> JobView | None:
        """Block until the job ends or time.monotonic() reaches `deadline`; then get()."""
    def cancel(self, job_id: str) -> bool: ...
    def ready(self) -> tuple[bool, str]:
        """Whether jobs can run: the queue is reachable and a worker serves it (every worker
        serves every model of the repository)."""
    def queue_depth(self) -> int: ...
    def job_counts(self) -> dict[str, int]:
        """Jobs submitted, and ended by final state (finished, failed, canceled), counted when
        they end whoever polls; "samples": noise samples in finished results."""
    def close(self) -> None: ...


def finished_view(view: JobView, result: dict) -> JobView:
    """A job's returned dict says whether it finished, failed on bad input, or was canceled."""
    view.result = result if "results" in result else None
    view.error, view.error_status = result.get("error"), result.get("error_status")
    view.status = outcome(result)
    return view


class EmbeddedBackend:
    """Runs jobs in a thread pool of this process; jobs live in memory."""

    def __init__(self, settings: Settings, threads: int = 1):
        self.settings = settings
        self.models = ModelCache(settings.model_dir, settings.batch_size, settings.device)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="certify")
        self.jobs: dict[str, JobView] = {}
        self.ended: dict[str, threading.Event] = {}
        self.canceled: set[str] = set()
        self.lock = threading.RLock()  # job state changes: a cancel never races a start
        self.counts: Counter[str] = Counter()

    def submit(self, spec: JobSpec) -> str:
        if self.queue_depth() >= self.settings.max_queue:
            raise QueueFull
        view = JobView(uuid.uuid4().hex, "queued", spec.model_id, total=len(spec.images))
        ended = threading.Event()
        with self.lock:
            self._forget_expired()
            self.jobs[view.id] = view
            self.ended[view.id] = ended
            self.counts["submitted"] += 1
        self.pool.submit(self._run, view, spec, ended)
        return view.id

    def _run(self, view: JobView, spec: JobSpec, ended: threading.Event) -> None:
        try:
            self._execute(view, spec)
        finally:
            self._end(view)

    def _end(self, view: JobView) -> None:
        """Count the job's final state, once, and wake its waiters."""
        with self.lock:
            if self.ended[view.id].is_set():
                return
            self.counts[view.status] += 1
            self.counts["samples"] += samples_used(view.result or {})
            self.ended[view.id].set()

    def _execute(self, view: JobView, spec: JobSpec) -> None:
        with self.lock:
            if view.id in self.canceled:
                view.status = "canceled"
                return
            view.status = "started"

        def progress(done: int, total: int) -> None:
            view.done, view.total = done, total

        try:
            finished_view(view, run_job(spec, self.models, progress,
                                        lambda: view.id in self.canceled))
        except Exception as e:  # a bug: report it on the job rather than lose the job
            view.status, view.error = "failed", f"internal error: {type(e).__name__}"
            raise

    def _forget_expired(self) -> None:
        """Results are kept result_ttl_s, as on Redis; then the job is forgotten."""
        horizon = time.time() - self.settings.result_ttl_s
        for job_id in [k for k, v in self.jobs.items()
                       if v.status in ("finished", "failed", "canceled") and v.created < horizon]:
            del self.jobs[job_id]
            del self.ended[job_id]
            self.canceled.discard(job_id)

    def get(self, job_id: str) -> JobView | None:
        return self.jobs.get(job_id)

    def wait(self, job_id: str, deadline: float) -> JobView | None:
        ended = self.ended.get(job_id)
        if ended is not None:
            ended.wait(max(0.0, deadline - time.monotonic()))
        return self.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """A queued job is canceled at once; a running one stops at its next chunk of samples."""
        view = self.jobs.get(job_id)
        if view is None:
            return False
        with self.lock:
            self.canceled.add(job_id)
            if view.status == "queued":
                view.status = "canceled"
                self._end(view)
        return True

    def ready(self) -> tuple[bool, str]:
        return True, "embedded"

    def queue_depth(self) -> int:
        return sum(v.status == "queued" for v in list(self.jobs.values()))

    def job_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RQBackend:
    """Enqueues JSON jobs on one Redis queue for every model (worker.main.QUEUE); RQ workers
    run them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)

    def _queue(self) -> Queue:
        # TimerDeathPenalty: registry cleanups here run failure callbacks in request threads,
        # where RQ's default (SIGALRM) cannot be used
        return Queue(QUEUE, connection=self.redis, serializer=JSONSerializer,
                     death_penalty_class=TimerDeathPenalty)

    def submit(self, spec: JobSpec) -> str:
        """The job id is chosen before enqueueing, so a 503 can still name the job when Redis
        may have taken it (not when it failed before the job was sent)."""
        job_id, sent = uuid.uuid4().hex, False
        try:
            with _redis_errors():
                queue = self._queue()
                if queue.count >= self.settings.max_queue:
                    raise QueueFull
                sent = True
                queue.enqueue_call(
                    certify_job, args=(spec.model_dump(),), job_id=job_id,
                    timeout=self.settings.job_timeout_s, result_ttl=self.settings.result_ttl_s,
                    failure_ttl=self.settings.result_ttl_s,
                    retry=Retry(max=self.settings.job_retries) if self.settings.job_retries
                    else None,
                    on_success=Callback(count_success), on_failure=Callback(count_failure),
                    meta={"model_id": spec.model_id, "done": 0, "total": len(spec.images)},
                    description=f"certify {len(spec.images)} image(s) with {spec.model_id}")
                self.redis.hincrby(METRICS_KEY, "submitted")
        except BackendUnavailable as e:
            e.job_id = job_id if sent else None
            raise
        return job_id

    def get(self, job_id: str) -> JobView | None:
        with _redis_errors():
            try:
                job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
            except NoSuchJobError:
                return None
            status = job.get_status()
            if status == JobStatus.STARTED:  # reap it if its worker died (heartbeats stopped)
                StartedJobRegistry(queue=self._queue()).cleanup()
                status = job.get_status()
            view = JobView(job.id, "queued", job.meta.get("model_id", ""),
                           job.meta.get("done", 0), job.meta.get("total", 0))
            if status == JobStatus.FINISHED:
                return finished_view(view, job.return_value() or {})
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                result = job.latest_result()
                view.status = "failed"
                view.error = _last_line(result.exc_string if result else None)
            elif status == JobStatus.CANCELED:
                view.status = "canceled"
            elif status == JobStatus.STARTED:
                view.status = "started"
            return view

    def wait(self, job_id: str, deadline: float) -> JobView | None:
        """Blocks on the job's RQ result stream (a worker appends to it when a run ends), so the
        answer leaves as soon as it exists; reads past the last entry seen, so an earlier
        failed attempt that is being retried does not wake it again."""
        key = Result.get_key(job_id)
        with _redis_errors():
            entries = self.redis.xrevrange(key, count=1)
        last = entries[0][0] if entries else "0-0"
        while True:
            view = self.get(job_id)
            left = deadline - time.monotonic()
            if view is None or view.status in TERMINAL or left <= 0:
                return view
            block_ms = max(1, int(1000 * min(left, WAIT_CHUNK_S)))
            with _redis_errors():
                got = self.redis.xread({key: last}, block=block_ms)
            if got:
                last = got[0][1][-1][0]

    def cancel(self, job_id: str) -> bool:
        with _redis_errors():
            try:
                job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
            except NoSuchJobError:
                return False
            self.redis.set(cancel_key(job_id), 1, ex=self.settings.result_ttl_s)
            if job.get_status() in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
                try:
                    job.cancel()
                except InvalidJobOperation:  # it started meanwhile: it sees the cancel key
                    return True
                with self.redis.pipeline() as p:  # kept like a result; RQ keeps it for ever
                    p.expire(job.key, self.settings.result_ttl_s)
                    p.zrem(CanceledJobRegistry(queue=self._queue()).key, job.id)
                    p.hincrby(METRICS_KEY, "canceled")
                    p.execute()
            return True

    def ready(self) -> tuple[bool, str]:
        try:
            self.redis.ping()
            workers = Worker.all(connection=self.redis)
        except RedisError as e:
            return False, f"redis unreachable: {type(e).__name__}"
        serving = [w for w in workers if QUEUE in w.queue_names()]
        if not serving:
            return False, "no worker"
        return True, f"{len(serving)} worker(s)"

    def queue_depth(self) -> int:
        with _redis_errors():
            return self._queue().count

    def job_counts(self) -> dict[str, int]:
        with _redis_errors():
            return {k.decode(): int(v) for k, v in self.redis.hgetall(METRICS_KEY).items()}

    def close(self) -> None:
        self.redis.close()


@contextmanager
def _redis_errors() -> Iterator[None]:
    """Turn any Redis failure into BackendUnavailable (answered as 503)."""
    try:
        yield
    except (RedisError, OSError) as e:
        raise BackendUnavailable(f"queue unavailable: {type(e).__name__}") from None


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def make_backend(settings: Settings) -> Backend:
    return RQBackend(settings) if settings.redis_url else EmbeddedBackend(settings)
