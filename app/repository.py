"""The model repository as the API sees it: a missing folder is the server's fault (503), not
the client's, and makes the API unready."""

from pathlib import Path

from splitz import checkpoint
from splitz.errors import UnknownModelError


class RepositoryUnavailable(Exception):
    """SPLITZ_MODEL_DIR is not a folder."""


def folder(model_dir: Path) -> Path:
    if not Path(model_dir).is_dir():
        raise RepositoryUnavailable("model repository unavailable")
    return Path(model_dir)


def cards(model_dir: Path) -> list[checkpoint.ModelCard]:
    return checkpoint.list_cards(folder(model_dir))


def readiness(model_dir: Path, model_id: str | None) -> tuple[bool, str]:
    """Whether the repository serves `model_id` (or any model)."""
    try:
        if model_id is not None:
            checkpoint.resolve(model_dir, model_id)
        elif not cards(model_dir):
            return False, "no model in the repository"
    except (RepositoryUnavailable, UnknownModelError) as e:
        return False, str(e)
    return True, "models found"


def remove_stale(model_dir: Path) -> list[str]:
    """checkpoint.remove_stale, for the API's start: nothing where the repository is missing or
    cannot be listed (/readyz and GET /models say so)."""
    try:
        return checkpoint.remove_stale(folder(model_dir))
    except (RepositoryUnavailable, OSError):
        return []
