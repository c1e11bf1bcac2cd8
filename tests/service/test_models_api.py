"""PUT and DELETE /models/{id} over the embedded backend: admin keys, the checks of splitz
import with nothing written on any error, the size limit, atomic replacement, and jobs that run
only on the model version they were submitted for."""

import io
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from splitz import checkpoint

from .conftest import TINY, TINY_RS, confident_lenet, make_repository, png_bytes, sha256, upload

ADMIN, USER = {"X-API-Key": "adm1n"}, {"X-API-Key": "us3r"}
KEYS = {"api_keys": ["us3r"], "admin_keys": ["adm1n"]}


@pytest.fixture
def repository(tmp_path) -> Path:
    """A repository of this test's own: these tests change it."""
    return make_repository(tmp_path / "models")


@pytest.fixture
def client(make_client):
    return make_client(**KEYS)


def tree(root: Path) -> list[tuple[str, int]]:
    """Every path under the repository, hidden ones too, with its size."""
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def certify(client, model_id: str, **params) -> dict:
    r = client.post("/certify", params={"model": model_id, "n": 100} | params, headers=USER,
                    files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = client.get(f"/jobs/{job_id}", headers=USER).json()
        if body["status"] in ("finished", "failed", "canceled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not done: {body}")


def test_uploads_and_deletions_need_an_admin_key(make_client, repository):
    before = tree(repository)
    closed = make_client(**KEYS | {"admin_keys": []})  # no admin key configured: refused, not open
    assert closed.put("/models/new", files=upload(), headers=ADMIN).status_code == 403
    assert closed.delete(f"/models/{TINY}", headers=ADMIN).status_code == 403
    client = make_client(**KEYS)
    assert client.put("/models/new", files=upload()).status_code == 401
    for key in (USER, {"X-API-Key": b"adm1n\xe9"}):  # a certify key; a non-ASCII byte
        r = client.put("/models/new", files=upload(), headers=key)
        assert r.status_code == 403 and "admin" in r.json()["error"]
        assert client.delete(f"/models/{TINY}", headers=key).status_code == 403
    assert tree(repository) == before
    r = client.put("/models/new", files=upload(), headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == sha256(repository, "new") and r.json()["replaced"] is False
    assert "new" in [m["id"] for m in client.get("/models", headers=USER).json()]
    assert client.get("/models", headers=ADMIN).status_code == 401  # admin keys only administer


def pickled_module() -> bytes:
    buf = io.BytesIO()
    torch.save(confident_lenet("input"), buf)  # a whole module: unpickling it runs code
    return buf.getvalue()


def files(weights: bytes | None = None, card: str | None = None, **fields) -> dict:
    out = upload(**fields)
    if weights is not None:
        out["weights"] = ("w.bin", weights, "application/octet-stream")
    if card is not None:
        out["card"] = (None, card)  # a plain text field, not a file
    return out


GOOD = upload()["weights"][1]
WIDE = save(torch.nn.Linear(2, 2).state_dict())


@pytest.mark.parametrize("body,status,match", [
    (files(GOOD[: len(GOOD) // 2]), 422, "not a readable safetensors file"),
    (files(pickled_module()), 422, "refused, reading it would run code"),
    (files(save(confident_lenet("input").state_dict()), arch_kwargs={"width": 8}), 422,
     "shape"),
    (files(WIDE), 422, "weights do not fit lenet"),
    (files(card="{not json"), 422, "card: not valid JSON"),
    (files(card="[1, 2]"), 422, "card: must be a JSON object"),
    (files(card=json.dumps({"sigma": 0.5})), 422, "card field arch"),
    (files(sigma=-1), 422, "card field sigma"),
    (files(id="other"), 422, "card field id: 'other' is not the id in the path"),
    ({"card": upload()["card"]}, 422, "weights: a file is required"),
])
def test_each_invalid_upload_is_a_4xx_naming_the_problem_and_writes_nothing(
        client, repository, body, status, match):
    before = tree(repository)
    r = client.put("/models/new", files=body, headers=ADMIN)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]
    assert tree(repository) == before


def test_an_invalid_id_or_a_body_that_is_not_multipart_is_refused(client, repository):
    before = tree(repository)
    r = client.put("/models/Bad_ID", files=upload(), headers=ADMIN)
    assert r.status_code == 422 and "card field id: 'Bad_ID' is no model id" in r.json()["error"]
    r = client.put("/models/new", json={"weights": "x"}, headers=ADMIN)
    assert r.status_code == 415
    assert tree(repository) == before


def test_an_upload_over_its_own_size_limit_is_a_413_while_streaming(make_client, repository):
    size = len(GOOD)
    before = tree(repository)
    small = make_client(**KEYS, max_model_bytes=size // 2)
    r = small.put("/models/new", files=upload(), headers=ADMIN)  # Content-Length declared
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(size // 1000 + 1):
            yield b"x" * 1000

    r = small.put("/models/new", content=chunks(), headers=ADMIN | {
        "Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert tree(repository) == before
    # the upload limit is not the certify limit, either way
    big = make_client(**KEYS, max_body_bytes=size // 2, max_model_bytes=size * 4)
    assert big.put("/models/new", files=upload(), headers=ADMIN).status_code == 201


def test_overwrite_is_refused_unless_asked_then_atomic(client, repository):
    old = sha256(repository, TINY)
    r = client.put(f"/models/{TINY}", files=upload(label=3), headers=ADMIN)
    assert r.status_code == 409 and "overwrite=true" in r.json()["error"]
    assert sha256(repository, TINY) == old and certify(client, TINY)["prediction"] == 7
    r = client.put(f"/models/{TINY}", files=upload(label=3), params={"overwrite": "true"},
                   headers=ADMIN)
    assert r.status_code == 200 and r.json()["replaced"] is True
    new = r.json()["sha256"]
    assert new != old and sha256(repository, TINY) == new
    cert = certify(client, TINY)
    assert (cert["prediction"], cert["model_sha256"]) == (3, new)
    assert [p.name for p in repository.iterdir() if p.name.startswith(".")] == []


def test_jobs_submitted_before_a_replacement_run_on_their_version(client, repository):
    """The embedded backend holds the old version while its jobs run; a job submitted after
    the replacement loads the new one."""
    old = sha256(repository, TINY)
    slow = client.post("/jobs", params={"model": TINY, "n": 20_000, "wait": "false"},
                       headers=USER, files=[("images", ("a.png", png_bytes(i), "image/png"))
                                            for i in range(3)]).json()["id"]
    while client.get(f"/jobs/{slow}", headers=USER).json()["status"] == "queued":
        time.sleep(0.02)
    queued = client.post("/jobs", params={"model": TINY}, headers=USER,
                         files=[("images", ("b.png", png_bytes(), "image/png"))]).json()["id"]
    r = client.put(f"/models/{TINY}", files=upload(label=3), params={"overwrite": "true"},
                   headers=ADMIN)
    assert r.status_code == 200, r.text
    after = client.post("/jobs", params={"model": TINY}, headers=USER,
                        files=[("images", ("c.png", png_bytes(), "image/png"))]).json()["id"]
    for job_id, version, label in ((slow, old, 7), (queued, old, 7),
                                   (after, r.json()["sha256"], 3)):
        body = wait_for(client, job_id)
        assert body["status"] == "finished", body
        assert {(c["model_sha256"], c["prediction"]) for c in body["results"]} == {
            (version, label)}


def test_delete_removes_the_model_and_its_queued_jobs_fail(client, repository):
    assert client.put("/models/doomed", files=upload(), headers=ADMIN).status_code == 201
    slow = client.post("/jobs", params={"model": TINY, "n": 20_000}, headers=USER,
                       files=[("images", ("a.png", png_bytes(i), "image/png"))
                              for i in range(3)]).json()["id"]
    queued = client.post("/jobs", params={"model": "doomed"}, headers=USER,
                         files=[("images", ("b.png", png_bytes(), "image/png"))]).json()["id"]
    assert client.delete("/models/doomed", headers=ADMIN).status_code == 204
    assert wait_for(client, slow)["status"] == "finished"
    body = wait_for(client, queued)
    assert (body["status"], body["error_status"]) == ("failed", 404)
    assert body["error"] == "model 'doomed' was deleted after this job was submitted"
    assert "doomed" not in [m["id"] for m in client.get("/models", headers=USER).json()]
    r = client.post("/certify", params={"model": "doomed"}, headers=USER,
                    files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 404
    assert client.delete("/models/doomed", headers=ADMIN).status_code == 404
    assert sorted(p.name for p in repository.iterdir()) == sorted([TINY, "tiny-rs"])


def test_a_wrappers_key_prefix_is_named_then_stripped_on_request(client, repository):
    state = {f"module.{k}": v for k, v in confident_lenet("input").state_dict().items()}
    body = files(save(state))
    r = client.put("/models/wrapped", files=body, headers=ADMIN)
    assert r.status_code == 422 and "starts with 'module.'" in r.json()["error"]
    r = client.put("/models/wrapped", files=body, params={"strip_prefix": "module."},
                   headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["card"]["training"]["strip_prefix"] == "module."


def test_the_api_removes_what_a_crash_left_in_the_repository_at_start(make_client, repository):
    """An import or a delete killed midway left its hidden folder for good (a whole model's
    weights). The API removes them when it starts, but not an import another process is
    writing."""
    stale = [repository / ".import-tiny-k3j2x9", repository / f".deleted-{TINY}-0123456789abcdef"]
    for folder in stale:
        shutil.copytree(repository / TINY, folder)
    busy = repository / ".import-new-abcd12"
    busy.mkdir()
    with checkpoint.in_use(busy):
        client = make_client(model_dir=repository)
    assert sorted(p.name for p in repository.iterdir()) == sorted([busy.name, TINY, TINY_RS])
    assert [m["id"] for m in client.get("/models").json()] == [TINY, TINY_RS]
