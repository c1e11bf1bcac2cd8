"""The model repository: one folder per model with `model.safetensors` and `card.json`.

Weights load with safetensors (no code execution); the card says how to rebuild the module.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, UnknownModelError
from .nets import SplitModel, create_model

WEIGHTS, CARD = "model.safetensors", "card.json"
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ModelCard(BaseModel):
    """What a model is, how it was made, and what it measured."""

    id: str
    arch: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    dataset: str
    split: str
    sigma: float = Field(gt=0)
    bound_method: str = ("local: banded Cholesky proof on the masked Gram A^T M A "
                         "(float64, +1e-6 rel.)")
    precision: str = "float32"
    batch_size: int = Field(1000, ge=1)  # samples per forward pass (bench/engine.py --record)
    description: str = ""
    training: dict[str, Any] = Field(default_factory=dict)  # command, config, time, hardware
    metrics: dict[str, Any] = Field(default_factory=dict)  # clean / certified accuracy tables


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
    (Path(directory) / CARD).write_text(json.dumps(card.model_dump(), indent=2) + "\n")


def read_card(directory: Path) -> ModelCard:
    path = Path(directory) / CARD
    if not path.is_file():
        raise CheckpointError(f"no model card at {path}")
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise CheckpointError(f"invalid model card {path}: {e.errors()[0]['msg']}") from None


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
        model = create_model(card.arch, card.dataset, card.split, card.sigma, **card.arch_kwargs)
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
    return LoadedModel(model.to(device).eval(), card, _sha256(weights))


def resolve(repository: Path, model_id: str) -> Path:
    """The folder of `model_id` in the repository; ids cannot name a path outside it."""
    if not MODEL_ID.match(model_id):
        raise UnknownModelError(f"invalid model id {model_id!r}")
    path = Path(repository) / model_id
    if not (path / CARD).is_file():
        raise UnknownModelError(f"unknown model {model_id!r}")
    return path


def list_cards(repository: Path) -> list[ModelCard]:
    return [read_card(p) for p in sorted(Path(repository).iterdir()) if (p / CARD).is_file()]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
