from fastapi import APIRouter

from splitz import checkpoint

from ..deps import SettingsDep
from ..limits import ApiKey

router = APIRouter(tags=["models"], dependencies=[ApiKey])


@router.get("/models")
def list_models(settings: SettingsDep) -> list[dict]:
    """The model repository: every model's card."""
    return [c.model_dump() for c in checkpoint.list_cards(settings.model_dir)]
