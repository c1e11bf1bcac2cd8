"""The RQ worker process: boot (load and warm every model), then work. Non-forking, so a CUDA
context survives between jobs; run one process per GPU and scale with more processes."""

import argparse
import logging
import threading

from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from app.settings import Settings

from .jobs import JobSpec, ModelCache, run_job

log = logging.getLogger("splitz.worker")
_models: ModelCache | None = None  # one per process, filled at boot, kept warm


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

    return run_job(JobSpec.model_validate(spec), _cache(), progress, canceled)


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
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True)
        beat.start()
        try:
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
