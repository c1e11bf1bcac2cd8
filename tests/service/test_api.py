"""The HTTP API over the embedded backend (in-process, no Redis)."""

import io
import time
import zipfile

import pytest
from fastapi.testclient import TestClient

from app.backends import EmbeddedBackend
from app.main import create_app
from app.settings import Settings
from splitz import checkpoint
from splitz.images import load_image
from splitz.smoothing import Smooth
from worker.jobs import JobSpec

from .conftest import TINY, b64, png_bytes


@pytest.fixture
def make_client(repository):
    clients = []

    def make(**settings) -> TestClient:
        app = create_app(Settings(model_dir=repository, default_n=300, **settings))
        client = TestClient(app).__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def upload(data: bytes, name="a.png"):
    return {"image": (name, data, "image/png")}


def wait_for(client, url, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if body["status"] in ("finished", "failed", "canceled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job not done in {timeout}s: {body}")


def test_certify_multipart_equals_the_engine(client, repository):
    r = client.post("/certify", params={"model": TINY, "seed": 9, "n": 400, "radius": 0.05},
                    files=upload(png_bytes(3)))
    assert r.status_code == 200, r.text
    got = r.json()
    smooth = Smooth.from_checkpoint(checkpoint.load(repository / TINY))
    want = smooth.certify(load_image(png_bytes(3), (1, 28, 28)), n=400, seed=9, radius=0.05)[0]
    for key in ("prediction", "radius", "n_a", "p_a_lower", "lipschitz", "gamma", "seed",
                "model_sha256", "certified"):
        assert got[key] == getattr(want, key), key


def test_certify_json_base64_and_async_job(client):
    r = client.post("/certify", json={"model": TINY, "image": b64(png_bytes(1)), "n": 200})
    assert r.status_code == 200 and r.json()["prediction"] == 7
    r = client.post("/certify", params={"model": TINY, "wait": "false"}, files=upload(png_bytes()))
    assert r.status_code == 202 and r.headers["Location"] == r.json()["status_url"]
    body = wait_for(client, r.json()["status_url"])
    assert body["status"] == "finished" and len(body["results"]) == 1


def test_batch_job_with_files_and_zip(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(3):
            z.writestr(f"z{i}.png", png_bytes(10 + i))
    files = [("images", (f"{i}.png", png_bytes(i), "image/png")) for i in range(2)]
    files.append(("zip", ("batch.zip", buf.getvalue(), "application/zip")))
    r = client.post("/jobs", params={"model": TINY, "n": 200}, files=files)
    assert r.status_code == 202, r.text
    body = wait_for(client, r.json()["status_url"])
    assert body["status"] == "finished" and body["progress"] == {"done": 5, "total": 5}
    assert [x["name"] for x in body["results"]] == ["0.png", "1.png", "z0.png", "z1.png", "z2.png"]
    assert [x["seed"] for x in body["results"]] == [0, 1, 2, 3, 4]


def test_cancel_a_queued_job_and_429_when_the_queue_is_full(make_client):
    client = make_client(max_queue=1)
    slow = client.post("/jobs", params={"model": TINY, "n": 200_000},
                       files=[("images", ("a.png", png_bytes(), "image/png"))] * 3)
    queued = client.post("/jobs", params={"model": TINY}, files=[("images", ("b.png",
                                                                            png_bytes(), "x"))])
    assert slow.status_code == 202 and queued.status_code == 202
    full = client.post("/jobs", params={"model": TINY}, files=[("images", ("c.png", png_bytes(),
                                                                          "image/png"))])
    assert full.status_code == 429 and full.headers["Retry-After"]
    assert client.delete(f"/jobs/{queued.json()['id']}").status_code == 202
    assert client.get(queued.json()["status_url"]).json()["status"] == "canceled"
    assert client.delete(f"/jobs/{slow.json()['id']}").status_code == 202
    assert wait_for(client, slow.json()["status_url"])["status"] == "canceled"
    assert client.delete("/jobs/" + "0" * 32).status_code == 404


def test_api_keys_are_enforced_when_configured(make_client):
    client = make_client(api_keys=["s3cret"])
    assert client.get("/models").status_code == 401
    assert client.get("/models", headers={"X-API-Key": "wrong"}).status_code == 401
    r = client.get("/models", headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200 and TINY in [m["id"] for m in r.json()]
    assert client.get("/healthz").status_code == 200  # liveness needs no key


def test_oversize_bodies_get_413_declared_or_chunked(make_client):
    client = make_client(max_body_bytes=10_000)
    big = png_bytes(size=(28, 28)) + b"\0" * 20_000
    r = client.post("/certify", params={"model": TINY}, files=upload(big))
    assert r.status_code == 413 and "larger" in r.json()["error"]

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = client.post("/certify", params={"model": TINY}, content=chunks(),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def truncated_png() -> bytes:
    data = png_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("params,data,status,match", [
    ({"model": TINY}, b"plain text", 422, "not a readable"),
    ({"model": TINY}, "truncated", 422, "not a readable"),
    ({"model": TINY}, png_bytes(size=(32, 32)), 422, "32x32"),
    ({"model": TINY}, png_bytes(mode="RGB"), 422, "mode RGB"),
    ({"model": TINY, "radius": "nan"}, None, 422, "radius"),
    ({"model": TINY, "radius": "-1"}, None, 422, "radius"),
    ({"model": TINY, "n": "2000000"}, None, 422, "cap"),
    ({"model": TINY, "n": "0"}, None, 422, "n"),
    ({"model": TINY, "alpha": "2"}, None, 422, "alpha"),
    ({"model": "nope"}, None, 404, "unknown model"),
    ({"model": "../tiny"}, None, 404, "invalid model id"),
    ({"model": "..%2Ftiny"}, None, 404, "invalid model id"),
    ({}, None, 422, "model"),
])
def test_bad_input_gets_4xx_with_a_json_error(client, params, data, status, match):
    data = truncated_png() if data == "truncated" else data or png_bytes()
    r = client.post("/certify", params=params, files=upload(data))
    assert r.status_code == status, r.text
    assert match in r.json()["error"]


def test_bad_bodies(client):
    assert client.post("/certify", params={"model": TINY}, content=b"x").status_code == 415
    r = client.post("/certify", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = client.post("/certify", json={"model": TINY, "image": "@@notbase64@@"})
    assert r.status_code == 422 and "base64" in r.json()["error"]
    r = client.post("/jobs", json={"model": TINY, "images": []})
    assert r.status_code == 422 and "no image" in r.json()["error"]
    r = client.post("/jobs", params={"model": TINY},
                    files=[("zip", ("z.zip", b"PK-not-a-zip", "application/zip"))])
    assert r.status_code == 422 and "zip" in r.json()["error"]
    assert client.get("/jobs/not-a-job").status_code == 404


def test_health_models_metrics_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/models").json()[0]["dataset"] == "mnist"
    client.post("/certify", params={"model": TINY, "n": 100}, files=upload(png_bytes()))
    text = client.get("/metrics").text
    assert 'splitz_requests_total{method="POST",route="/certify",status="200"} 1.0' in text
    assert 'splitz_jobs_total{status="finished"} 1.0' in text
    assert "splitz_samples_total 200.0" in text and "splitz_queue_depth" in text
    assert client.get("/openapi.json").json()["info"]["title"] == "splitz"
    assert client.get("/docs").status_code == 200



def test_radius_query_stops_early(client):
    r = client.post("/certify", params={"model": TINY, "radius": 0.05, "early_stop": "true",
                                        "n": 100_000}, files=upload(png_bytes()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["certified"] is True and body["samples"] < 100_000 and body["looks"] >= 1
    r = client.post("/certify", params={"model": TINY, "early_stop": "true"},
                    files=upload(png_bytes()))
    assert r.status_code == 422 and "radius" in r.json()["error"]


def test_embedded_wait_returns_when_the_job_ends_not_at_the_deadline(repository):
    backend = EmbeddedBackend(Settings(model_dir=repository))
    try:
        spec = dict(model_id=TINY, images=[b64(png_bytes())], n=200)
        running = backend.submit(JobSpec(**spec | {"n": 20_000}))
        queued = backend.submit(JobSpec(**spec))  # behind it: one worker thread
        start = time.monotonic()
        backend.cancel(queued)
        assert backend.wait(queued, start + 120).status == "canceled"
        assert backend.wait(running, start + 120).status == "finished"
        assert time.monotonic() - start < 60  # woken by the job, long before the deadline
        assert backend.wait("no-such-job", start + 120) is None
    finally:
        backend.close()
