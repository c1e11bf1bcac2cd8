"""The model repository: round trips, safe loading, and clear errors for every broken folder."""

import json

import pytest
import torch

from splitz import Smooth, checkpoint
from splitz.errors import CheckpointError, UnknownModelError
from splitz.nets import create_model


def card(**over) -> checkpoint.ModelCard:
    fields = {"id": "m1", "arch": "lenet", "dataset": "mnist", "split": "conv1", "sigma": 0.5}
    return checkpoint.ModelCard(**(fields | over))


@pytest.fixture
def saved(tmp_path):
    model = create_model("lenet", "mnist", "conv1", 0.5).eval()
    return model, checkpoint.save(model, card(), tmp_path / "m1")


def test_round_trip_gives_the_same_function(saved):
    model, path = saved
    loaded = checkpoint.load(path)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.card.id == "m1" and len(loaded.sha256) == 64
    assert (path / "model.safetensors").read_bytes()[:8] != b"PK\x03\x04"  # not a pickle zip


def test_missing_folder_card_and_weights(tmp_path, saved):
    _, path = saved
    with pytest.raises(UnknownModelError, match="not found"):
        checkpoint.load(tmp_path / "nope")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        checkpoint.load(path)
    (path / "card.json").unlink()
    with pytest.raises(CheckpointError, match="no model card"):
        checkpoint.load(path)


def test_corrupt_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)
    (path / "model.safetensors").write_bytes(b"\x80\x04garbage pickle")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)


def test_card_that_does_not_match_the_weights(saved):
    _, path = saved
    checkpoint.write_card(card(arch="resnet", dataset="cifar10"), path)
    with pytest.raises(CheckpointError, match="do not match"):
        checkpoint.load(path)
    checkpoint.write_card(card(arch="nonexistent"), path)
    with pytest.raises(CheckpointError, match="no valid model"):
        checkpoint.load(path)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"id": "x"}),
                                  json.dumps({"id": "x", "arch": "lenet", "dataset": "mnist",
                                              "split": "conv1", "sigma": -1})])
def test_invalid_cards(saved, text):
    _, path = saved
    (path / "card.json").write_text(text)
    with pytest.raises(CheckpointError, match="invalid model card"):
        checkpoint.load(path)


@pytest.mark.parametrize("bad_id", ["../m1", "/etc", "m1/../../x", "", ".hidden", "M1", "a" * 80])
def test_model_ids_cannot_escape_the_repository(saved, bad_id):
    _, path = saved
    with pytest.raises(UnknownModelError):
        checkpoint.resolve(path.parent, bad_id)
    assert checkpoint.resolve(path.parent, "m1") == path
    assert [c.id for c in checkpoint.list_cards(path.parent)] == ["m1"]


def test_the_cards_batch_size_is_the_engines_default(tmp_path):
    model = create_model("lenet", "mnist", "conv1", 0.5, width=4)
    tuned_card = card(batch_size=37, arch_kwargs={"width": 4})
    loaded = checkpoint.load(checkpoint.save(model, tuned_card, tmp_path / "m1"))
    tuned = Smooth.from_checkpoint(loaded)
    assert tuned.batch_size == 37
    assert Smooth.from_checkpoint(loaded, batch_size=50).batch_size == 50
    cert = tuned.certify(torch.rand(1, 28, 28), n0=10, n=100)[0]
    assert cert.batch_size == 37  # recorded: with the seed it reproduces the draws
    with pytest.raises(ValueError):
        card(batch_size=0)
