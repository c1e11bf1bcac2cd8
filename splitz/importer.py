"""Make a model of the repository from weights trained elsewhere: `splitz import`, and uploads.

`import_model(weights, fields, repository)` takes a state dict (safetensors bytes, or a torch
file read with `torch.load(weights_only=True)`: tensors and plain containers only, never code)
and card fields, checks everything a certificate depends on, and writes the repository's layout
(the SplitModel's state dict as model.safetensors, and card.json) atomically: a replaced model is
swapped for the new one in one step (checkpoint.publish). Every problem is an InvalidModelError
(ModelExistsError for an existing id not to be replaced) whose one-line message names the key or
field, and leaves the repository as it was; likely mistakes that could also be intended come
back as warnings.

The weights are those of the architecture as its authors name them: for a whole network
(torchvision, cifar_resnet*) the network's own keys, for splitz's architectures the SplitModel's.
"""

import hashlib
import io
import math
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from . import checkpoint, data
from .errors import CheckpointError, InvalidModelError, ModelExistsError, first_line
from .nets import SplitModel, create_model, is_network, normalization_mismatch

DEFAULTS = {"split": "input", "dataset": "custom"}  # plain randomized smoothing, own input fields
WRAPPERS = ("state_dict", "model", "model_state_dict")  # where training checkpoints keep weights
# Key prefixes that wrappers leave, and where they come from.
PREFIXES = {
    "module.": "nn.DataParallel / DistributedDataParallel",
    "1.": "nn.Sequential(normalize, net), as locuslab/smoothing saves",
    "1.module.": "nn.Sequential(normalize, DataParallel(net)), locuslab/smoothing's ImageNet",
    "_orig_mod.": "torch.compile",
}
OPTIONAL = re.compile(r"(^|\.)num_batches_tracked$")  # BatchNorm's counter: unused in eval mode
USUAL_SIGMAS = (0.12, 0.25, 0.5, 1.0)  # the published smoothing models' noise levels
NAMES_SHOWN = 3


@dataclass(frozen=True)
class Package:
    """A checked model and its card, not yet written."""

    model: SplitModel
    card: checkpoint.ModelCard
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Imported:
    path: Path
    card: checkpoint.ModelCard
    sha256: str  # of the written weights: the model's identity in certificates
    warnings: list[str]
    replaced: bool = False  # an existing model of this id was replaced


def import_model(weights: bytes | Path, fields: dict[str, Any], repository: Path,
                 strip_prefix: str = "", force: bool = False, name: str | None = None) -> Imported:
    """Check `weights` (a file, or its bytes called `name`) against the card `fields` and write
    the model into `repository`; an existing model of the same id is replaced only with `force`.
    Fields not given default to DEFAULTS; the card's `training` records where the weights came
    from."""
    source = weights if isinstance(weights, bytes) else _read(Path(weights))
    name = name or ("weights" if isinstance(weights, bytes) else Path(weights).name)
    card = make_card(DEFAULTS | fields)
    card.training |= {"imported_from": name, "source_sha256": hashlib.sha256(source).hexdigest(),
                      **({"strip_prefix": strip_prefix} if strip_prefix else {})}
    target = _target(Path(repository), card.id, force)
    package = build(read_state_dict(source, name), card, strip_prefix)
    return write(package, target, force)


def make_card(fields: dict[str, Any]) -> checkpoint.ModelCard:
    """The card, with the field at fault named when it is invalid."""
    try:
        card = checkpoint.ModelCard.model_validate(fields)
    except ValidationError as e:
        raise InvalidModelError(f"card {checkpoint.card_error(e)}") from None
    if not checkpoint.MODEL_ID.match(card.id):
        raise InvalidModelError(f"card field id: {card.id!r} is no model id (lower-case letters, "
                                "digits, '.', '_', '-'; at most 64, starting with a letter or "
                                "digit)")
    return card


def read_state_dict(source: bytes, name: str = "weights") -> dict[str, Tensor]:
    """The tensors of a safetensors or torch file, unwrapped from a training checkpoint."""
    if source[:4] == b"PK\x03\x04" or source[:1] == b"\x80":  # torch's zip, or a legacy pickle
        try:
            state = torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            needs = re.search(r"GLOBAL (\S+)", str(e))
            raise InvalidModelError(
                f"{name}: refused, reading it would run code"
                f"{f' ({needs.group(1)})' if needs else ''}; only tensors are read: save "
                "model.state_dict(), or safetensors") from None
        except Exception as e:  # a damaged file fails anywhere in the unpickler: IndexError,
            # KeyError, struct.error, AssertionError, ... (all of them a 500 or a traceback)
            raise InvalidModelError(f"{name}: not a readable torch file ({first_line(e)})") \
                from None
    elif source[8:9] == b"{":  # safetensors: an 8-byte header length, then a JSON header
        try:
            state = load_safetensors(source)
        except (SafetensorError, ValueError) as e:
            raise InvalidModelError(f"{name}: not a readable safetensors file ({e})") from None
    else:
        raise InvalidModelError(f"{name}: neither safetensors nor a torch file (.pt, .pth)")
    if isinstance(state, dict):
        state = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state:
        what = "nothing" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise InvalidModelError(f"{name}: holds {what}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str):
            raise InvalidModelError(f"{name}: key {key!r} is no parameter name")
        if not isinstance(value, Tensor):
            raise InvalidModelError(
                f"{name}: key {key!r} holds a {type(value).__name__}, not a tensor (a training "
                f"checkpoint keeps its state dict under one of {', '.join(WRAPPERS)})")
        if value.layout != torch.strided or value.device.type != "cpu":  # sparse, meta...
            raise InvalidModelError(f"{name}: key {key!r} is not a dense tensor "
                                    f"({value.layout}, {value.device.type}): save dense ones")
    return state


def build(state: dict[str, Tensor], card: checkpoint.ModelCard,
          strip_prefix: str = "") -> Package:
    """The model of `card` holding `state`, checked: names, shapes, dtypes, normalization and a
    forward pass on a random input."""
    try:
        model = create_model(card.arch, card.spec(), card.split, card.sigma, **card.arch_kwargs)
    except ValueError as e:
        raise InvalidModelError(f"card: {e}") from None
    except TypeError as e:
        raise InvalidModelError(f"card field arch_kwargs: {e}") from None
    except RuntimeError as e:  # torch, building layers: an input too small, a width of -3
        raise InvalidModelError(f"card: {card.arch} cannot be built with these fields "
                                f"({first_line(e)})") from None
    target: nn.Module = model.f2[1] if is_network(card.arch) else model
    state = _strip(state, strip_prefix)
    _check_names(state, target.state_dict(), card.arch)
    target.load_state_dict(state, strict=False)  # strict by _check_names, counters optional
    if mismatch := normalization_mismatch(model):
        raise InvalidModelError(f"weights {mismatch}")
    _check_forward(model.eval(), card)
    return Package(model, card, _warnings(card))


def write(package: Package, target: Path, force: bool = False) -> Imported:
    """Write the package into a hidden temporary folder beside `target`, load it back as the
    engine will, then publish it: a half-written model is never visible, and a replaced one is
    swapped out in one step (its folder, now the temporary one, is then deleted). A repository
    that cannot be written is the server's problem (CheckpointError), not the weights'."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{checkpoint.IMPORT_PREFIX}{target.name}-",
                                    dir=target.parent))
        with checkpoint.in_use(tmp):  # an API starting meanwhile does not take it for stale
            checkpoint.save(package.model, package.card, tmp)
            written = checkpoint.load(tmp)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from a service's other user
            replaced = checkpoint.publish(tmp, target, replace=force)
    except CheckpointError as e:
        raise InvalidModelError(f"the written model does not load: {e}") from None
    except FileExistsError:
        raise _exists(target.name) from None
    except OSError as e:
        raise CheckpointError(f"cannot write model {target.name!r} into {target.parent}: "
                              f"{e.strerror}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return Imported(target, package.card, written.sha256, package.warnings, replaced)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidModelError(f"{path}: cannot read ({e.strerror})") from None


def _target(repository: Path, model_id: str, force: bool) -> Path:
    """Where the model goes; an existing one is refused before any work unless `force` (and
    again, atomically, when it is published)."""
    target = repository / model_id
    if repository.exists() and not repository.is_dir():  # else mkdir's FileExistsError
        raise InvalidModelError(f"{repository} is a file, not a model repository (a folder)")
    if target.exists() and not force:
        raise _exists(model_id)
    return target


def _exists(model_id: str) -> ModelExistsError:
    return ModelExistsError(f"model {model_id!r} exists; replace it with --force (splitz import) "
                            f"or overwrite=true (PUT /models/{model_id})")


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if not prefix:
        return state
    if other := next((k for k in state if not k.startswith(prefix)), None):
        raise InvalidModelError(f"strip prefix {prefix!r}: weights key {other!r} does not start "
                                "with it")
    return {k[len(prefix):]: v for k, v in state.items()}


def _check_names(state: dict[str, Tensor], expected: dict[str, Tensor], arch: str) -> None:
    missing = [k for k in expected if k not in state and not OPTIONAL.search(k)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(keys)} key(s) {what} ({_some(keys)})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InvalidModelError(f"weights do not fit {arch}: {'; '.join(parts)}"
                                f"{_prefix_hint(list(state), expected)}")
    for key, want in expected.items():  # in the architecture's order: the first layer first
        if (value := state.get(key)) is None:
            continue
        if value.shape != want.shape:
            raise InvalidModelError(f"weights key {key!r}: shape {tuple(value.shape)}, {arch} "
                                    f"with this card needs {tuple(want.shape)}")
        if value.dtype != want.dtype:
            raise InvalidModelError(f"weights key {key!r}: dtype {value.dtype}, {arch} needs "
                                    f"{want.dtype}")


def _prefix_hint(keys: list[str], expected: dict[str, Tensor]) -> str:
    """A prefix whose removal from every key makes the names fit, as advice."""
    parts = keys[0].split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i]) + "."
        if not all(k.startswith(prefix) for k in keys):
            break
        stripped = {k[len(prefix):] for k in keys}
        if stripped <= expected.keys() and all(OPTIONAL.search(k) for k in expected.keys() -
                                               stripped):
            why = PREFIXES.get(prefix, "a wrapper module")
            return f". Every key starts with {prefix!r} ({why}): strip it, --strip-prefix {prefix}"
    return ""


def _check_forward(model: SplitModel, card: checkpoint.ModelCard) -> None:
    shape = model.input_shape
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            logits = model(x)
    except RuntimeError as e:
        raise InvalidModelError(f"a forward pass of {card.arch} on a random "
                                f"{'x'.join(map(str, shape))} input fails (card field "
                                f"input_shape?): {first_line(e)}") from None
    if tuple(logits.shape) != (2, model.num_classes):
        raise InvalidModelError(f"{card.arch} gives outputs of shape {tuple(logits.shape[1:])} "
                                f"for one image, the card declares {model.num_classes} classes")
    if not torch.isfinite(logits).all():
        raise InvalidModelError(f"{card.arch} gives non-finite logits on a random input: "
                                "weights with NaN or inf?")


def _warnings(card: checkpoint.ModelCard) -> list[str]:
    """Likely mistakes that could be meant: no normalization, sigma in normalized units."""
    ds, out = card.spec(), []
    if all(m == 0 for m in ds.mean) and all(s == 1 for s in ds.std):
        usual = data.SPECS.get(card.dataset)
        out.append("the card declares no normalization (mean 0, std 1); a model trained on "
                   "normalized images needs its mean and std declared"
                   + (f" ({card.dataset}: mean {usual.mean}, std {usual.std})" if usual else ""))
    std = sum(ds.std) / len(ds.std)
    near = [s for s in USUAL_SIGMAS if math.isclose(card.sigma * std, s, rel_tol=0.02)]
    if card.sigma > max(USUAL_SIGMAS) or (near and not any(
            math.isclose(card.sigma, s, rel_tol=0.02) for s in USUAL_SIGMAS)):
        hint = (f" (sigma x std = {card.sigma * std:.3g}: was {near[0]} meant?)" if near
                else "")
        out.append(f"sigma {card.sigma} looks like noise in normalized units{hint}. sigma is "
                   "the noise's standard deviation on [0, 1] pixels, before the normalization; "
                   "noise added after normalizing by std is sigma x std on the pixels")
    return out


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:NAMES_SHOWN])
    return shown + (", ..." if len(keys) > NAMES_SHOWN else "")
