"""POST /certify (one image, synchronous by default) and the batch job resource /jobs."""

import base64
import io
import logging
import re
import time
import zipfile
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from splitz import checkpoint
from splitz.data import spec
from splitz.errors import InputError
from splitz.images import load_image
from worker.jobs import JobSpec, decode_base64

from ..backends import TERMINAL, JobView
from ..deps import BackendDep, SettingsDep
from ..limits import ApiKey
from ..settings import Settings

router = APIRouter(tags=["certify"], dependencies=[ApiKey])
log = logging.getLogger("splitz.api")
JOB_ID = re.compile(r"^[0-9a-f]{32}$|^[0-9a-f-]{36}$")


class Params(BaseModel):
    """Query (or JSON body) parameters of a certification request."""

    model: str
    radius: float | None = Field(None, ge=0, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    n0: int = Field(100, ge=1)
    alpha: float = Field(0.001, gt=0, lt=1)
    seed: int = Field(0, ge=0, le=2**62)
    early_stop: bool = False  # with radius: stop sampling once "certified at radius?" is decided
    wait: bool = True


@router.post("/certify", responses={202: {"description": "still running: poll the job URL"}})
async def certify(request: Request, backend: BackendDep, settings: SettingsDep) -> JSONResponse:
    """Certify one image: multipart field `image`, or JSON `{"image": "<base64>"}`. Parameters
    go in the query string (or the JSON body): model, radius, n, n0, alpha, seed, wait, and
    early_stop (with radius: answer only "certified at radius?", sampling until decided)."""
    params, images = await _read(request, settings, batch=False)
    job_id = _submit(request, backend, _spec(params, images, settings))
    view = await _wait(request, backend, job_id, settings.sync_wait_s if params.wait else 0.0)
    if view.status not in TERMINAL:
        return _accepted(request, view)
    _count(request, view)
    if view.status != "finished":
        return JSONResponse({"error": view.error or view.status, "job_id": view.id},
                            status_code=500 if view.status == "failed" else 409)
    return JSONResponse(view.result["results"][0] | {"job_id": view.id})


@router.post("/jobs", status_code=202)
async def submit(request: Request, backend: BackendDep, settings: SettingsDep) -> JSONResponse:
    """A batch: multipart fields `images` (repeated) and/or `zip` (a zip of PNG/JPEG files), or
    JSON `{"images": ["<base64>", ...], "names": [...]}`; parameters as for /certify."""
    params, images = await _read(request, settings, batch=True)
    job_id = _submit(request, backend, _spec(params, images, settings))
    return _accepted(request, backend.get(job_id))


@router.get("/jobs/{job_id}")
def job_status(job_id: str, request: Request, backend: BackendDep) -> dict[str, Any]:
    view = _find(backend, job_id)
    if view.status in TERMINAL:
        _count(request, view)
    return _describe(request, view)


@router.delete("/jobs/{job_id}", status_code=202)
def cancel(job_id: str, request: Request, backend: BackendDep) -> dict[str, Any]:
    _find(backend, job_id)
    backend.cancel(job_id)
    return _describe(request, _find(backend, job_id))


# -- helpers ---------------------------------------------------------------------------------

def _submit(request: Request, backend, spec: JobSpec) -> str:
    job_id = backend.submit(spec)
    request.app.state.metrics.jobs.labels("submitted").inc()
    log.info("job %s submitted: %d image(s), model %s, n=%d", job_id, len(spec.images),
             spec.model_id, spec.n)
    return job_id


async def _read(request: Request, settings: Settings,
                batch: bool) -> tuple[Params, list[tuple[str, bytes]]]:
    kind = request.headers.get("content-type", "")
    fields: dict[str, Any] = dict(request.query_params)
    if kind.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_batch_images + 1)
        uploads = form.getlist("images" if batch else "image")
        images = [(u.filename or f"image-{i}", await u.read()) for i, u in enumerate(uploads)
                  if hasattr(u, "read")]
        if batch and hasattr(form.get("zip"), "read"):
            images += _unzip(await form["zip"].read(), settings)
        fields |= {k: v for k, v in form.items() if k not in ("image", "images", "zip")}
    elif kind.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise InputError("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InputError("JSON body must be an object")
        encoded = body.pop("images", None) if batch else [body.pop("image", None)]
        if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
            raise InputError("images must be base64 strings" if batch else "image is required")
        names = body.pop("names", None) or [f"image-{i}" for i in range(len(encoded))]
        images = [(str(nm), decode_base64(e, str(nm)))
                  for nm, e in zip(names, encoded, strict=False)]
        fields |= body
    else:
        raise HTTPException(415, "send multipart/form-data or application/json")
    params = _params(fields)
    _check(params, images, settings, batch)
    return params, images


def _params(fields: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _check(params: Params, images: list[tuple[str, bytes]], settings: Settings,
           batch: bool) -> None:
    if not images:
        raise InputError("no image in the request")
    if len(images) > (settings.max_batch_images if batch else 1):
        raise InputError(f"too many images: {len(images)} (at most "
                         f"{settings.max_batch_images if batch else 1})")
    if params.early_stop and params.radius is None:
        raise InputError("early_stop needs a radius")
    for n in (params.n or settings.default_n, params.n0):
        if n > settings.max_n:
            raise InputError(f"n={n} is over this server's cap of {settings.max_n}")
    card = checkpoint.read_card(checkpoint.resolve(settings.model_dir, params.model))
    shape = spec(card.dataset).input_shape
    for name, data in images:
        if len(data) > settings.max_image_bytes:
            raise InputError(f"{name}: image file over {settings.max_image_bytes} bytes")
        load_image(data, shape, name)


def _spec(params: Params, images: list[tuple[str, bytes]], settings: Settings) -> JobSpec:
    return JobSpec(model_id=params.model, images=[base64.b64encode(d).decode() for _, d in images],
                   names=[nm for nm, _ in images], n=params.n or settings.default_n,
                   n0=params.n0, alpha=params.alpha, seed=params.seed, radius=params.radius,
                   early_stop=params.early_stop)


def _unzip(data: bytes, settings: Settings) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            if len(infos) > settings.max_batch_images:
                raise InputError(f"zip holds {len(infos)} files, over {settings.max_batch_images}")
            if any(i.file_size > settings.max_image_bytes for i in infos):
                raise InputError("a file in the zip is too large")
            return [(i.filename, z.read(i)) for i in sorted(infos, key=lambda i: i.filename)]
    except (zipfile.BadZipFile, EOFError):
        raise InputError("zip: not a valid zip archive") from None


async def _wait(request: Request, backend, job_id: str, seconds: float) -> JobView:
    """The job's view once it ends or `seconds` pass. The backend blocks (a Redis stream read,
    or an event in-process) in a worker thread, so the answer leaves as soon as it exists;
    the app's limiter caps those threads."""
    if seconds <= 0:
        return backend.get(job_id)
    deadline = time.monotonic() + seconds
    return await anyio.to_thread.run_sync(backend.wait, job_id, deadline,
                                          limiter=request.app.state.waiters)


def _find(backend, job_id: str) -> JobView:
    view = backend.get(job_id) if JOB_ID.match(job_id) else None
    if view is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return view


def _count(request: Request, view: JobView) -> None:
    results = view.result["results"] if view.result else None
    request.app.state.metrics.job_done(view.id, view.status, results)


def _accepted(request: Request, view: JobView) -> JSONResponse:
    url = str(request.url_for("job_status", job_id=view.id))
    return JSONResponse(_describe(request, view) | {"status_url": url}, status_code=202,
                        headers={"Location": url})


def _describe(request: Request, view: JobView) -> dict[str, Any]:
    return {"id": view.id, "status": view.status, "model_id": view.model_id,
            "progress": {"done": view.done, "total": view.total},
            "results": view.result["results"] if view.result else None, "error": view.error,
            "batched": view.result.get("batched") if view.result else None}
