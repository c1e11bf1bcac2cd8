from fastapi import APIRouter

from splitz import checkpoint

from ..deps import SettingsDep
from ..limits import ApiKey
from ..repository import cards
from ..schemas import errors

router = APIRouter(tags=["models"], dependencies=[ApiKey])


@router.get("/models", responses=errors(401, 500, 503))
def list_models(settings: SettingsDep) -> list[checkpoint.ModelCard]:
    """The model repository: every model's card."""
    return cards(settings.model_dir)
