"""Worker batching: small jobs certified together in one engine pass get exactly the results
they would get alone."""

import time

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from app.backends import RQBackend
from app.settings import Settings
from splitz import checkpoint
from splitz.images import load_image
from splitz.smoothing import Smooth
from worker import main as worker_main
from worker.jobs import JobSpec, ModelCache, batch_key, run_batch, run_job
from worker.main import QUEUE, SplitzWorker, certify_job

from .conftest import TINY, TINY_RS, b64, files, png_bytes, version


def comparable(result: dict) -> dict:
    """A job's result without what depends on timing or batching."""
    drop = {"seconds", "batched"}
    out = {k: v for k, v in result.items() if k not in drop}
    if "results" in out:
        out["results"] = [{k: v for k, v in r.items() if k != "time_s"} for r in out["results"]]
    return out


def test_a_batched_pass_gives_each_job_its_own_result(repository):
    models, tiny = ModelCache(repository), version(repository, TINY)
    specs = [JobSpec(model_id=TINY, **tiny, n=300, seed=7 * i, radius=0.05,
                     images=[b64(png_bytes(i)), b64(png_bytes(i + 10))]) for i in range(3)]
    specs.insert(1, JobSpec(model_id=TINY, **tiny, images=[b64(b"not an image")],
                            n=300, radius=0.05))
    batched = run_batch(specs, models)
    assert [r.get("batched") for r in batched] == [3, None, 3, 3]
    assert "image-0" in batched[1]["error"]
    for spec, got in zip(specs, batched, strict=True):
        assert comparable(got) == comparable(run_job(spec, models))


def test_jobs_differing_in_bound_or_tolerance_are_never_batched_together(repository):
    """batch_key left out the bound and the stopping rule, so one pass certified such jobs
    with the first job's. Each batch keeps its jobs' own, with the results they get alone."""
    base = JobSpec(model_id=TINY, **version(repository, TINY), n=3000, seed=3,
                   images=[b64(png_bytes(1))])
    others = [base.model_copy(update={"bound": "randomized-clopper-pearson"}),
              base.model_copy(update={"tolerance": 0.02})]
    assert len({batch_key(spec) for spec in [base, *others]}) == 3
    models = ModelCache(repository)
    for spec in others:
        pair = [spec, spec.model_copy(update={"seed": 11, "images": [b64(png_bytes(2))]})]
        batched = run_batch(pair, models)
        for one, got in zip(pair, batched, strict=True):
            assert comparable(got) == comparable(run_job(one, models))
            cert = got["results"][0]
            assert cert["bound"] == one.bound
            assert cert["stopping"].startswith("adaptive") == (one.tolerance is not None)


def test_a_job_canceled_during_its_batched_pass_stops_and_the_others_finish(repository,
                                                                              monkeypatch):
    """run_batch did not look at cancellation: a job canceled while its batch was certified
    was sampled to the end with the others."""
    models, tiny = ModelCache(repository), version(repository, TINY)
    specs = [JobSpec(model_id=TINY, **tiny, n=3000, seed=10 * i, images=[b64(png_bytes(i))])
             for i in range(3)]
    smooth, passes, asked = models.get(TINY, specs[0].version), [], []
    certify = smooth.certify
    monkeypatch.setattr(smooth, "certify", lambda x, **kw: passes.append(len(x)) or
                        certify(x, **kw))

    def canceled(i: int) -> bool:  # job 1, after two chunks of the first pass
        asked.append(i)
        return i == 1 and len(asked) > 2 * len(specs)

    results = run_batch(specs, models, canceled)
    assert results[1] == {"canceled": True, "error": "canceled while certified in a batch"}
    assert passes == [3, 2]  # stopped mid-pass, then went on without it
    monkeypatch.undo()
    for i in (0, 2):
        assert results[i]["batched"] == 2
        assert comparable(results[i]) == comparable(run_job(specs[i], models))


@pytest.mark.slow
def test_delete_of_a_job_in_a_batched_pass_cancels_it_alone(redis_server, repository,
                                                             monkeypatch):
    """The worker's batched pass, with a DELETE (RQBackend.cancel) of one of its jobs as soon
    as the pass starts: that job ends canceled, the others finish with their own results."""
    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    tiny = version(repository, TINY)
    specs = [JobSpec(model_id=TINY, **tiny, n=3000, seed=10 * i, images=[b64(png_bytes(i))])
             for i in range(3)]
    ids = [queue.enqueue(certify_job, spec.model_dump()).id for spec in specs]
    models = ModelCache(repository)
    monkeypatch.setattr(worker_main, "_models", models)
    backend = RQBackend(Settings(redis_url=redis_server.url))
    smooth = models.get(TINY, specs[0].version)
    certify = smooth.certify

    def delete_first(x, **kw):
        if len(x) == 3:
            backend.cancel(ids[1])
        return certify(x, **kw)

    monkeypatch.setattr(smooth, "certify", delete_first)
    SplitzWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True)
    assert [backend.get(j).status for j in ids] == ["finished", "canceled", "finished"]
    monkeypatch.undo()
    for i in (0, 2):
        got = backend.get(ids[i]).result
        assert got["batched"] == 2
        assert comparable(got) == comparable(run_job(specs[i], ModelCache(repository)))
    backend.close()


@pytest.mark.slow
def test_queued_small_jobs_run_in_one_pass_with_their_own_results(make_stack, repository):
    stack = make_stack(workers=1)
    busy = stack.http.post("/jobs", params={"model": TINY_RS, "n": 20_000}, files=files(4)).json()
    while stack.http.get(f"/jobs/{busy['id']}").json()["status"] == "queued":
        time.sleep(0.05)
    small = [stack.http.post("/jobs", params={"model": TINY, "n": 400, "seed": 100 * i},
                             files=files(1, start=i)).json()["id"] for i in range(6)]
    smooth = Smooth.from_checkpoint(checkpoint.load(repository / TINY))
    for i, job_id in enumerate(small):
        body = stack.wait_job(job_id)
        assert body["status"] == "finished" and body["batched"] == 6
        want = smooth.certify(load_image(png_bytes(i), (1, 28, 28)), n=400, seed=100 * i)[0]
        got = body["results"][0]
        assert (got["prediction"], got["n_a"], got["radius"], got["seed"]) == (
            want.prediction, want.n_a, want.radius, 100 * i)
    assert stack.wait_job(busy["id"])["batched"] == 1


@pytest.mark.slow
def test_a_batch_claims_its_jobs_so_they_show_started_and_run_once(make_stack):
    """The worker used to certify queued jobs ahead while they stayed on the queue: shown as
    queued meanwhile, and certified again by any worker that took one."""
    stack = make_stack(workers=1)
    busy = stack.http.post("/jobs", params={"model": TINY_RS, "n": 20_000}, files=files(4)).json()
    while stack.http.get(f"/jobs/{busy['id']}").json()["status"] == "queued":
        time.sleep(0.05)
    small = [stack.http.post("/jobs", params={"model": TINY, "n": 20_000},
                             files=files(1, start=i)).json()["id"] for i in range(6)]
    most_started = 0
    while True:
        states = [stack.http.get(f"/jobs/{j}").json()["status"] for j in small]
        most_started = max(most_started, states.count("started"))
        if all(s == "finished" for s in states):
            break
        time.sleep(0.05)
    assert most_started == 6  # all six claimed together, none left queued while certified


@pytest.mark.slow
def test_a_claimed_job_is_checked_for_its_lease_only_once_it_is_started(
        redis_server, repository, monkeypatch):
    """The heartbeat thread's ownership check, run while a peer was claimed but not yet started
    under the worker, marked it lost: its batched result was dropped and the job left for RQ to
    retry (or to fail, with no retries left). Here the check runs at exactly that moment."""
    conn = redis.Redis.from_url(redis_server.url)
    conn.flushall()
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    tiny = version(repository, TINY)
    ids = [queue.enqueue(certify_job, JobSpec(
        model_id=TINY, **tiny, n=200, seed=i,
        images=[b64(png_bytes(i))]).model_dump()).id for i in range(3)]
    monkeypatch.setattr(worker_main, "_models", ModelCache(repository))
    batch_around, prepare = SplitzWorker._batch_around, SplitzWorker.prepare_job_execution

    def beating(self, job, spec, queue):  # the heartbeat thread runs from here on
        self.beating = True
        return batch_around(self, job, spec, queue)

    def beat_then_prepare(self, job, *args, **kwargs):
        if getattr(self, "beating", False):
            for held, execution in list(self.held.values()):
                if not self._owns(held, execution):
                    worker_main._lost.add(held.id)
        return prepare(self, job, *args, **kwargs)

    monkeypatch.setattr(SplitzWorker, "_batch_around", beating)
    monkeypatch.setattr(SplitzWorker, "prepare_job_execution", beat_then_prepare)
    SplitzWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True)
    for job_id in ids:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        assert job.get_status() == "finished"
        assert job.return_value()["batched"] == 3
