"""worker/jobs.py: a job runs on the model version it names, or fails saying why."""

import time
from pathlib import Path

import pytest

from splitz import checkpoint
from worker.jobs import JobSpec, ModelCache, run_job

from .conftest import TINY, b64, confident_lenet, make_repository, png_bytes, sha256, version


def test_a_job_never_runs_on_another_version(tmp_path):
    """A process that does not hold the job's version loads it only if the repository still
    has it; a deleted model's job fails even where it is held."""
    repository = make_repository(tmp_path)
    old = sha256(repository, TINY)
    job = JobSpec(model_id=TINY, **version(repository, TINY), images=[b64(png_bytes())], n=100)
    holder = ModelCache(repository)
    assert run_job(job, holder)["results"][0]["model_sha256"] == old  # now held
    new = checkpoint.save(confident_lenet("conv1", 3),
                          checkpoint.read_card(repository / TINY), repository / ".new")
    checkpoint.publish(new, repository / TINY, replace=True)
    assert run_job(job, holder)["results"][0]["model_sha256"] == old  # the held version
    fresh = run_job(job, ModelCache(repository))
    assert fresh["error"].startswith(f"model '{TINY}' was replaced after this job was submitted")
    assert old in fresh["error"] and sha256(repository, TINY) in fresh["error"]
    checkpoint.remove(repository, TINY)
    assert run_job(job, holder)["error"] == (
        f"model '{TINY}' was deleted after this job was submitted")


def test_a_card_replaced_over_the_same_weights_is_another_version(tmp_path):
    """A job named only the weights' sha256, which a card replaced over the same weights (a
    corrected sigma) keeps: a job submitted before ran with the new card, a version it was not
    submitted for. Now it runs on the version it names, held, or fails; metrics alone are no
    new version."""
    repository = make_repository(tmp_path)
    job = JobSpec(model_id=TINY, **version(repository, TINY), images=[b64(png_bytes())], n=100)
    holder = ModelCache(repository)
    held = holder.get(TINY, job.version)
    card = checkpoint.read_card(repository / TINY)
    card.metrics["note"] = "measured"
    checkpoint.write_card(card, repository / TINY)
    assert version(repository, TINY) == job.model_dump(include={"model_sha256", "card_sha256"})
    assert holder.get(TINY, job.version) is held
    card.sigma = 0.25
    checkpoint.write_card(card, repository / TINY)
    now = version(repository, TINY)
    assert now["model_sha256"] == job.model_sha256 and now["card_sha256"] != job.card_sha256
    assert run_job(job, holder)["results"][0]["sigma"] == 0.5  # the held version it names
    stale = run_job(job, ModelCache(repository))
    assert "was replaced after this job was submitted (its card changed)" in stale["error"]
    assert run_job(job.model_copy(update=now), holder)["results"][0]["sigma"] == 0.25


def test_the_api_puts_the_weights_and_the_card_in_a_jobs_version(make_client, repository,
                                                                  monkeypatch):
    client = make_client()
    backend, specs = client.app.state.backend, []
    submit = backend.submit
    monkeypatch.setattr(backend, "submit", lambda spec: specs.append(spec) or submit(spec))
    r = client.post("/jobs", params={"model": TINY, "n": 100},
                    files=[("images", ("a.png", png_bytes(), "image/png"))])
    assert r.status_code == 202, r.text
    card = checkpoint.read_card(repository / TINY)
    assert specs[0].version == (sha256(repository, TINY), checkpoint.card_digest(card))


def replace_weights(repository: Path) -> None:
    new = checkpoint.save(confident_lenet("conv1", 3),
                          checkpoint.read_card(repository / TINY), repository / ".new")
    checkpoint.publish(new, repository / TINY, replace=True)


def replace_card(repository: Path) -> None:
    card = checkpoint.read_card(repository / TINY)
    card.sigma = 0.25
    checkpoint.write_card(card, repository / TINY)


@pytest.mark.parametrize("change,status,says", [
    (replace_weights, 409, "was replaced after this job was submitted (its weights changed)"),
    (replace_card, 409, "was replaced after this job was submitted (its card changed)"),
    (lambda repository: checkpoint.remove(repository, TINY), 404,
     "was deleted after this job was submitted"),
])
def test_a_model_changed_before_its_job_runs_is_a_4xx_on_both_paths(
        make_client, tmp_path, monkeypatch, change, status, says):
    """Between submission and run: POST /certify answered 500 and the job said only
    'failed'. Now the job's error carries the status a request gets for it."""
    client = make_client(model_dir=make_repository(tmp_path))
    models = client.app.state.backend.models
    get = models.get

    def changed_first(model_id, version=None):  # the model changes once the job is queued
        change(tmp_path)
        monkeypatch.setattr(models, "get", get)
        return get(model_id, version)

    image = [("image", ("a.png", png_bytes(), "image/png"))]
    monkeypatch.setattr(models, "get", changed_first)
    r = client.post("/certify", params={"model": TINY, "n": 100}, files=image)
    assert r.status_code == status and says in r.json()["error"]
    make_repository(tmp_path)  # the model as it was, for the batch job
    monkeypatch.setattr(models, "get", changed_first)
    r = client.post("/jobs", params={"model": TINY, "n": 100},
                    files=[("images", f) for _, f in image])
    body = client.app.state.backend.wait(r.json()["id"], time.monotonic() + 60)
    job = client.get(f"/jobs/{body.id}").json()
    assert (job["status"], job["error_status"]) == ("failed", status) and says in job["error"]
