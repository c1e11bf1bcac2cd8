"""The service as it runs in production, as plain processes: Redis, uvicorn, RQ workers."""

import json
import os
import signal
import time

import pytest

from app.backends import RQBackend
from app.settings import Settings
from app.stack import Stack
from splitz import checkpoint
from splitz.images import load_image
from splitz.smoothing import Smooth
from worker.jobs import JobSpec

from .conftest import TINY, TINY_RS, b64, files, png_bytes, version

pytestmark = pytest.mark.slow


def test_certify_end_to_end_equals_the_engine_and_readiness(make_stack, repository):
    stack = make_stack()
    r = stack.http.post("/certify", params={"model": TINY, "seed": 4, "n": 500},
                        files={"image": ("a.png", png_bytes(2), "image/png")})
    assert r.status_code == 200, r.text
    smooth = Smooth.from_checkpoint(checkpoint.load(repository / TINY))
    want = smooth.certify(load_image(png_bytes(2), (1, 28, 28)), n=500, seed=4)[0]
    assert {k: r.json()[k] for k in ("prediction", "radius", "n_a", "seed", "lipschitz")} == {
        "prediction": want.prediction, "radius": want.radius, "n_a": want.n_a, "seed": 4,
        "lipschitz": want.lipschitz}
    assert stack.http.get("/readyz", params={"model": TINY}).status_code == 200
    assert stack.http.get("/readyz", params={"model": "other"}).status_code == 503


def test_batch_of_50_reports_progress(make_stack):
    stack = make_stack(workers=2)
    r = stack.http.post("/jobs", params={"model": TINY_RS, "n": 5000}, files=files(50))
    assert r.status_code == 202, r.text
    seen: list[dict] = []
    body = stack.wait_job(r.json()["id"], seen=seen)
    assert body["status"] == "finished" and len(body["results"]) == 50
    done = [s["progress"]["done"] for s in seen]
    assert done == sorted(done) and len(set(done)) >= 3 and done[-1] == 50
    assert len({x["seed"] for x in body["results"]}) == 50  # drawn by the server, per image


def started_job(stack: Stack, images: int) -> dict:
    """A slow job (20,000 samples per image), returned once two images are done."""
    job = stack.http.post("/jobs", params={"model": TINY_RS, "n": 20_000},
                          files=files(images)).json()
    while stack.http.get(f"/jobs/{job['id']}").json()["progress"]["done"] < 2:
        time.sleep(0.05)
    return job


def test_cancel_a_running_job(make_stack):
    stack = make_stack()
    job = started_job(stack, 40)
    assert stack.http.delete(f"/jobs/{job['id']}").status_code == 202
    body = stack.wait_job(job["id"])
    assert body["status"] == "canceled" and body["progress"]["done"] < 40


def test_worker_killed_mid_job_is_retried_not_lost(make_stack):
    stack = make_stack()
    job = started_job(stack, 12)
    os.kill(stack.workers[0].pid, signal.SIGKILL)
    stack.workers.append(stack.add_worker())
    body = stack.wait_job(job["id"])
    assert body["status"] == "finished" and len(body["results"]) == 12


def test_redis_restart_gives_503_then_recovers(make_stack, redis_server):
    stack = make_stack()
    redis_server.stop()
    try:
        assert stack.http.get("/readyz").status_code == 503
        r = stack.http.post("/certify", params={"model": TINY},
                            files={"image": ("a.png", png_bytes(), "image/png")})
        assert r.status_code == 503 and "unavailable" in r.json()["error"]
        assert "job_id" not in r.json()  # refused before any job was sent: none to poll
        assert stack.http.get("/healthz").status_code == 200
    finally:
        redis_server.start()
    deadline = time.monotonic() + 90
    while stack.http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    r = stack.http.post("/certify", params={"model": TINY, "n": 100},
                        files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 200, r.text


def test_client_and_submit_cli(make_stack, tmp_path, capsys):
    from app.client import Client, ServiceError
    from splitz.cli import main

    stack = make_stack()
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"d{i}.png")
        paths[-1].write_bytes(png_bytes(i))
    client = Client(stack.url)
    one = client.certify(paths[0], TINY, n=200, seed=0)
    assert one["prediction"] == 7 and one["seed"] == 0
    with pytest.raises(ServiceError, match="404"):
        client.certify(paths[0], "nope")
    out = tmp_path / "out.csv"
    assert main(["submit", *map(str, paths), "--model", TINY, "--url", stack.url, "--n", "200",
                 "--format", "csv", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("name,prediction,radius") and len(rows) == 4
    assert rows[1].split(",")[2] == str(one["radius"])  # same seed, same answer
    assert main(["submit", str(paths[0]), "--model", TINY, "--url", stack.url, "--n", "300",
                 "--bound", "randomized-clopper-pearson", "--tolerance", "0.05",
                 "--out", str(out)]) == 0
    sent = json.loads(out.read_text())
    assert sent["bound"] == "randomized-clopper-pearson" and sent["stopping"] != "fixed"
    assert main(["submit", str(paths[0]), "--model", "nope", "--url", stack.url]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_rq_wait_wakes_on_the_result_stream_and_on_cancel(make_stack, repository):
    stack = make_stack()
    backend = RQBackend(Settings(redis_url=stack.redis.url))
    spec = dict(model_id=TINY_RS, **version(repository, TINY_RS),
                images=[b64(png_bytes())], n=500)
    first = backend.submit(JobSpec(**spec | {"n": 20_000}))
    second = backend.submit(JobSpec(**spec))  # queued behind it: one worker
    start = time.monotonic()
    backend.cancel(second)
    assert backend.wait(second, start + 120).status == "canceled"
    view = backend.wait(first, start + 120)
    assert view.status == "finished" and len(view.result["results"]) == 1
    assert time.monotonic() - start < 60  # woken by the result, long before the deadline
    assert backend.wait("0" * 32, start + 1) is None
    backend.close()


def test_cancel_stops_a_running_single_image_job(make_stack):
    stack = make_stack()
    job = stack.http.post("/jobs", params={"model": TINY_RS, "n": 1_000_000},
                          files=files(1)).json()
    while stack.http.get(f"/jobs/{job['id']}").json()["status"] != "started":
        time.sleep(0.05)
    assert stack.http.delete(f"/jobs/{job['id']}").status_code == 202
    body = stack.wait_job(job["id"])
    assert body["status"] == "canceled" and body["progress"]["done"] == 0
