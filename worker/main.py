"""The RQ worker process: boot (load and warm every model), then work. Non-forking, so a CUDA
context survives between jobs; run one process per GPU and scale with more processes.

Batching: before running a small job, the worker looks at the jobs queued behind it and
certifies the compatible small ones together with it in one engine pass (jobs.run_batch); their
results wait in this process until RQ hands those jobs over, when they return at once. The jobs
stay on the queue meanwhile, so nothing can be lost: another worker that takes one just computes
the same result again."""

import argparse
import logging
import threading

from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from app.settings import Settings

from .jobs import JobSpec, ModelCache, batch_key, run_batch, run_job

log = logging.getLogger("splitz.worker")
_models: ModelCache | None = None  # one per process, filled at boot, kept warm
_ahead: dict[str, dict] = {}  # job id -> result computed in a batch, until the job runs
BATCH_IMAGES = 32  # at most this many images in one batched pass
LOOKAHEAD = 64  # queued jobs inspected for a batch


def queue_name(model_id: str) -> str:
    return f"splitz:{model_id}"


def cancel_key(job_id: str) -> str:
    return f"splitz:cancel:{job_id}"


def certify_job(spec: dict) -> dict:
    """RQ entry point: JSON in, JSON out (see jobs.run_job)."""
    job = get_current_job()

    def progress(done: int, total: int) -> None:
        job.meta.update(done=done, total=total)
        job.save_meta()

    def canceled() -> bool:
        return bool(job.connection.exists(cancel_key(job.id)))

    spec = JobSpec.model_validate(spec)
    if job.id in _ahead and not canceled():
        progress(len(spec.images), len(spec.images))
        return _ahead.pop(job.id)
    return run_job(spec, _cache(), progress, canceled)


def batch_ahead(job, queue: Queue) -> None:
    """Certify a small `job` with compatible small jobs queued behind it; keep their results
    (in _ahead) for when they run."""
    _ahead.clear()  # results of peers another worker took: never asked for now
    spec = JobSpec.model_validate(job.args[0])
    key = batch_key(spec)
    if key is None:
        return
    batch, images = [(job.id, spec)], len(spec.images)
    for peer in queue.get_jobs(0, LOOKAHEAD):
        if peer is None or peer.id == job.id or peer.func_name != job.func_name:
            continue
        other = JobSpec.model_validate(peer.args[0])
        if batch_key(other) == key and images + len(other.images) <= BATCH_IMAGES:
            batch.append((peer.id, other))
            images += len(other.images)
    if len(batch) > 1:
        results = run_batch([s for _, s in batch], _cache())
        _ahead.update((job_id, r) for (job_id, _), r in zip(batch, results, strict=True))


def _cache() -> ModelCache:
    """The process's models; created on first use when a plain `rq worker` runs our jobs."""
    global _models
    if _models is None:
        settings = Settings()
        _models = ModelCache(settings.model_dir, settings.batch_size, settings.device)
    return _models


class SplitzWorker(SimpleWorker):
    """A SimpleWorker that heartbeats while a job runs, so a job whose worker was killed is
    noticed (and retried) after 3 missed beats instead of after its whole timeout."""

    heartbeat_s = 5.0

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return int(3 * self.heartbeat_s) + 1

    def execute_job(self, job, queue):
        execution = self.prepare_execution(job)  # started and heartbeating before any work
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True)
        beat.start()
        try:
            if job.id not in _ahead:
                try:
                    batch_ahead(job, queue)
                except Exception:  # batching only saves time: the job still runs on its own
                    log.warning("batching around job %s failed", job.id, exc_info=True)
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job, execution, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # Redis away for a moment: the next beat tries again
                log.warning("heartbeat failed for job %s", job.id, exc_info=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitz worker", description=__doc__)
    parser.add_argument("--models", nargs="*", help="model ids to serve (default: all)")
    parser.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.redis_url:
        parser.error("SPLITZ_REDIS_URL is not set")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ids = _cache().warm(args.models)
    redis = Redis.from_url(settings.redis_url)
    queues = [Queue(queue_name(i), connection=redis, serializer=JSONSerializer) for i in ids]
    SplitzWorker.heartbeat_s = settings.heartbeat_s
    worker = SplitzWorker(queues, connection=redis, serializer=JSONSerializer,
                          maintenance_interval=max(1, int(3 * settings.heartbeat_s)))
    log.info("ready: models %s", ", ".join(ids))
    worker.work(burst=args.burst, logging_level="INFO")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
