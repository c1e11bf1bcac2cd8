"""The model repository: one folder per model with `model.safetensors` and `card.json`.

Weights load with safetensors (no code execution); the card says how to rebuild the module: the
architecture, the split, sigma, and the input the certificate is about (shape, classes, the
normalization applied inside the model, preprocessing). A known data set (mnist, cifar10) gives
the defaults of the last four, so cards written before they existed stay valid.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from safetensors.torch import load_file, save_file

from . import data
from .errors import CheckpointError, UnknownModelError
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
    precision: str = "float32"
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
    save_file(state, directory / WEIGHTS)
    write_card(card, directory)
    return directory


def write_card(card: ModelCard, directory: Path) -> None:
    text = json.dumps(card.model_dump(exclude_none=True), indent=2)
    (Path(directory) / CARD).write_text(text + "\n")


def read_card(directory: Path) -> ModelCard:
    path = Path(directory) / CARD
    if not path.is_file():
        raise CheckpointError(f"no model card at {path}")
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise CheckpointError(f"invalid model card {path}: {card_error(e)}") from None


def card_error(e: ValidationError) -> str:
    """The first problem, with the field it is about ("field sigma: ..."), if one."""
    first = e.errors()[0]
    where = ".".join(map(str, first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return f"field {where}: {message}" if where else message


def load(directory: Path, device: str = "cpu") -> LoadedModel:
    """Rebuild the architecture from the card and load the weights strictly."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UnknownModelError(f"model directory not found: {directory}")
    card = read_card(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no weights file at {weights}")
    try:
        model = create_model(card.arch, card.spec(), card.split, card.sigma, **card.arch_kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"model card {directory / CARD} describes no valid model: {e}") \
            from None
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt weights file {weights}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"weights {weights} do not match the card: {first}") from None
    if mismatch := normalization_mismatch(model):
        raise CheckpointError(f"weights {weights} do not match the card: {mismatch}")
    return LoadedModel(model.to(device).eval(), card, sha256(weights))


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
