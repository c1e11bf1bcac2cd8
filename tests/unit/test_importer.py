"""splitz import: every family imports and certifies like the same weights loaded the usual way;
every bad input is one error that names the key or field, and leaves nothing behind."""

import errno
import io
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save
from torchvision import models as tv

from splitz import Smooth, checkpoint, importer
from splitz.cli import main
from splitz.errors import CheckpointError, InvalidModelError, ModelExistsError
from splitz.images import save_image
from splitz.nets import create_model, is_network

from ..conftest import SHIPPED_MNIST

CIFAR = {"dataset": "cifar10", "split": "input", "sigma": 0.25}


def card(**over) -> dict:
    return {"id": "m", "arch": "cifar_resnet20"} | CIFAR | over


def pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def net_state(arch: str = "cifar_resnet20", **card_over) -> dict[str, torch.Tensor]:
    """A network's own state dict, as its authors' code saves it."""
    c = checkpoint.ModelCard(**card(arch=arch, **card_over))
    model = create_model(c.arch, c.spec(), c.split, c.sigma, **c.arch_kwargs)
    return (model.f2[1] if is_network(arch) else model).state_dict()


def nothing_written(repo) -> bool:
    return not repo.exists() or not any(repo.iterdir())


FAMILIES = [  # (card fields, state dict maker): each family at a small input
    pytest.param(card(arch="resnet18", dataset="custom", input_shape=[3, 32, 40], classes=5,
                      mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
                 lambda: tv.resnet18(num_classes=5).state_dict(), id="torchvision-resnet18"),
    pytest.param(card(arch="wide_resnet50_2"), lambda: tv.wide_resnet50_2(num_classes=10)
                 .state_dict(), id="torchvision-wide_resnet50_2", marks=pytest.mark.slow),
    pytest.param(card(), lambda: net_state(), id="cifar_resnet20"),
    pytest.param(card(arch="lenet", dataset="mnist", split="conv1", arch_kwargs={"width": 4}),
                 lambda: net_state("lenet", dataset="mnist", split="conv1",
                                   arch_kwargs={"width": 4}), id="lenet-conv1"),
    pytest.param(card(arch="resnet", arch_kwargs={"depth": 8}),
                 lambda: net_state("resnet", arch_kwargs={"depth": 8}), id="resnet-input"),
]


@pytest.mark.parametrize("fields,make_state", FAMILIES)
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_each_family_imports_and_computes_what_its_weights_compute(tmp_path, fields, make_state,
                                                                   fmt):
    state = make_state()
    for key, v in state.items():  # BatchNorm's init is the same in every build: change it
        if v.is_floating_point() and not key.endswith((".mean", ".std")):  # not Normalize's
            v.mul_(torch.empty_like(v).uniform_(0.5, 1.5))
    data = save(state) if fmt == "safetensors" else pt({"state_dict": state, "epoch": 90})
    done = importer.import_model(data, fields, tmp_path)
    loaded = checkpoint.load(tmp_path / "m")
    assert loaded.sha256 == done.sha256 and done.card.spec() == loaded.card.spec()
    target = loaded.model.f2[1] if is_network(fields["arch"]) else loaded.model
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    assert loaded.model(torch.rand(2, *loaded.model.input_shape)).shape[1] == \
        loaded.model.num_classes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left


def _certify(loaded: checkpoint.LoadedModel, x: torch.Tensor) -> list[dict]:
    skip = ("time_s", "model_id", "model_sha256")
    certs = Smooth.from_checkpoint(loaded, batch_size=64).certify(x, n0=16, n=200, seed=11)
    return [{k: v for k, v in c.to_dict().items() if k not in skip} for c in certs]


def test_an_imported_shipped_model_certifies_bit_for_bit_like_the_shipped_one(tmp_path):
    """The shipped SPLITZ model's state dict, exported as a .pt and imported, gives the same
    certificates field for field (f1's local bound included) as the shipped folder."""
    shipped = checkpoint.load(SHIPPED_MNIST)
    source = tmp_path / "exported.pt"
    torch.save(load_file(SHIPPED_MNIST / checkpoint.WEIGHTS), source)
    c = shipped.card
    fields = {"id": "again", "arch": c.arch, "arch_kwargs": c.arch_kwargs, "dataset": c.dataset,
              "split": c.split, "sigma": c.sigma}
    importer.import_model(source, fields, tmp_path / "repo")
    imported = checkpoint.load(tmp_path / "repo" / "again")
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert _certify(imported, x) == _certify(shipped, x)
    assert imported.sha256 == shipped.sha256  # the same tensors, written the same way


def test_a_published_network_with_its_prefix_certifies_like_the_usual_path(tmp_path):
    """A cifar_resnet20 checkpoint as locuslab/smoothing saves it (Sequential(normalize, net):
    keys '1.*', in a training checkpoint) imports with --strip-prefix 1. and certifies exactly
    like the same weights saved by checkpoint.save."""
    c = checkpoint.ModelCard(**card(id="usual"))
    model = create_model(c.arch, c.spec(), c.split, c.sigma)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    usual = checkpoint.load(checkpoint.save(model, c, tmp_path / "usual"))
    published = {"epoch": 90, "arch": "cifar_resnet20",
                 "state_dict": {f"1.{k}": v for k, v in model.f2[1].state_dict().items()}}
    importer.import_model(pt(published), card(id="imported"), tmp_path, strip_prefix="1.")
    imported = checkpoint.load(tmp_path / "imported")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert _certify(imported, x) == _certify(usual, x)


def _tamper(key: str, make):
    def change(state):
        state[key] = make(state[key])
        return state
    return change


BAD_WEIGHTS = [
    ("missing key", lambda s: {k: v for k, v in s.items() if k != "bn1.weight"},
     "1 key(s) missing (bn1.weight)"),
    ("unexpected key", lambda s: s | {"extra.weight": torch.zeros(1)},
     "1 key(s) unexpected (extra.weight)"),
    ("shape", _tamper("fc.weight", lambda v: torch.zeros(7, 64)),
     "'fc.weight': shape (7, 64), cifar_resnet20 with this card needs (10, 64)"),
    ("dtype", _tamper("conv1.weight", lambda v: v.half()),
     "'conv1.weight': dtype torch.float16, cifar_resnet20 needs torch.float32"),
    ("nan", _tamper("fc.bias", lambda v: torch.full_like(v, float("nan"))), "non-finite logits"),
]


@pytest.mark.parametrize("what,change,message", BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_weights_that_do_not_fit_are_named(tmp_path, what, change, message):
    data = save(change(dict(net_state())))
    with pytest.raises(InvalidModelError, match="^[^\n]*$") as e:
        importer.import_model(data, card(), tmp_path / "repo")
    assert message in str(e.value)
    assert nothing_written(tmp_path / "repo")


BAD_CARDS = [
    ({"sigma": 0}, "card field sigma: Input should be greater than 0"),
    ({"sigma": float("nan")}, "card field sigma"),
    ({"mean": [0.5, 0.5]}, "mean has 2 values for 3 channel(s)"),
    ({"std": [0.2, 0.0, 0.2]}, "card field std.1: Input should be greater than 0"),
    ({"classes": 1}, "card has 1 class(es); a classifier needs at least 2"),
    ({"classes": 9}, "'fc.weight': shape (10, 64), cifar_resnet20 with this card needs (9, 64)"),
    ({"classes": 10**9}, "more than 100,000 classes"),  # refused before a billion names exist
    ({"arch": "vgg11"}, "card: unknown architecture 'vgg11'"),
    ({"split": "conv1"}, "card: architecture cifar_resnet20 takes split 'input' only"),
    ({"arch_kwargs": {"depth": 8}}, "card field arch_kwargs:"),
    ({"input_shape": [3, 64, 64]}, "a forward pass of cifar_resnet20 on a random 3x64x64 input"),
    ({"dataset": "svhn"}, "input_shape, classes, mean, std required: data set 'svhn'"),
    ({"id": "../escape"}, "card field id: '../escape' is no model id"),
    ({"stdev": [0.2] * 3}, "card field stdev: Extra inputs are not permitted"),
    ({"pixel_range": [-1, 1]}, "mean 0.5, std 0.5"),
    ({"preprocess": {"resize": 40}}, "preprocess (resize 40) must end at the input size 32x32"),
    # torch's RuntimeError while building the layers (was a 500 / a traceback)
    ({"arch": "lenet_small", "split": "conv1", "input_shape": [3, 4, 4]},
     "card: lenet_small cannot be built with these fields (Calculated padded input size"),
    ({"arch": "lenet", "arch_kwargs": {"width": -3}},
     "card: lenet cannot be built with these fields (Trying to create tensor with negative"),
]


@pytest.mark.parametrize("over,message", BAD_CARDS, ids=[next(iter(o)) for o, _ in BAD_CARDS])
def test_card_fields_that_make_no_model_are_named(tmp_path, over, message):
    with pytest.raises(InvalidModelError, match="^[^\n]*$") as e:
        importer.import_model(save(net_state()), card(**over), tmp_path / "repo")
    assert message in str(e.value)
    assert nothing_written(tmp_path / "repo")


def test_split_and_data_set_default_to_input_smoothing_of_a_declared_input(tmp_path):
    fields = {"id": "m", "arch": "cifar_resnet20", "sigma": 0.25}
    with pytest.raises(InvalidModelError, match="input_shape, classes, mean, std required: data "
                                                "set 'custom'"):
        importer.import_model(save(net_state()), fields, tmp_path)
    declared = {"input_shape": [3, 32, 32], "classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3}
    done = importer.import_model(save(net_state()), fields | declared, tmp_path)
    assert (done.card.split, done.card.dataset) == ("input", "custom")


def test_weights_whose_normalization_differs_from_the_card_are_refused(tmp_path):
    state = net_state("lenet", dataset="mnist", split="conv1", arch_kwargs={"width": 4})
    state["f1.0.std"] = torch.full_like(state["f1.0.std"], 0.5)
    fields = card(arch="lenet", dataset="mnist", split="conv1", arch_kwargs={"width": 4})
    with pytest.raises(InvalidModelError, match=r"f1\.0\.std is \(0\.5\), the card's std is "
                                                r"\(0\.3081,\)"):
        importer.import_model(save(state), fields, tmp_path / "repo")
    assert nothing_written(tmp_path / "repo")


class Payload:
    """Pickles to a call of os.system: what a full pickle may do when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    data = pt({"state_dict": net_state(), "hook": Payload(marker)})
    with pytest.raises(InvalidModelError, match=r"refused, reading it would run code \(\S*system"):
        importer.import_model(data, card(), tmp_path / "repo")
    assert not marker.exists() and nothing_written(tmp_path / "repo")
    whole = pt(create_model("cifar_resnet20", "cifar10", "input").f2[1])  # a whole module
    with pytest.raises(InvalidModelError, match=r"would run code \(splitz\.nets\.CifarResNet\)"):
        importer.import_model(whole, card(), tmp_path / "repo")


@pytest.mark.parametrize("data,message", [
    (b"garbage that is no tensor file", "neither safetensors nor a torch file"),
    (b"PK\x03\x04broken zip", "not a readable torch file"),
    (b"\x80\x02.", "not a readable torch file"),  # damaged pickles: IndexError, ...
    (b"\x80\x02J\x01", "not a readable torch file"),  # struct.error
    (b"\x80\x02h\x05.", "not a readable torch file"),  # KeyError
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json", "not a readable safetensors file"),
    (pt({"weights": [1, 2, 3]}), "key 'weights' holds a list, not a tensor"),
    (pt({}), "holds nothing, not a state dict"),
    (pt({0: torch.zeros(1)}), "key 0 is no parameter name"),
    (pt(torch.zeros(3)), "holds a Tensor, not a state dict"),
    (pt({"fc.bias": torch.zeros(10).to_sparse()}), "key 'fc.bias' is not a dense tensor"),
    (pt({"fc.bias": torch.empty(10, device="meta")}), "key 'fc.bias' is not a dense tensor"),
])
def test_files_that_hold_no_state_dict_are_refused(tmp_path, data, message):
    with pytest.raises(InvalidModelError, match="^weights: ") as e:
        importer.import_model(data, card(), tmp_path / "repo")
    assert message in str(e.value) and nothing_written(tmp_path / "repo")


@pytest.mark.parametrize("prefix,why", [
    ("module.", "nn.DataParallel"), ("1.", "nn.Sequential(normalize, net)"),
    ("1.module.", "nn.Sequential(normalize, DataParallel(net))")])
def test_a_wrapper_prefix_is_named_with_the_fix(tmp_path, prefix, why):
    data = pt({f"{prefix}{k}": v for k, v in net_state().items()})
    with pytest.raises(InvalidModelError) as e:
        importer.import_model(data, card(), tmp_path)
    assert f"Every key starts with {prefix!r} ({why}" in str(e.value)
    assert f"--strip-prefix {prefix}" in str(e.value)
    importer.import_model(data, card(), tmp_path, strip_prefix=prefix)
    with pytest.raises(InvalidModelError, match="strip prefix 'net.': weights key '"):
        importer.import_model(data, card(), tmp_path, strip_prefix="net.", force=True)


def test_an_existing_model_is_replaced_only_when_forced(tmp_path):
    first = importer.import_model(save(net_state()), card(), tmp_path)
    with pytest.raises(ModelExistsError, match="model 'm' exists; replace it with --force"):
        importer.import_model(save(net_state()), card(), tmp_path)
    assert checkpoint.sha256(tmp_path / "m" / checkpoint.WEIGHTS) == first.sha256
    second = importer.import_model(save(net_state()), card(sigma=0.5), tmp_path, force=True)
    assert second.sha256 != first.sha256  # a fresh init: other weights
    assert checkpoint.load(tmp_path / "m").card.sigma == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_replaced_model_is_never_missing_nor_mixed(tmp_path):
    """A reader during replacements finds a whole version each time: never no model (the
    replaced folder used to be renamed away before the new one came in: a few misses in 10
    replacements), never one version's card with the other's weights."""
    weights = [save(net_state("lenet", dataset="mnist", arch_kwargs={"width": 4}))
               for _ in range(2)]
    fields = card(arch="lenet", dataset="mnist", arch_kwargs={"width": 4})
    done = importer.import_model(weights[0], fields, tmp_path)
    written = {(done.card.sigma, done.sha256)}  # each card with the weights it came with
    misses, seen, stop = [], set(), threading.Event()

    def read():
        while not stop.is_set():
            try:
                c, sha = checkpoint.version(checkpoint.resolve(tmp_path, "m"))
                seen.add((c.sigma, sha))
            except CheckpointError as e:  # an unknown model, or a folder gone while read
                misses.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(10):
            done = importer.import_model(weights[i % 2], fields | {"sigma": (0.5, 1.0)[i % 2]},
                                         tmp_path, force=True)
            written.add((done.card.sigma, done.sha256))
    finally:
        stop.set()
        reader.join()
    assert misses == []
    assert len(written) == 3 and seen <= written and len(seen) >= 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_failure_while_writing_leaves_no_folder(tmp_path, monkeypatch):
    def broken_load(directory, device="cpu"):
        assert directory.name.startswith(".import-m-")  # hidden: list_cards does not see it
        assert checkpoint.list_cards(directory.parent) == []
        raise checkpoint.CheckpointError("disk trouble")

    monkeypatch.setattr(checkpoint, "load", broken_load)
    with pytest.raises(InvalidModelError, match="the written model does not load: disk trouble"):
        importer.import_model(save(net_state()), card(), tmp_path / "repo")
    assert nothing_written(tmp_path / "repo")


def test_an_import_being_written_is_not_taken_for_what_a_crash_left(tmp_path, monkeypatch):
    """checkpoint.remove_stale (an API starting) while an import writes its hidden folder:
    what a crash left goes, the import's folder stays and the import succeeds."""
    (tmp_path / ".import-old-x1").mkdir()
    load, swept = checkpoint.load, []

    def sweep_then_load(directory, device="cpu"):
        swept.extend(checkpoint.remove_stale(directory.parent))
        return load(directory, device)

    monkeypatch.setattr(checkpoint, "load", sweep_then_load)
    done = importer.import_model(save(net_state()), card(), tmp_path)
    assert swept == [".import-old-x1"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and done.path == tmp_path / "m"


def test_a_repository_that_cannot_be_written_is_the_servers_error_and_keeps_nothing(
        tmp_path, monkeypatch):
    """A file system without renameat2's exchange (EINVAL) is the repository's problem, not the
    weights' (an InputError would answer the uploader 422)."""
    def unsupported(src, dst, flags):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(checkpoint, "_rename2", unsupported)
    with pytest.raises(CheckpointError, match=r"cannot write model 'm' into .*: Invalid argument"):
        importer.import_model(save(net_state()), card(), tmp_path / "repo")
    assert nothing_written(tmp_path / "repo")


@pytest.mark.parametrize("over,warning", [
    ({"mean": [0, 0, 0], "std": [1, 1, 1]}, "declares no normalization"),
    ({"sigma": 0.48}, "sigma 0.48 looks like noise in normalized units (sigma x std = 0.12: was "
                      "0.12 meant?)"),
    ({"sigma": 4.0}, "sigma 4.0 looks like noise in normalized units (sigma x std = 1: was 1.0"),
])
def test_likely_mistakes_are_warned_about(tmp_path, over, warning):
    done = importer.import_model(save(net_state()), card(**over), tmp_path)
    assert len(done.warnings) == 1 and warning in done.warnings[0]


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_usual_sigmas_and_a_declared_normalization_warn_of_nothing(tmp_path, sigma):
    assert importer.import_model(save(net_state()), card(sigma=sigma), tmp_path).warnings == []


def test_cli_import_then_certify_a_preprocessed_image(tmp_path, capsys):
    """The CLI: card fields from a JSON file and flags, preprocessing, the certificate saying
    where its radius lives, and a second import refused with one line and exit code 2."""
    weights = tmp_path / "net.safetensors"
    weights.write_bytes(save(net_state()))
    (tmp_path / "card.json").write_text(json.dumps({"description": "from a paper", "sigma": 9}))
    args = ["import", str(weights), "--card", str(tmp_path / "card.json"), "--id", "net",
            "--arch", "cifar_resnet20", "--dataset", "cifar10", "--sigma", "0.25",
            "--resize", "32", "--center-crop", "32", "--out", str(tmp_path / "repo")]
    assert main(args) == 0
    out = capsys.readouterr().out
    sha = checkpoint.sha256(tmp_path / "repo" / "net" / checkpoint.WEIGHTS)
    assert f"(sha256 {sha})" in out
    written = checkpoint.read_card(tmp_path / "repo" / "net")
    assert (written.description, written.sigma, written.split) == ("from a paper", 0.25, "input")
    assert written.training["imported_from"] == "net.safetensors" and "command" in written.training
    image = tmp_path / "photo.png"
    save_image(torch.rand(3, 40, 48), image)  # resized to 32 on the short side, then cropped
    assert main(["certify", str(image), "--model", str(tmp_path / "repo" / "net"), "--n", "20",
                 "--n0", "5", "--json", "--quiet", "--seed", "0"]) == 0
    cert = json.loads(capsys.readouterr().out)
    assert cert["preprocess"] == "resize 32, center crop 32" and cert["lipschitz"] == 1.0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "splitz: error: model 'net' exists" in err


@pytest.mark.parametrize("extra,message", [
    (["--sigma", "-1"], "card field sigma: Input should be greater than 0"),
    (["--mean", "0.5", "--std", "0.2"], "mean has 1 values for 3 channel(s)"),
    (["--arch", "resnet18", "--input-shape", "3", "32", "32"], "weights do not fit resnet18"),
])
def test_cli_import_errors_are_one_line_with_exit_code_2(tmp_path, capsys, extra, message):
    weights = tmp_path / "net.pt"
    torch.save(net_state(), weights)
    args = ["import", str(weights), "--id", "net", "--arch", "cifar_resnet20", "--dataset",
            "cifar10", "--sigma", "0.25", "--out", str(tmp_path / "repo"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert nothing_written(tmp_path / "repo")


def test_a_repository_path_that_is_a_file_is_named_as_such(tmp_path):
    repo = tmp_path / "repo"
    repo.write_text("not a folder")
    with pytest.raises(InvalidModelError, match="is a file, not a model repository"):
        importer.import_model(save(net_state()), card(), repo)
