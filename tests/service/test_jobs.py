"""worker/jobs.py: a job runs on the model version it names, or fails saying why."""

from splitz import checkpoint
from worker.jobs import JobSpec, ModelCache, run_job

from .conftest import TINY, b64, confident_lenet, make_repository, png_bytes, sha256


def test_a_job_never_runs_on_another_version(tmp_path):
    """A process that does not hold the job's version loads it only if the repository still
    has it; a deleted model's job fails even where it is held."""
    repository = make_repository(tmp_path)
    old = sha256(repository, TINY)
    job = JobSpec(model_id=TINY, model_sha256=old, images=[b64(png_bytes())], n=100)
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
    assert run_job(job, holder) == {
        "error": f"model '{TINY}' was deleted after this job was submitted"}


def test_a_card_edited_over_the_same_weights_is_loaded_afresh(tmp_path):
    """Re-uploading the same weights with a corrected sigma (the importer's warning about
    normalized units invites it) keeps their sha256: the held model kept certifying with the
    old sigma while GET /models showed the new one. Metrics alone are no new version."""
    repository = make_repository(tmp_path)
    version = sha256(repository, TINY)
    job = JobSpec(model_id=TINY, model_sha256=version, images=[b64(png_bytes())], n=100)
    holder = ModelCache(repository)
    held = holder.get(TINY, version)
    card = checkpoint.read_card(repository / TINY)
    card.metrics["note"] = "measured"
    checkpoint.write_card(card, repository / TINY)
    assert holder.get(TINY, version) is held
    card.sigma = 0.25
    checkpoint.write_card(card, repository / TINY)
    assert sha256(repository, TINY) == version
    assert run_job(job, holder)["results"][0]["sigma"] == 0.25
