"""The model repository: one folder per model with `model.safetensors` and `card.json`.

Weights load with safetensors (no code execution); the card says how to rebuild the module: the
architecture, the split, sigma, and the input the certificate is about (shape, classes, the
normalization applied inside the model, preprocessing). A known data set (mnist, cifar10) gives
the defaults of the last four, so cards written before they existed stay valid.

A model folder is written whole under a hidden name and then published in one rename; a
replacement swaps the two folders in one step (Linux renameat2, RENAME_EXCHANGE). Readers open a
folder once and its files inside it (open_version), so each sees one whole version: never no
model, never the card of one version with the weights of another.
"""

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from . import data
from .errors import CheckpointError, UnknownModelError, first_line
from .images import Preprocess
from .nets import SplitModel, create_model, normalization_mismatch

WEIGHTS, CARD = "model.safetensors", "card.json"
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# What lipschitz.F1Bound does for each split: the card's default bound_method.
BOUND_METHODS = {
    "conv1": "local: banded Cholesky proof on the masked Gram A^T M A (float64, +1e-6 rel.)",
    "input": "none needed: f1 is the identity (L = 1), plain randomized smoothing",
}
PIXEL_RANGE = (0.0, 1.0)
READ_TRIES = 3  # a folder replaced this many times while one reader opens it is an error
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2(2) flags (linux/fs.h)
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841: a card's "classes" beyond this is an error

# Hidden folders beside the models, never models (no MODEL_ID starts with "."): an import being
# written, and a deleted model being removed. A crash can leave them (remove_stale).
IMPORT_PREFIX, DELETED_PREFIX = ".import-", ".deleted-"


class ModelCard(BaseModel):
    """What a model is, how it was made, and what it measured."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a default
    id: str
    arch: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    dataset: str  # mnist / cifar10 (defaults for the four fields below), or any label
    split: str
    sigma: float = Field(gt=0, allow_inf_nan=False)  # noise std on [0, 1] pixels (PIXEL_RANGE)
    input_shape: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None  # (C, H, W)
    classes: list[str] | None = None  # names; a number n means "0" .. "n-1"
    mean: list[FiniteFloat] | None = None  # normalization inside the model, per channel
    std: list[PositiveFloat] | None = None
    # The certificate is stated for pixels in [0, 1]; a model trained on other scalings says so
    # through mean / std (inputs in [-1, 1] = mean 0.5, std 0.5).
    pixel_range: tuple[float, float] = PIXEL_RANGE
    preprocess: Preprocess | None = None  # before certification: radii are in its output's pixels
    bound_method: str = BOUND_METHODS["conv1"]  # default: BOUND_METHODS[split]
    precision: Literal["float32", "bfloat16"] = "float32"  # f2's; see default_precision
    batch_size: int = Field(1000, ge=1)  # samples per forward pass (bench/engine.py --record)
    description: str = ""
    training: dict[str, Any] = Field(default_factory=dict)  # command, config, time, hardware
    metrics: dict[str, Any] = Field(default_factory=dict)  # clean / certified accuracy tables

    @model_validator(mode="before")
    @classmethod
    def _bound_method_of_the_split(cls, fields: Any) -> Any:
        if isinstance(fields, dict) and "bound_method" not in fields:
            fields = fields | {"bound_method": BOUND_METHODS.get(fields.get("split"), "")}
        return fields

    @field_validator("classes", mode="before")
    @classmethod
    def _numbered_classes(cls, value: Any) -> Any:
        count = value if isinstance(value, int) else len(value) if isinstance(value, list) else 0
        if count > MAX_CLASSES:  # checked before a number is spelt out as names
            raise ValueError(f"more than {MAX_CLASSES:,} classes")
        return [str(i) for i in range(value)] if isinstance(value, int) else value

    @field_validator("pixel_range")
    @classmethod
    def _unit_pixels(cls, value: tuple[float, float]) -> tuple[float, float]:
        if tuple(value) != PIXEL_RANGE:
            raise ValueError("certificates are stated for pixels in [0, 1]; express another "
                             "input scaling through mean and std (inputs in [-1, 1]: mean 0.5, "
                             "std 0.5)")
        return value

    @model_validator(mode="after")
    def _a_complete_input(self) -> "ModelCard":
        known = data.SPECS.get(self.dataset)
        missing = [k for k in ("input_shape", "classes", "mean", "std")
                   if getattr(self, k) is None and known is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required: data set {self.dataset!r} is not "
                             f"one of {', '.join(data.SPECS)}, which give defaults")
        ds = self.spec()
        channels, size = ds.input_shape[0], ds.input_shape[1:]
        for key in ("mean", "std"):
            if len(getattr(ds, key)) != channels:
                raise ValueError(f"{key} has {len(getattr(ds, key))} values for {channels} "
                                 "channel(s)")
        if ds.num_classes < 2:
            raise ValueError(f"has {ds.num_classes} class(es); a classifier needs at least 2")
        if self.preprocess is not None and self.preprocess.output_size() != size:
            raise ValueError(f"preprocess ({self.preprocess.describe()}) must end at the input "
                             f"size {size[0]}x{size[1]}: end with that center_crop, or resize to "
                             "that (height, width)")
        return self

    def spec(self) -> data.DatasetSpec:
        """The input the model takes: this card's fields, defaulting to its data set's."""
        known = data.SPECS.get(self.dataset)

        def field(key: str) -> Any:
            value = getattr(self, key)
            return tuple(value) if value is not None else getattr(known, key)

        return data.DatasetSpec(self.dataset, field("input_shape"), field("classes"),
                                field("mean"), field("std"))


@dataclass(frozen=True)
class LoadedModel:
    model: SplitModel
    card: ModelCard
    sha256: str  # of the weights file: the model's identity in certificates


def save(model: SplitModel, card: ModelCard, directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS)  # streamed to disk: no copy of the weights in memory
    write_card(card, directory)
    # save_file makes the weights 0600, which a service reading the repository as another user
    # cannot open: they get card.json's mode, which open() gave under the umask
    (directory / WEIGHTS).chmod((directory / CARD).stat().st_mode & 0o777)
    return directory


def write_card(card: ModelCard, directory: Path) -> None:
    text = json.dumps(card.model_dump(exclude_none=True), indent=2)
    tmp = Path(directory) / f".{CARD}.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(Path(directory) / CARD)  # atomic: a reader never sees a half-written card


def update_card(directory: Path, change: Callable[[ModelCard], None],
                weights_sha256: str | None = None) -> ModelCard:
    """Read the card, `change` it and write it back, holding an exclusive flock on the folder
    throughout, so that processes recording into one card (a long evaluation after every image,
    a benchmark) never lose each other's fields. With `weights_sha256`, refuses (CheckpointError)
    when the folder's weights are no longer those: the model was replaced meanwhile."""
    for _ in range(READ_TRIES):
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise CheckpointError(f"cannot open model folder {directory}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _moved(fd, directory):
                continue  # replaced while we waited: lock the folder the path names now
            if weights_sha256 is not None and version(directory)[1] != weights_sha256:
                raise CheckpointError(f"the model in {directory} was replaced: its card no "
                                      "longer describes the weights this run used")
            card = read_card(directory)
            change(card)
            write_card(card, directory)
            return card
        finally:
            os.close(fd)
    raise CheckpointError(f"model folder {directory} was replaced {READ_TRIES} times while its "
                          "card was being updated")


def read_card(directory: Path) -> ModelCard:
    path = Path(directory) / CARD
    if not path.is_file():
        raise CheckpointError(f"no model card at {path}")
    return _parse_card(path.read_bytes(), path)


def _parse_card(text: bytes, path: Path) -> ModelCard:
    try:
        return ModelCard.model_validate_json(text)
    except ValidationError as e:
        raise CheckpointError(f"invalid model card {path}: {card_error(e)}") from None


def card_error(e: ValidationError) -> str:
    """The first problem, with the field it is about ("field sigma: ..."), if one."""
    first = e.errors()[0]
    where = ".".join(map(str, first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return f"field {where}: {message}" if where else message


def load(directory: Path, device: str = "cpu") -> LoadedModel:
    """Rebuild the architecture from the card and load the weights strictly. Card and weights
    come from one version of the folder, and the sha256 is that of the very bytes loaded."""
    directory = Path(directory)
    card, file = open_version(directory)
    with file:
        blob = file.read()
    weights = directory / WEIGHTS
    try:
        model = create_model(card.arch, card.spec(), card.split, card.sigma, **card.arch_kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"model card {directory / CARD} describes no valid model: "
                              f"{first_line(e)}") from None
    try:
        state = load_safetensors(blob)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {weights}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"weights {weights} do not match the card: {first}") from None
    if mismatch := normalization_mismatch(model):
        raise CheckpointError(f"weights {weights} do not match the card: {mismatch}")
    return LoadedModel(model.to(device).eval(), card, hashlib.sha256(blob).hexdigest())


def open_version(directory: Path) -> tuple[ModelCard, BinaryIO]:
    """The card and the open weights file (the caller closes it) of one version of a model
    folder: the folder is opened once and both files inside it. A folder replaced or deleted
    meanwhile (its old files gone) is opened again."""
    directory = Path(directory)
    for _ in range(READ_TRIES):
        try:
            folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise UnknownModelError(f"model directory not found: {directory}") from None
        inside = partial(os.open, dir_fd=folder)
        try:
            with open(CARD, "rb", opener=inside) as f:
                card = _parse_card(f.read(), directory / CARD)
            return card, open(WEIGHTS, "rb", opener=inside)
        except FileNotFoundError as e:
            if not _moved(folder, directory):
                what = "model card" if e.filename == CARD else "weights file"
                raise CheckpointError(f"no {what} at {directory / e.filename}") from None
        except OSError as e:  # a folder named card.json, no permission...
            raise CheckpointError(f"cannot read {directory / str(e.filename or '')}: "
                                  f"{e.strerror}") from None
        finally:
            os.close(folder)
    raise CheckpointError(f"{directory} was replaced {READ_TRIES} times while being read")


def _moved(folder: int, directory: Path) -> bool:
    """Whether `directory` no longer names the folder opened as `folder`."""
    try:
        now, opened = os.stat(directory), os.fstat(folder)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


_DIGESTS: dict[tuple[int, ...], str] = {}  # weights files hashed, by identity on disk
# The card's documentation: evaluate --record rewrites the metrics without making a new version.
NOT_VERSIONED = frozenset({"metrics", "training", "description"})


def version(directory: Path) -> tuple[ModelCard, str]:
    """The card and the weights' sha256 of the model in `directory`, from one version of it.
    The hash is remembered by the file's device, inode, size and times (a new file that reuses
    a deleted one's inode was written later), so a large model is hashed once, not per
    request."""
    card, file = open_version(directory)
    with file:
        st = os.fstat(file.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _DIGESTS:
            if len(_DIGESTS) > 1024:
                _DIGESTS.clear()
            _DIGESTS[key] = hashlib.file_digest(file, "sha256").hexdigest()
    return card, _DIGESTS[key]


def card_digest(card: ModelCard) -> str:
    """The sha256 of the card's fields that make the smoothed classifier and how it is sampled
    (all but NOT_VERSIONED), canonical JSON: with the weights' sha256, a model's version. A card
    replaced over the same weights (a corrected sigma) is a new version."""
    fields = card.model_dump(mode="json", exclude=NOT_VERSIONED)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def publish(folder: Path, target: Path, replace: bool = False) -> bool:
    """Make the complete model `folder` the model at `target` in one atomic rename. An existing
    model is kept (FileExistsError) unless `replace`; then the two folders are swapped in one
    step, and `folder` holds the old version for the caller to delete. Returns whether a model
    was replaced."""
    while True:
        try:
            _rename2(folder, target, RENAME_NOREPLACE)
            return False
        except FileExistsError:
            if not replace:
                raise
        try:
            _rename2(folder, target, RENAME_EXCHANGE)
            return True
        except FileNotFoundError:  # deleted since: published as a new model on the next turn
            pass


def remove(repository: Path, model_id: str) -> None:
    """Delete a model: renamed to a hidden name in one step (readers find it whole or not at
    all), then its files."""
    path = resolve(repository, model_id)
    hidden = path.with_name(f"{DELETED_PREFIX}{model_id}-{secrets.token_hex(8)}")
    try:
        path.rename(hidden)
    except FileNotFoundError:
        raise UnknownModelError(f"unknown model {model_id!r}") from None
    shutil.rmtree(hidden, ignore_errors=True)


@contextmanager
def in_use(folder: Path) -> Iterator[None]:
    """Hold a temporary folder while it is written, so that remove_stale leaves it: an exclusive
    flock on it, which the kernel releases when the process ends, however it ends."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale(repository: Path) -> list[str]:
    """Delete the hidden temporary folders (IMPORT_PREFIX, DELETED_PREFIX) that no process
    holds (in_use): what a crash left. Returns their names."""
    removed = []
    for path in sorted(Path(repository).iterdir()):
        if not path.name.startswith((IMPORT_PREFIX, DELETED_PREFIX)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # not a folder, or gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        except BlockingIOError:  # an import is writing it
            pass
        finally:
            os.close(fd)
    return removed


def _rename2(src: Path, dst: Path, flags: int) -> None:
    """Linux renameat2(2), atomic: RENAME_NOREPLACE fails with EEXIST rather than replace
    `dst`; RENAME_EXCHANGE swaps two existing paths."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        raise OSError(errno.ENOSYS, "publishing a model needs Linux renameat2", str(dst))
    at_cwd = -100  # AT_FDCWD: paths relative to the working directory
    if rename(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), ctypes.c_uint(flags)):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def resolve(repository: Path, model_id: str) -> Path:
    """The folder of `model_id` in the repository; ids cannot name a path outside it."""
    if not MODEL_ID.match(model_id):
        raise UnknownModelError(f"invalid model id {model_id!r}")
    path = Path(repository) / model_id
    if not (path / CARD).is_file():
        raise UnknownModelError(f"unknown model {model_id!r}")
    return path


def list_cards(repository: Path) -> list[ModelCard]:
    """The models; folders whose names are no model id (an import's hidden temporary) are not."""
    return [read_card(p) for p in sorted(Path(repository).iterdir())
            if MODEL_ID.match(p.name) and (p / CARD).is_file()]


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
