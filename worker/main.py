"""The RQ worker process: boot (load and warm every model), then work. Non-forking, so a CUDA
context survives between jobs; run one process per GPU and scale with more processes.

One queue for every model (QUEUE): a job names its model and version, and the worker loads a
model it does not hold when a job first needs it (jobs.ModelCache). So a model uploaded or
replaced after boot is served without a restart, and the queued jobs of a deleted model are
still taken, and fail saying so, instead of waiting on a queue no worker reads.

Redis outages: every Redis command of the worker is retried with capped exponential backoff
for as long as Redis is away (redis-py's Retry), so a progress or result write waits for Redis
instead of killing the worker, and a worker started before Redis waits for it.

Leases: a job this worker runs is its own while its entry in RQ's StartedJobRegistry is alive
(refreshed by heartbeats every `heartbeat_s`) and the job names this worker as started. If the
heartbeats lapse (the worker died, or Redis was away longer than 3 beats), RQ's registry cleanup
retries the job; a worker that finds it no longer owns a job stops it at its next check and
writes nothing, so each job has one writer and is certified by at most one worker at a time.

Batching: before running a small job, the worker claims the compatible small jobs queued
behind it (atomically taken off the queue and started under this worker, heartbeats included,
so they show as started and a dead worker's claims are retried like its own job), certifies
them together in one engine pass (jobs.run_batch), then finishes each with its own result. A
job canceled during the pass leaves it at the next chunk of samples and ends canceled; the pass
goes on without it."""

import argparse
import contextlib
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime

from pydantic import ValidationError
from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError
from redis.retry import Retry
from rq import Queue, SimpleWorker, Worker, get_current_job, worker_registration
from rq.exceptions import DeserializationError
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from app.settings import Settings
from splitz import checkpoint
from splitz.errors import SplitzError

from .jobs import JobSpec, ModelCache, batch_key, outcome, run_batch, run_job, samples_used

log = logging.getLogger("splitz.worker")
_models: ModelCache | None = None  # one per process, filled at boot, kept warm
_ahead: dict[str, dict] = {}  # claimed job id -> its result from this worker's batched pass
_lost: set[str] = set()  # ids of held jobs found no longer this worker's (SplitzWorker._beat)
BATCH_IMAGES = 32  # at most this many images in one batched pass
LOOKAHEAD = 64  # queued jobs inspected for a batch
CANCEL_POLL_S = 0.5  # a running job reads its cancel flag at most this often
METRICS_KEY = "splitz:metrics"  # a hash: jobs submitted and by final state, samples
QUEUE = "splitz"  # the one RQ queue: jobs of every model
# LREM the job from its queue and, only if it was there, park it on the intermediate queue
# (RQ's own crash-safe hand-over) until prepare_job_execution starts it under this worker.
CLAIM = """
if redis.call('lrem', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('rpush', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def cancel_key(job_id: str) -> str:
    return f"splitz:cancel:{job_id}"


class LeaseLost(Exception):
    """This worker no longer owns the job (its heartbeats lapsed and RQ retried it)."""


class LoggedBackoff(ExponentialWithJitterBackoff):
    """redis-py's backoff, logging the first failure and every tenth."""

    def compute(self, failures: int) -> float:
        wait = super().compute(failures)
        if failures % 10 == 1:
            log.warning("Redis unreachable (%d failed tries); retrying in %.1f s", failures, wait)
        return wait


def connect(url: str) -> Redis:
    """A connection whose commands wait out Redis outages of any length."""
    try:
        return Redis.from_url(url, socket_connect_timeout=2, health_check_interval=10,
                              retry=Retry(LoggedBackoff(cap=5.0, base=0.1), retries=-1),
                              retry_on_error=[ConnectionError, TimeoutError])
    except ValueError as e:
        raise SplitzError(f"SPLITZ_REDIS_URL: {e}") from None


class CancelFlags:
    """Which of some jobs were canceled (their cancel keys), read for all of them in one round
    trip at most every CANCEL_POLL_S; a job seen canceled stays so. Called with a job's index."""

    def __init__(self, connection: Redis, job_ids: list[str]):
        self.connection, self.job_ids = connection, job_ids
        self.seen: set[int] = set()
        self.polled = 0.0

    def __call__(self, i: int) -> bool:
        if i not in self.seen and time.monotonic() - self.polled > CANCEL_POLL_S:
            self.polled = time.monotonic()
            with self.connection.pipeline() as p:
                for job_id in self.job_ids:
                    p.exists(cancel_key(job_id))
                self.seen |= {k for k, flag in enumerate(p.execute()) if flag}
        return i in self.seen


def certify_job(spec: dict) -> dict:
    """RQ entry point: JSON in, JSON out (see jobs.run_job)."""
    job = get_current_job()
    flags = CancelFlags(job.connection, [job.id])

    def progress(done: int, total: int) -> None:
        job.meta.update(done=done, total=total)
        job.save_meta()

    def canceled() -> bool:
        if job.id in _lost:
            raise LeaseLost(job.id)
        return flags(0)

    spec = JobSpec.model_validate(spec)
    if job.id in _ahead:  # certified in this worker's batched pass, or canceled during it
        result = _ahead.pop(job.id)
        if canceled() and not result.get("canceled"):
            result = {"canceled": True, "error": "canceled"}
        if not result.get("canceled"):
            progress(len(spec.images), len(spec.images))
        return result
    return run_job(spec, _cache(), progress, canceled)


def count_success(job, connection: Redis, result: dict) -> None:
    """RQ success callback: the job's final state and samples, into METRICS_KEY."""
    with connection.pipeline() as p:
        p.hincrby(METRICS_KEY, outcome(result))
        p.hincrby(METRICS_KEY, "samples", samples_used(result))
        p.execute()


def count_failure(job, connection: Redis, *exc_info) -> None:
    """RQ failure callback (also for abandoned jobs): counted only when no retry follows."""
    if not job.should_retry:
        connection.hincrby(METRICS_KEY, "failed")


def _cache() -> ModelCache:
    """The process's models; created on first use when a plain `rq worker` runs our jobs."""
    global _models
    if _models is None:
        settings = Settings()
        _models = ModelCache(settings.model_dir, settings.batch_size, settings.device)
    return _models


class SplitzWorker(SimpleWorker):
    """A SimpleWorker that heartbeats every job it holds while it runs (a killed worker's jobs
    are retried after 3 missed beats, not after their whole timeout), batches small jobs, and
    writes nothing for a job it no longer owns."""

    heartbeat_s = 5.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: dict[str, tuple] = {}  # job id -> (job, execution), heartbeated
        self.claim = self.connection.register_script(CLAIM)
        self.stop_signaled = False

    def request_stop(self, signum, frame):
        """SIGTERM / SIGINT: stop after the running job. RQ records the request only when busy
        (an idle worker leaves its loop by an exception), so main would start a new loop."""
        self.stop_signaled = True
        super().request_stop(signum, frame)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return int(3 * self.heartbeat_s) + 1

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        """RQ's heartbeat, and this worker's record written again where Redis lost it (a
        flush, a restart without its AOF): else readiness and --check never see it again."""
        if pipeline is None and not self.connection.hexists(self.key, "birth"):
            log.warning("worker %s: its record is gone from Redis; registering again", self.name)
            with self.connection.pipeline() as p:
                p.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, p)
                p.execute()
        super().heartbeat(timeout, pipeline)

    def execute_job(self, job, queue):
        try:
            spec = vetted(job)
        except Refused as e:
            return self._refuse(job, queue, str(e))
        self.held[job.id] = (job, self.prepare_execution(job))
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(stop,), daemon=True)
        beat.start()
        try:
            try:
                peers = self._batch_around(job, spec, queue)
            except Exception:  # batching only saves time: the jobs still run one by one
                log.warning("batching around job %s failed", job.id, exc_info=True)
                peers = [(p, e) for p, e in self.held.values() if p.id != job.id]
            for held, execution in [self.held[job.id], *peers]:
                self.perform_job(held, queue, execution)
                self.held.pop(held.id, None)
        finally:
            stop.set()
            beat.join()
            self.held.clear()
            _ahead.clear()
            _lost.clear()
        self.set_state(WorkerStatus.IDLE)

    def _refuse(self, job, queue, why: str) -> None:
        """Fail `job` once, without running anything it names (no retry: it would be refused
        again), and count it."""
        log.error("job %s refused: %s", job.id, why)
        execution = self.prepare_execution(job)
        # raised after its bookkeeping, where the process title reads the payload
        with contextlib.suppress(DeserializationError):
            self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        job.retries_left = 0
        self.handle_job_failure(job, queue, exc_string=f"refused: {why}", execution=execution)
        self.connection.hincrby(METRICS_KEY, "failed")
        self.set_state(WorkerStatus.IDLE)

    def _batch_around(self, job, spec: JobSpec, queue) -> list[tuple]:
        """Claim the compatible small jobs queued behind `job` (whose spec is `spec`), certify
        them with it in one pass, keep their results in _ahead; returns the claimed (job,
        execution) pairs."""
        key = batch_key(spec)
        if key is None:
            return []
        claimed, specs, images = [], [spec], len(spec.images)
        for peer in queue.get_jobs(0, LOOKAHEAD):
            if peer is None or peer.id == job.id:
                continue
            try:
                other = vetted(peer)
            except Refused:  # failed when it is dequeued itself
                continue
            if batch_key(other) != key or images + len(other.images) > BATCH_IMAGES:
                continue
            if not self.claim(keys=[queue.key, queue.intermediate_queue_key], args=[peer.id]):
                continue  # another worker took it
            execution = self.prepare_execution(peer)
            self.prepare_job_execution(peer, remove_from_intermediate_queue=True)
            # held (heartbeated, checked by _beat) only once started under this worker: a beat
            # in between found it not ours yet and dropped it as lost
            self.held[peer.id] = (peer, execution)
            claimed.append(self.held[peer.id])
            specs.append(other)
            images += len(other.images)
        if claimed:
            ids = [job.id, *(p.id for p, _ in claimed)]
            results = run_batch(specs, _cache(), CancelFlags(self.connection, ids))
            _ahead.update(zip(ids, results, strict=True))
        return claimed

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            for job, execution in list(self.held.values()):
                try:
                    self.maintain_heartbeats(job, execution)
                    if not self._owns(job, execution):
                        _lost.add(job.id)
                except Exception:  # the next beat tries again
                    log.warning("heartbeat failed for job %s", job.id, exc_info=True)

    def _owns(self, job, execution) -> bool:
        """Our execution is still registered and the job is started under our name."""
        with self.connection.pipeline() as p:
            p.zscore(job.started_job_registry.key, execution.composite_key)
            p.hmget(job.key, "status", "worker_name")
            score, (status, name) = p.execute()
        return score is not None and status == b"started" and name == self.name.encode()

    def _finalize_success(self, job, queue, execution, return_value) -> None:
        if self._still_owns(job, execution):
            super()._finalize_success(job, queue, execution, return_value)

    def _finalize_failure(self, job, queue, execution, exc_info) -> None:
        if self._still_owns(job, execution):
            super()._finalize_failure(job, queue, execution, exc_info)

    def _still_owns(self, job, execution) -> bool:
        if job.id not in _lost and self._owns(job, execution):
            return True
        log.warning("job %s: no longer this worker's (heartbeats lapsed, RQ retried it); "
                    "its result is dropped", job.id)
        self.executions.pop(execution.id, None)
        return False


class Refused(Exception):
    """A job this worker must not run as it stands in Redis; the message says why."""


def vetted(job) -> JobSpec:
    """The spec of a job this worker may run, or Refused. RQ imports and calls whatever a job
    names, as its function and as its callbacks: only ours run, on a payload that is a valid
    job spec."""
    try:
        func, args, kwargs = job.func_name, job.args, job.kwargs
    except DeserializationError:
        raise Refused("its payload is not JSON") from None
    named = {func, job._success_callback_name, job._failure_callback_name,
             job._stopped_callback_name}  # RQ keeps the callbacks' names in these
    if func != ENTRY or not named <= CALLABLE:
        raise Refused(f"it names {', '.join(sorted(n for n in named - CALLABLE if n))}, which "
                      "this worker does not run")
    if len(args) != 1 or kwargs:
        raise Refused("its arguments are not one job spec")
    try:
        return JobSpec.model_validate(args[0])
    except ValidationError as e:
        raise Refused(f"its spec is invalid: {checkpoint.card_error(e)}") from None


ENTRY = "worker.main.certify_job"  # as the API enqueues it (also when this file is __main__)
CALLABLE = {None, ENTRY, "worker.main.count_success", "worker.main.count_failure"}


def worker_ttl(settings: Settings) -> int:
    """How long an idle worker's registration lives between its heartbeats (RQ's worker_ttl:
    it blocks on the queues for worker_ttl - 15 s at a time, then beats)."""
    return max(30, int(6 * settings.heartbeat_s))


def check(redis: Redis, hostname: str, ttl: int) -> str | None:
    """None if a worker of this host is registered, alive and heartbeating; else why not."""
    for worker in Worker.all(connection=redis):
        if worker.hostname != hostname or worker.death_date is not None:
            continue
        beat = worker.last_heartbeat.replace(tzinfo=worker.last_heartbeat.tzinfo or UTC)
        age = (datetime.now(UTC) - beat).total_seconds()
        if age > ttl + 60:
            return f"worker {worker.name}: last heartbeat {age:.0f} s ago"
        try:
            os.kill(worker.pid, 0)
        except ProcessLookupError:
            continue  # a dead process's key, not yet expired
        except PermissionError:
            pass
        return None
    return f"no live worker registered from {hostname}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitz worker", description=__doc__)
    parser.add_argument("--models", nargs="*",
                        help="model ids to load at boot (default: all); others load when a job "
                             "needs them")
    parser.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    parser.add_argument("--check", action="store_true",
                        help="healthcheck: exit 0 if a worker of this host is alive in Redis")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.redis_url:
        raise SplitzError("SPLITZ_REDIS_URL is not set")
    if args.check:
        return _check(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ids = _cache().warm(args.models)
    redis = connect(settings.redis_url)
    log.info("models %s loaded; waiting for Redis", ", ".join(ids))
    redis.ping()
    SplitzWorker.heartbeat_s = settings.heartbeat_s
    while True:  # a work loop that ended on an error it could not wait out starts afresh
        queue = Queue(QUEUE, connection=redis, serializer=JSONSerializer)
        worker = SplitzWorker([queue], connection=redis, serializer=JSONSerializer,
                              worker_ttl=worker_ttl(settings),
                              maintenance_interval=max(1, int(3 * settings.heartbeat_s)))
        log.info("ready: worker %s, models %s warm", worker.name, ", ".join(ids))
        worker.work(burst=args.burst, logging_level="INFO")
        if args.burst or worker.stop_signaled:
            return 0
        log.warning("worker %s left its work loop; starting a new one", worker.name)
        time.sleep(1)


def _check(settings: Settings) -> int:
    try:
        redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        problem = check(redis, socket.gethostname(), worker_ttl(settings))
    except (RedisError, ValueError) as e:
        problem = f"redis unreachable: {type(e).__name__}"
    print(problem or "ok")
    return 1 if problem else 0


if __name__ == "__main__":
    raise SystemExit(main())
