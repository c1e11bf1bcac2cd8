"""Models added, replaced and deleted while the stack runs (Redis, uvicorn, an RQ worker): the
worker serves them without a restart, and every job runs on the version it was submitted for."""

import threading
import time

import pytest
from safetensors.torch import save

from splitz.importer import import_model

from .conftest import (
    LENET,
    TINY_RS,
    confident_lenet,
    files,
    make_repository,
    png_bytes,
    sha256,
    upload,
)

pytestmark = pytest.mark.slow
ADMIN = {"X-API-Key": "adm1n"}


@pytest.fixture
def stack(make_stack, tmp_path):
    """One worker over a repository of this test's own, with an admin key."""
    return make_stack(model_dir=make_repository(tmp_path / "models"), admin_keys='["adm1n"]')


def certified_by(body: dict) -> set[tuple[str, int]]:
    return {(c["model_sha256"], c["prediction"]) for c in body["results"]}


def test_replace_while_the_worker_runs_jobs_on_the_old_version(stack, tmp_path):
    """Old jobs (running, and queued behind) finish on the old weights, jobs submitted after
    the replacement use the new, and requests around it never meet a missing model."""
    old = sha256(tmp_path / "models", TINY_RS)
    running = stack.http.post("/jobs", params={"model": TINY_RS, "n": 20_000},
                              files=files(4)).json()["id"]
    while stack.http.get(f"/jobs/{running}").json()["status"] == "queued":
        time.sleep(0.05)
    queued = stack.http.post("/jobs", params={"model": TINY_RS, "n": 200},
                             files=files(2)).json()["id"]
    statuses, around, stop = [], [], threading.Event()

    def poll():  # GET /readyz and POST /jobs for the model all through the replacement
        while not stop.is_set():
            statuses.append(stack.http.get("/readyz", params={"model": TINY_RS}).status_code)
            r = stack.http.post("/jobs", params={"model": TINY_RS, "n": 100}, files=files(1))
            statuses.append(r.status_code)
            around.append(r.json().get("id"))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        r = stack.http.put(f"/models/{TINY_RS}", files=upload(label=3), headers=ADMIN,
                           params={"overwrite": "true"})
    finally:
        stop.set()
        poller.join()
    assert r.status_code == 200, r.text
    new = r.json()["sha256"]
    assert new != old and set(statuses) == {200, 202}
    after = stack.http.post("/jobs", params={"model": TINY_RS, "n": 200},
                            files=files(2)).json()["id"]
    assert certified_by(stack.wait_job(running)) == {(old, 7)}
    assert certified_by(stack.wait_job(queued)) == {(old, 7)}
    assert certified_by(stack.wait_job(after)) == {(new, 3)}
    for job_id in around:  # each on one version or the other, as its certificates say
        assert certified_by(stack.wait_job(job_id)) in ({(old, 7)}, {(new, 3)})


def test_a_model_added_after_boot_is_served_without_a_restart(stack, tmp_path):
    """Workers listened to one queue per model found at boot: a later model's jobs waited on a
    queue nobody read."""
    fields = LENET | {"id": "late", "split": "input"}
    done = import_model(save(confident_lenet("input", 5).state_dict()), fields,
                        tmp_path / "models")
    cert = stack.http.post("/certify", params={"model": "late", "n": 200},
                           files={"image": ("a.png", png_bytes(), "image/png")})
    assert cert.status_code == 200, cert.text
    assert (cert.json()["prediction"], cert.json()["model_sha256"]) == (5, done.sha256)


def test_delete_fails_the_queued_jobs_of_the_model(stack):
    assert stack.http.put("/models/doomed", files=upload(), headers=ADMIN).status_code == 201
    busy = stack.http.post("/jobs", params={"model": TINY_RS, "n": 20_000},
                           files=files(4)).json()["id"]
    queued = stack.http.post("/jobs", params={"model": "doomed", "n": 200},
                             files=files(1)).json()["id"]
    assert stack.http.delete("/models/doomed", headers=ADMIN).status_code == 204
    assert stack.wait_job(busy)["status"] == "finished"
    body = stack.wait_job(queued)
    assert (body["status"], body["error_status"]) == ("failed", 404)
    assert body["error"] == "model 'doomed' was deleted after this job was submitted"
    assert stack.http.get("/readyz", params={"model": "doomed"}).status_code == 503
