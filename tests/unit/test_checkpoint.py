"""The model repository: round trips, safe loading, and clear errors for every broken folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from splitz import Smooth, checkpoint, smoothing
from splitz.errors import CheckpointError, UnknownModelError
from splitz.nets import create_model

from ..conftest import ROOT


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


def test_saved_files_are_readable_like_the_card(saved):
    """safetensors' save_file wrote the weights 0600: a service user other than the writer
    (splitz import, splitz train) could read the card and not the weights."""
    _, path = saved
    modes = {name: (path / name).stat().st_mode & 0o777 for name in ("model.safetensors",
                                                                     "card.json")}
    assert modes["model.safetensors"] == modes["card.json"]


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
    checkpoint.write_card(card(arch_kwargs={"width": -3}), path)  # torch's RuntimeError
    with pytest.raises(CheckpointError, match="no valid model: Trying to create tensor"):
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


@pytest.mark.parametrize("native", [True, False])
def test_a_bfloat16_card_certifies_in_bfloat16_only_where_the_hardware_has_it(
        tmp_path, monkeypatch, native):
    monkeypatch.setattr(smoothing, "native_bfloat16", lambda device: native)
    model = create_model("lenet", "mnist", "conv1", 0.5, width=4)
    cards = {p: card(id=f"m-{p}", precision=p, arch_kwargs={"width": 4})
             for p in ("float32", "bfloat16")}
    loaded = {p: checkpoint.load(checkpoint.save(model, c, tmp_path / c.id))
              for p, c in cards.items()}
    used = Smooth.from_checkpoint(loaded["bfloat16"]).certify(torch.rand(1, 28, 28), n0=10,
                                                              n=100)[0].precision
    assert used == ("bfloat16" if native else "float32")  # recorded in the certificate
    assert Smooth.from_checkpoint(loaded["float32"]).precision == "float32"
    assert Smooth.from_checkpoint(loaded["float32"], precision="bfloat16").precision == "bfloat16"


def test_native_bfloat16_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    for flags, native in {"avx2 fma": False, "avx2 avx512f avx512_bf16": True,
                          "avx2 amx_bf16 amx_tile": True}.items():
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu {flags}\n")
        assert smoothing.native_bfloat16(torch.device("cpu"), str(cpuinfo)) is native
    assert not smoothing.native_bfloat16(torch.device("cpu"), str(tmp_path / "absent"))


def _count_into(path, key: str, times: int) -> None:
    for _ in range(times):
        checkpoint.update_card(path, lambda c: c.metrics.update({key: c.metrics.get(key, 0) + 1}))


def test_concurrent_card_updates_lose_nothing(saved):
    import multiprocessing

    _, path = saved
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_count_into, args=(path, key, 40)) for key in "abab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [w.exitcode for w in workers] == [0] * 4
    assert checkpoint.read_card(path).metrics == {"a": 80, "b": 80}
    assert sorted(p.name for p in path.iterdir()) == ["card.json", "model.safetensors"]


def test_a_card_update_for_replaced_weights_is_refused(saved, tmp_path):
    model, path = saved
    sha = checkpoint.load(path).sha256
    checkpoint.update_card(path, lambda c: c.metrics.update(run=1), sha)
    checkpoint.save(create_model("lenet", "mnist", "conv1", 0.5), card(), path)  # new weights
    with pytest.raises(CheckpointError, match="was replaced"):
        checkpoint.update_card(path, lambda c: c.metrics.update(run=2), sha)
    with pytest.raises(CheckpointError, match="cannot open model folder"):
        checkpoint.update_card(tmp_path / "gone", lambda c: None)


def test_a_known_data_set_gives_the_input_and_a_card_may_declare_its_own():
    from splitz.data import SPECS

    assert card().spec() == SPECS["mnist"]
    own = card(dataset="digits", input_shape=(1, 20, 20), classes=3, mean=[0.5], std=[0.25])
    assert own.spec().input_shape == (1, 20, 20) and own.spec().classes == ("0", "1", "2")
    assert card(mean=[0.0], std=[1.0]).spec().mean == (0.0,)  # overrides mnist's
    model = create_model("lenet", own.spec(), "conv1", 0.5)
    assert model(torch.rand(2, 1, 20, 20)).shape == (2, 3)


@pytest.mark.parametrize("over,message", [
    ({"dataset": "digits"}, "input_shape, classes, mean, std required"),
    ({"std": [0.5, 0.5]}, "std has 2 values for 1 channel(s)"),
    ({"classes": ["only"]}, "has 1 class(es)"),
    ({"pixel_range": (0, 255)}, "field pixel_range: certificates are stated for pixels in [0, 1]"),
    ({"preprocess": {"resize": [30, 30]}}, "must end at the input size 28x28"),
    ({"preprocess": {"crop": 28}}, "field preprocess.crop: Extra inputs"),
    ({"sigma_pixels": 0.5}, "field sigma_pixels: Extra inputs are not permitted"),
])
def test_cards_that_describe_no_input(tmp_path, saved, over, message):
    _, path = saved
    (path / "card.json").write_text(json.dumps(card().model_dump() | over))
    with pytest.raises(CheckpointError, match="invalid model card") as e:
        checkpoint.load(path)
    assert message in str(e.value)


def test_the_bound_method_says_what_the_split_does():
    assert card(split="input").bound_method.startswith("none needed: f1 is the identity")
    assert card(split="conv1").bound_method.startswith("local: banded Cholesky")
    assert card(bound_method="kept").bound_method == "kept"


def test_a_normalization_other_than_the_cards_is_refused(saved):
    _, path = saved
    checkpoint.write_card(card(mean=[0.5]), path)  # the weights hold mnist's 0.1307
    with pytest.raises(CheckpointError, match=r"f1\.0\.mean is \(0\.1307\), the card's mean is "
                                              r"\(0\.5,\)"):
        checkpoint.load(path)


def test_hidden_folders_are_not_models(saved):
    _, path = saved
    hidden = path.parent / ".import-m2-x"
    hidden.mkdir()
    checkpoint.write_card(card(id="m2"), hidden)
    assert [c.id for c in checkpoint.list_cards(path.parent)] == ["m1"]


@pytest.mark.parametrize("folder", sorted(p.parent for p in (ROOT / "models").glob("*/card.json")))
def test_every_shipped_model_loads_its_weights_bit_for_bit(folder, tmp_path):
    """Cards written before input_shape, classes, mean, std and preprocess existed: the data
    set's defaults rebuild the same module, which holds exactly the file's tensors, and a card
    written back changes nothing but the added pixel_range."""
    loaded = checkpoint.load(folder)
    stored = load_file(folder / checkpoint.WEIGHTS)
    state = loaded.model.state_dict()
    assert state.keys() == stored.keys()
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    checkpoint.write_card(loaded.card, tmp_path)
    written = json.loads((tmp_path / "card.json").read_text())
    original = json.loads((folder / "card.json").read_text())
    assert written.pop("pixel_range") == original.pop("pixel_range", [0.0, 1.0]) == [0.0, 1.0]
    assert written == original
