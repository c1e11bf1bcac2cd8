"""Models added, replaced and deleted while the stack runs (Redis, uvicorn, an RQ worker): the
worker serves them without a restart, and every job runs on the version it was submitted for."""

import pytest
from safetensors.torch import save

from splitz.importer import import_model

from .conftest import LENET, confident_lenet, make_repository, png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(make_stack, tmp_path):
    """One worker over a repository of this test's own."""
    return make_stack(model_dir=make_repository(tmp_path / "models"))


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
