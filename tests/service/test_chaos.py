"""Faults as an operator meets them: Redis killed mid-job and restarted from its AOF, a worker
started before Redis, jobs whose heartbeats lapse during an outage."""

import time

import pytest
import redis
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from app.stack import RedisServer, Stack, environment, spawn
from worker.main import METRICS_KEY

from .conftest import TINY_RS, files, redis_binary

pytestmark = pytest.mark.slow


def running(stack: Stack, ids: list[str]) -> None:
    """Wait until some of the jobs report progress."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sum(stack.http.get(f"/jobs/{j}").json()["progress"]["done"] for j in ids) >= 2:
            return
        time.sleep(0.1)
    raise AssertionError("no job made progress")


def outage(server: RedisServer, seconds: float) -> None:
    server.kill()
    time.sleep(seconds)
    server.start()


def successes(url: str, job_id: str) -> int:
    """Results written for a job that finished (one per execution that wrote one)."""
    conn = redis.Redis.from_url(url)
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    return sum(r.type == Result.Type.SUCCESSFUL for r in Result.all(job, JSONSerializer))


# 12 s is past redis-py's default retries (3, about 7 s), which hid shorter outages
@pytest.mark.parametrize("seconds,heartbeat", [(3, 5), (12, 1)])
def test_workers_outlive_a_redis_crash_and_every_job_finishes_once(make_stack, redis_server,
                                                                  seconds, heartbeat):
    """kill -9 of Redis while jobs report progress, restart from the AOF. At heartbeat 1 s the
    outage outlasts the leases: RQ retries the jobs, and the workers that held them must drop
    them without writing, so each job still has exactly one result."""
    stack = make_stack(workers=2, heartbeat_s=heartbeat, job_retries=3)
    ids = [stack.http.post("/jobs", params={"model": TINY_RS, "n": 20_000},
                           files=files(6, start=6 * k)).json()["id"] for k in range(4)]
    running(stack, ids)
    outage(redis_server, seconds)
    bodies = [stack.wait_job(j, timeout=300) for j in ids]
    assert [b["status"] for b in bodies] == ["finished"] * 4
    assert all(len(b["results"]) == 6 for b in bodies)
    assert all(w.poll() is None for w in stack.workers)  # both workers still alive
    assert [successes(redis_server.url, j) for j in ids] == [1] * 4
    counts = redis.Redis.from_url(redis_server.url).hgetall(METRICS_KEY)
    assert int(counts[b"finished"]) == 4


def test_a_worker_started_before_redis_waits_for_it(repository, tmp_path):
    server = RedisServer(tmp_path, redis_binary())
    server.kill()  # its port is known and nothing listens on it
    worker = spawn(environment(server.url, repository), tmp_path, "worker", "worker")
    try:
        time.sleep(12)  # past redis-py's default retries
        assert worker.poll() is None  # waiting, not a traceback
        server.start()
        conn, deadline = redis.Redis.from_url(server.url), time.monotonic() + 60
        while not conn.keys("rq:worker:*") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert conn.keys("rq:worker:*") and worker.poll() is None
    finally:
        worker.kill()
        worker.wait(10)
        server.proc.kill()


def test_worker_healthcheck(make_stack):
    import subprocess
    import sys

    stack = make_stack()
    check = [sys.executable, "-m", "splitz", "worker", "--check"]
    ok = subprocess.run(check, env=stack.env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    stack.workers[0].kill()
    stack.workers[0].wait(10)
    dead = subprocess.run(check, env=stack.env, capture_output=True, text=True, timeout=60)
    assert dead.returncode == 1 and "no live worker" in dead.stdout


def test_jobs_tampered_on_redis_are_refused_once_and_run_nothing(make_stack, tmp_path):
    """Whoever can write to Redis can queue any job: RQ would import and call what it names (as
    function or callback) and retry a bad spec. The worker fails such jobs at once, runs
    nothing they name, and goes on serving."""
    from rq import Callback, Queue

    from worker.main import ENTRY, QUEUE

    stack = make_stack(job_retries="2")
    good = stack.http.post("/jobs", params={"model": TINY_RS}, files=files(1)).json()["id"]
    assert stack.wait_job(good)["status"] == "finished"
    conn = redis.Redis.from_url(stack.redis.url)
    spec = Job.fetch(good, connection=conn, serializer=JSONSerializer).args[0]
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    marker = tmp_path / "ran"
    undecodable = Job.create(ENTRY, args=(spec,), connection=conn, serializer=JSONSerializer)
    undecodable.data = b"not json"
    bad = {
        queue.enqueue_call("os.system", args=(f"touch {marker}",)).id: "os.system",
        queue.enqueue_call(ENTRY, args=(spec,),
                           on_success=Callback("os.getpid")).id: "os.getpid",
        queue.enqueue_call(ENTRY, args=({"model_id": 3},)).id: "spec is invalid",
        queue.enqueue_job(undecodable).id: "not JSON",
    }
    for job_id, why in bad.items():
        body = stack.wait_job(job_id, timeout=60)
        assert body["status"] == "failed" and "refused" in body["error"] and why in body["error"]
        assert Job.fetch(job_id, connection=conn).retries_left == 0  # no retry was queued
    assert not marker.exists() and stack.workers[0].poll() is None
    again = stack.http.post("/jobs", params={"model": TINY_RS}, files=files(1)).json()["id"]
    assert stack.wait_job(again)["status"] == "finished"


def test_an_idle_worker_stops_on_sigterm_and_a_job_id_with_a_newline_is_unknown(make_stack):
    import signal

    stack = make_stack()
    assert stack.http.get("/jobs/" + "0" * 32 + "%0A").status_code == 404
    worker = stack.workers[0]
    worker.send_signal(signal.SIGTERM)  # idle: RQ leaves its loop without recording the stop
    assert worker.wait(30) == 0


def test_a_stalled_redis_does_not_stall_the_api(make_stack, redis_server):
    """Requests waiting on a stopped Redis (SIGSTOP: no answer until the socket timeout) wait in
    threads: the event loop answers health checks meanwhile."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    stack = make_stack()
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(3) as pool:
            posts = [pool.submit(stack.http.post, "/jobs", params={"model": TINY_RS},
                                 files=files(1)) for _ in range(3)]
            time.sleep(1)
            t0 = time.monotonic()
            assert stack.http.get("/healthz").status_code == 200
            assert time.monotonic() - t0 < 2
            redis_server.proc.send_signal(signal.SIGCONT)
            assert {p.result().status_code for p in posts} <= {202, 503}
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def test_a_job_canceled_in_the_queue_expires_like_a_result(make_stack):
    import signal

    stack = make_stack(result_ttl_s="2")
    stack.workers[0].send_signal(signal.SIGSTOP)  # the job stays queued
    try:
        job_id = stack.http.post("/jobs", params={"model": TINY_RS}, files=files(1)).json()["id"]
        assert stack.http.delete(f"/jobs/{job_id}").json()["status"] == "canceled"
    finally:
        stack.workers[0].send_signal(signal.SIGCONT)
    conn = redis.Redis.from_url(stack.redis.url)
    assert 0 < conn.ttl(f"rq:job:{job_id}") <= 2
    assert conn.zcard("rq:canceled:splitz") == 0
    time.sleep(3)
    assert stack.http.get(f"/jobs/{job_id}").status_code == 404
    assert not conn.exists(f"rq:job:{job_id}")


def test_a_worker_registers_again_after_redis_lost_its_data(make_stack):
    stack = make_stack()
    redis.Redis.from_url(stack.redis.url).flushall()  # a restart without its AOF, say
    assert stack.http.get("/readyz").status_code == 503
    deadline = time.monotonic() + 60  # the idle worker's next heartbeat: within worker_ttl
    while stack.http.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the worker never registered again"
        time.sleep(0.5)
    job = stack.http.post("/jobs", params={"model": TINY_RS}, files=files(1)).json()["id"]
    assert stack.wait_job(job)["status"] == "finished"
