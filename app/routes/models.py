"""The model repository: list it (certify keys); add, replace or delete a model (admin keys)."""

import json
import logging
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from splitz import checkpoint
from splitz.errors import InputError
from splitz.importer import import_model

from ..deps import SettingsDep
from ..limits import AdminKey, ApiKey
from ..repository import cards, folder
from ..schemas import ModelUpload, ModelUploaded, errors, request_body

router = APIRouter(tags=["models"])
log = logging.getLogger("splitz.api")
ModelId = Annotated[str, PathParam(description="model id: lower-case letters, digits, '.', '_', "
                                               "'-' (at most 64)")]


@router.get("/models", dependencies=[ApiKey], responses=errors(401, 500, 503))
def list_models(settings: SettingsDep) -> list[checkpoint.ModelCard]:
    """The model repository: every model's card."""
    return cards(settings.model_dir)


@router.put("/models/{model_id}", dependencies=[AdminKey], status_code=201,
            response_model=ModelUploaded,
            responses={200: {"model": ModelUploaded, "description": "replaced (overwrite=true)"},
                       201: {"description": "added"},
                       **errors(400, 401, 403, 409, 413, 415, 422, 500, 503)},
            openapi_extra=request_body(ModelUpload))
async def put_model(model_id: ModelId, request: Request, settings: SettingsDep,
                    overwrite: bool = False, strip_prefix: str = "") -> JSONResponse:
    """Add a model from a state dict trained elsewhere, with the checks of `splitz import`
    (multipart: `weights`, and `card` fields as JSON), or replace one with `overwrite=true`.
    Atomic: requests see the old model or the new, never none; jobs submitted before run on the
    version they were submitted for. `strip_prefix`: a wrapper's key prefix to remove."""
    weights, name, fields = await _read_upload(request, model_id)
    repository = folder(settings.model_dir)
    done = await anyio.to_thread.run_sync(partial(
        import_model, weights, fields, repository, strip_prefix, overwrite, name))
    log.info("model %s %s: sha256 %s", model_id, "replaced" if done.replaced else "added",
             done.sha256)
    body = ModelUploaded(id=model_id, sha256=done.sha256, replaced=done.replaced,
                         warnings=done.warnings, card=done.card)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True),
                        status_code=200 if done.replaced else 201)


@router.delete("/models/{model_id}", dependencies=[AdminKey], status_code=204,
               response_class=Response, responses=errors(401, 403, 404, 422, 503))
def delete_model(model_id: ModelId, settings: SettingsDep) -> Response:
    """Remove a model. Jobs already running on it finish; queued ones fail, saying so."""
    checkpoint.remove(folder(settings.model_dir), model_id)
    log.info("model %s deleted", model_id)
    return Response(status_code=204)


async def _read_upload(request: Request, model_id: str) -> tuple[bytes, str, dict[str, Any]]:
    """The weights, their file name and the card fields; the card's id is the path's. The form's
    spooled files are closed as soon as they are read."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data: fields weights and card")
    async with request.form(max_files=2) as form:
        weights, card = form.get("weights"), form.get("card")
        if not isinstance(weights, UploadFile):
            raise InputError("weights: a file is required (multipart field 'weights')")
        text = await card.read() if isinstance(card, UploadFile) else card or "{}"
        data, name = await weights.read(), weights.filename or "weights"
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError("card: not valid JSON") from None
    if not isinstance(fields, dict):
        raise InputError("card: must be a JSON object of card fields")
    if fields.setdefault("id", model_id) != model_id:
        raise InputError(f"card field id: {fields['id']!r} is not the id in the path, "
                         f"{model_id!r}")
    return data, name, fields
