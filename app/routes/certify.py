"""POST /certify (one image, synchronous by default) and the batch job resource /jobs."""

import base64
import logging
import lzma
import re
import time
import zipfile
import zlib
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from splitz import checkpoint
from splitz.errors import InputError, first_line
from splitz.images import canonical_png
from splitz.smoothing import known_draw
from worker.jobs import JobSpec, Version, decode_base64

from ..backends import TERMINAL, BackendUnavailable, JobView
from ..deps import BackendDep, SettingsDep
from ..limits import ApiKey
from ..schemas import (
    Answer,
    CertifyForm,
    CertifyJSON,
    JobsForm,
    JobsJSON,
    JobStatus,
    Params,
    QueryParams,
    errors,
    request_body,
)
from ..settings import Settings

router = APIRouter(tags=["certify"], dependencies=[ApiKey])
log = logging.getLogger("splitz.api")
JOB_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f-]{36}")  # fullmatch: "$" lets a final newline in
QueryDep = Annotated[QueryParams, Query()]


@router.post("/certify", response_model=None,
             responses={200: {"model": Answer, "description": "the certificate"},
                        202: {"model": JobStatus, "description": "still running: poll status_url"},
                        **errors(400, 401, 404, 409, 413, 415, 422, 429, 500, 503)},
             openapi_extra=request_body(CertifyForm, CertifyJSON))
async def certify(request: Request, query: QueryDep, backend: BackendDep,
                  settings: SettingsDep) -> JSONResponse:
    """Certify one image: multipart field `image`, or JSON `{"image": "<base64>"}`. Parameters
    go in the query string (or the JSON body); `early_stop` with `radius` answers only
    "certified at radius?", sampling until decided."""
    params, spec = await _read(request, query, settings, batch=False)
    job_id = await _submit(backend, spec)
    try:
        view = await _wait(request, backend, job_id,
                           settings.sync_wait_s if params.wait else 0.0)
    except BackendUnavailable as e:  # the job exists: tell the client where to find it
        e.job_id, e.status_url = job_id, _status_url(request, job_id)
        raise
    if view.status not in TERMINAL:
        return _accepted(request, view)
    if view.status != "finished":
        status = (view.error_status or 500) if view.status == "failed" else 409
        return JSONResponse({"error": view.error or view.status, "job_id": view.id},
                            status_code=status)
    return JSONResponse(view.result["results"][0] | {"job_id": view.id})


@router.post("/jobs", status_code=202, response_model=None,
             responses={202: {"model": JobStatus, "description": "queued: poll status_url"},
                        **errors(400, 401, 404, 413, 415, 422, 429, 503)},
             openapi_extra=request_body(JobsForm, JobsJSON))
async def submit(request: Request, query: QueryDep, backend: BackendDep,
                 settings: SettingsDep) -> JSONResponse:
    """A batch: multipart fields `images` (repeated) and/or `zip` (a zip of PNG/JPEG files), or
    JSON `{"images": ["<base64>", ...], "names": [...]}`; parameters as for /certify."""
    _, spec = await _read(request, query, settings, batch=True)
    job_id = await _submit(backend, spec)
    try:
        return _accepted(request, await anyio.to_thread.run_sync(backend.get, job_id))
    except BackendUnavailable as e:
        e.job_id, e.status_url = job_id, _status_url(request, job_id)
        raise


@router.get("/jobs/{job_id}", response_model=None,
            responses={200: {"model": JobStatus}, **errors(401, 404, 422, 503)})
def job_status(job_id: str, request: Request, backend: BackendDep) -> dict[str, Any]:
    return _describe(_find(backend, job_id))


@router.delete("/jobs/{job_id}", status_code=202, response_model=None,
               responses={202: {"model": JobStatus}, **errors(401, 404, 422, 503)})
def cancel(job_id: str, request: Request, backend: BackendDep) -> dict[str, Any]:
    """Cancel a queued job, or stop a running one at its next chunk of samples."""
    _find(backend, job_id)
    backend.cancel(job_id)
    return _describe(_find(backend, job_id))


# -- reading a request -----------------------------------------------------------------------

async def _read(request: Request, query: QueryParams, settings: Settings,
                batch: bool) -> tuple[Params, JobSpec]:
    """The parameters and the job: the images, each checked, preprocessed as the model's card
    says and re-encoded (canonical_png) one at a time, so the API holds at most one decoded file
    beside the body, and decodes at most max_decoded_bytes in all; and the model's version (its
    card and weights' sha256 read together), which the job will run on."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        fields, files = await _read_form(request, settings, batch)
    elif kind.startswith("application/json"):
        fields, files = await _read_json(request, batch)
    else:
        raise HTTPException(415, "send multipart/form-data or application/json")
    params = _validate(Params, query.model_dump(exclude_unset=True) | fields)
    _check(params, settings)
    folder = checkpoint.resolve(settings.model_dir, params.model)
    card, sha256 = await anyio.to_thread.run_sync(checkpoint.version, folder)  # may hash a file
    shape, budget, images = card.spec().input_shape, Budget(settings, batch), []
    for name, data in files:
        images += [(nm, await anyio.to_thread.run_sync(  # off the event loop: a resize
                        canonical_png, raw, shape, nm, card.preprocess))  # can take seconds
                   async for nm, raw in data(budget, name)]
    if not images:
        raise InputError("no image in the request")
    return params, _spec(params, (sha256, checkpoint.card_digest(card)), images, settings)


class Budget:
    """What a request may still decode, charged before each file is decoded: at most
    max_batch_images files (1 for /certify), each at most max_image_bytes, all of them at most
    max_decoded_bytes."""

    def __init__(self, settings: Settings, batch: bool):
        self.files = settings.max_batch_images if batch else 1
        self.file, self.left = settings.max_image_bytes, settings.max_decoded_bytes

    def take(self, name: str, size: int) -> None:
        self.files -= 1
        if self.files < 0:
            raise InputError("too many images in the request")
        if size > self.file:
            raise InputError(f"{name}: file over {self.file} bytes")
        if size > self.left:
            raise InputError("the request's images add up to more than the server decodes "
                             "for one request")
        self.left -= size


async def _read_form(request: Request, settings: Settings, batch: bool):
    form = await request.form(max_files=settings.max_batch_images + 1)
    uploads = [u for u in form.getlist("images" if batch else "image")
               if isinstance(u, UploadFile)]
    files = [(u.filename or f"image-{i}", _upload(u)) for i, u in enumerate(uploads)]
    if batch and isinstance(form.get("zip"), UploadFile):
        files.append((form["zip"].filename or "zip", _zip_entries(form["zip"])))
    fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
    return fields, files


def _upload(upload: UploadFile):
    async def read(budget: Budget, name: str):
        budget.take(name, upload.size or 0)
        yield name, await upload.read()
    return read


def _zip_entries(upload: UploadFile):
    """A zip's files one at a time; their declared sizes are charged to the budget before any
    is decompressed, and zipfile stops reading an entry at its declared size."""
    async def read(budget: Budget, _name: str):
        try:
            with zipfile.ZipFile(upload.file) as z:
                infos = sorted((i for i in z.infolist() if not i.is_dir()),
                               key=lambda i: i.filename)
                for info in infos:
                    budget.take(info.filename, info.file_size)
                for info in infos:
                    yield info.filename, z.read(info)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError,
                ValueError, OSError, zlib.error, lzma.LZMAError):  # OSError: bz2's data errors
            raise InputError("zip: not a valid zip archive") from None
        except RuntimeError as e:  # zipfile's "File ... is encrypted, password required"
            raise InputError(f"zip: {first_line(e)}") from None
    return read


async def _read_json(request: Request, batch: bool):
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: arrays nested 100,000 deep
        raise InputError("body is not valid JSON") from None
    data = _validate(JobsJSON if batch else CertifyJSON, body)
    encoded = data.images if batch else [data.image]
    names = data.names if batch and data.names else [f"image-{i}" for i in range(len(encoded))]
    fields = data.model_dump(exclude_unset=True, exclude={"image", "images", "names"})
    return fields, [(nm, _base64(text)) for nm, text in zip(names, encoded, strict=True)]


def _base64(text: str):
    async def read(budget: Budget, name: str):
        budget.take(name, len(text) * 3 // 4)
        yield name, decode_base64(text, name)
    return read


def _validate(model: type[BaseModel], data: Any):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise InputError(f"{where}: {first['msg']}" if where else first["msg"]) from None


def _check(params: Params, settings: Settings) -> None:
    if params.early_stop and params.radius is None:
        raise InputError("early_stop needs a radius")
    if why := known_draw(params.bound, params.seed):
        raise InputError(f"bound={params.bound} with a client-chosen seed is refused: {why}; "
                         "leave seed out and the server draws it")
    if params.early_stop and params.tolerance is not None:
        raise InputError("tolerance is for certification; early_stop answers 'certified at "
                         "radius?' with its own stopping rule")
    for n in (params.n or settings.default_n, params.n0):
        if n > settings.max_n:
            raise InputError(f"n={n} is over this server's cap of {settings.max_n}")


def _spec(params: Params, version: Version, images: list[tuple[str, bytes]],
          settings: Settings) -> JobSpec:
    return JobSpec(model_id=params.model, model_sha256=version[0], card_sha256=version[1],
                   images=[base64.b64encode(d).decode() for _, d in images],
                   names=[nm for nm, _ in images], n=params.n or settings.default_n,
                   n0=params.n0, alpha=params.alpha, seed=params.seed, radius=params.radius,
                   early_stop=params.early_stop, bound=params.bound, tolerance=params.tolerance)


# -- answering -------------------------------------------------------------------------------

async def _submit(backend, spec: JobSpec) -> str:
    """Enqueue off the event loop: a stalled Redis blocks for its socket timeout, and the other
    requests (health checks included) must not wait behind it."""
    job_id = await anyio.to_thread.run_sync(backend.submit, spec)
    log.info("job %s submitted: %d image(s), model %s, n=%d", job_id, len(spec.images),
             spec.model_id, spec.n)
    return job_id


async def _wait(request: Request, backend, job_id: str, seconds: float) -> JobView:
    """The job's view once it ends or `seconds` pass. The backend blocks (a Redis stream read,
    or an event in-process) in a worker thread, so the answer leaves as soon as it exists;
    the app's limiter caps those threads."""
    if seconds <= 0:
        return await anyio.to_thread.run_sync(backend.get, job_id)
    deadline = time.monotonic() + seconds
    return await anyio.to_thread.run_sync(backend.wait, job_id, deadline,
                                          limiter=request.app.state.waiters)


def _find(backend, job_id: str) -> JobView:
    view = backend.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if view is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return view


def _status_url(request: Request, job_id: str) -> str:
    return str(request.url_for("job_status", job_id=job_id))


def _accepted(request: Request, view: JobView) -> JSONResponse:
    url = _status_url(request, view.id)
    return JSONResponse(_describe(view) | {"status_url": url}, status_code=202,
                        headers={"Location": url})


def _describe(view: JobView) -> dict[str, Any]:
    return {"id": view.id, "status": view.status, "model_id": view.model_id,
            "progress": {"done": view.done, "total": view.total},
            "results": view.result["results"] if view.result else None, "error": view.error,
            "error_status": view.error_status,
            "batched": view.result.get("batched") if view.result else None}
