"""Certification jobs: plain functions of JSON-able arguments, shared by the RQ workers and the
embedded backend. A job certifies its images one by one (image i with seed + i, so results equal
the engine's `Smooth.certify(images, seed=seed)`; no seed: each image's is drawn securely),
reporting progress, and honouring cancellation before each chunk of samples.

A job names the model version it was submitted for (the weights' sha256 and the card's digest, as
the API found them) and runs on exactly that version: the one the process holds, or the
repository's current one; if the model was replaced (weights or card) or deleted since, the job
fails saying so."""

import base64
import binascii
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from splitz import checkpoint
from splitz.errors import (
    InputError,
    ModelReplacedError,
    SplitzError,
    UnknownModelError,
    http_status,
)
from splitz.images import load_image
from splitz.smoothing import Certificate, Smooth
from splitz.stats import FIXED_BOUNDS

Version = tuple[str, str]  # (weights sha256, card digest): see checkpoint.card_digest
Bound = Literal[FIXED_BOUNDS]  # the fixed-n lower bounds on pA that certify and query take


class JobSpec(BaseModel):
    model_id: str
    # the version it was submitted for: the weights' sha256 and checkpoint.card_digest
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    card_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    images: list[str] = Field(min_length=1)  # base64 PNG / JPEG bytes
    names: list[str] = Field(default_factory=list)
    n: int = Field(100_000, ge=1)
    n0: int = Field(100, ge=1)
    alpha: float = Field(0.001, gt=0, lt=1)
    seed: int | None = Field(None, ge=0)  # None: drawn by the engine (seed_source "random")
    radius: float | None = Field(None, ge=0, allow_inf_nan=False)
    early_stop: bool = False  # with radius: only decide "certified at radius?" (Smooth.query)
    bound: Bound = "clopper-pearson"
    tolerance: float | None = Field(None, gt=0, lt=1)  # adaptive certification (not queries)

    @model_validator(mode="after")
    def _one_name_per_image(self) -> "JobSpec":
        if self.names and len(self.names) != len(self.images):
            raise ValueError(f"{len(self.names)} names for {len(self.images)} images")
        return self

    @property
    def version(self) -> Version:
        return self.model_sha256, self.card_sha256

    @property
    def is_query(self) -> bool:
        return self.early_stop and self.radius is not None

    def image_seed(self, i: int) -> int | None:
        return None if self.seed is None else self.seed + i


class Canceled(Exception):
    """The client canceled the job."""


class ModelCache:
    """One version of each model per process, loaded when first needed and kept warm (one
    Smooth per model id); a new version replaces the one held when a job asks for it. A version
    is the weights' sha256 with the card's digest: a card edited over the same weights (a
    corrected sigma, a new precision) is a new version."""

    def __init__(self, model_dir: Path, batch_size: int | None = None, device: str = "cpu"):
        self.model_dir, self.batch_size, self.device = Path(model_dir), batch_size, device
        self._models: dict[str, tuple[Version, Smooth]] = {}  # id -> (version, Smooth)
        self._lock = threading.Lock()

    def get(self, model_id: str, version: Version | None = None) -> Smooth:
        """The model at `version` (None: the repository's). A deleted model is refused even when
        held. The one held serves a job of its version, whatever the repository holds now (the
        job was submitted before a replacement); otherwise the repository's is loaded if it is
        the job's version (checked first from the card and the file's cached hash: a stale job
        costs no load)."""
        with self._lock:
            try:
                path = checkpoint.resolve(self.model_dir, model_id)
                card, weights = checkpoint.version(path)
            except UnknownModelError:
                self._models.pop(model_id, None)
                if version is None:
                    raise
                raise UnknownModelError(f"model {model_id!r} was deleted after this job was "
                                        "submitted") from None
            current = (weights, checkpoint.card_digest(card))
            wanted = version or current
            held = self._models.get(model_id)
            if held is not None and held[0] == wanted:
                return held[1]
            if wanted != current:
                raise _replaced(model_id, wanted, current)
            loaded = checkpoint.load(path)
            found = (loaded.sha256, checkpoint.card_digest(loaded.card))
            if found != wanted:  # replaced again meanwhile
                raise _replaced(model_id, wanted, found)
            smooth = Smooth.from_checkpoint(loaded, self.batch_size, self.device)
            self._models[model_id] = (wanted, smooth)
            return smooth

    def warm(self, model_ids: list[str] | None = None) -> list[str]:
        ids = model_ids or [c.id for c in checkpoint.list_cards(self.model_dir)]
        for model_id in ids:
            self.get(model_id)
        return ids


def _replaced(model_id: str, wanted: Version, found: Version) -> ModelReplacedError:
    what = "its card" if wanted[0] == found[0] else "its weights"
    return ModelReplacedError(
        f"model {model_id!r} was replaced after this job was submitted ({what} changed): the "
        f"job is for weights sha256 {wanted[0]} with card {wanted[1][:16]}, the repository now "
        f"holds {found[0]} with card {found[1][:16]}; submit it again")


def decode_base64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: not valid base64") from None


def run_certify(spec: JobSpec, models: ModelCache,
                progress: Callable[[int, int], None] = lambda done, total: None,
                canceled: Callable[[], bool] = lambda: False) -> dict:
    smooth = models.get(spec.model_id, spec.version)
    images = _decode(spec, smooth)
    start, results = time.perf_counter(), []
    progress(0, len(images))
    for i, (x, name) in enumerate(images):
        def check(_samples: int, done: int = i) -> None:
            if canceled():
                raise Canceled(f"canceled after {done} of {len(images)} images")

        check(0)
        if spec.is_query:
            answer = smooth.query(x, spec.radius, alpha=spec.alpha, n0=spec.n0, n_max=spec.n,
                                  seed=spec.image_seed(i), bound=spec.bound, on_chunk=check)[0]
        else:
            answer = smooth.certify(x, n0=spec.n0, n=spec.n, alpha=spec.alpha,
                                    seed=spec.image_seed(i), radius=spec.radius,
                                    bound=spec.bound, tolerance=spec.tolerance,
                                    on_chunk=check)[0]
        results.append({"name": name} | answer.to_dict())
        progress(i + 1, len(images))
    return _result(spec, results, start)


SMALL_JOB_IMAGES = 8  # only jobs with at most this many images are batched


def batch_key(spec: JobSpec) -> tuple | None:
    """Jobs with the same key can be certified together in one engine pass (run_batch); None for
    jobs that are not batched (radius queries, jobs over SMALL_JOB_IMAGES)."""
    if spec.is_query or len(spec.images) > SMALL_JOB_IMAGES:
        return None
    return (spec.model_id, spec.version, spec.n, spec.n0, spec.alpha, spec.radius, spec.bound,
            spec.tolerance, spec.seed is None)


def run_batch(specs: list[JobSpec], models: ModelCache,
              canceled: Callable[[int], bool] = lambda i: False) -> list[dict]:
    """Certify the images of several jobs with one batch_key in one `certify` call, so small
    jobs share forward passes and the Lipschitz search. Each job's results equal run_job's:
    the engine draws image i's noise from its own seed, whatever shares the pass. A job found
    canceled (canceled(i), asked before each chunk of samples) ends canceled at once: the pass
    stops and starts again without it, so the others still get their own results."""
    first = specs[0]
    try:
        smooth = models.get(first.model_id, first.version)
    except SplitzError as e:  # the model is gone or replaced: every job says so
        return [failure(e) for _ in specs]
    start, todo = time.perf_counter(), []
    out: list[dict | None] = [None] * len(specs)
    for i, spec in enumerate(specs):
        try:
            todo.append((i, _decode(spec, smooth)))
        except SplitzError as e:
            out[i] = failure(e)
    while todo:
        try:
            certs = _certify_together(smooth, [(specs[i], imgs) for i, imgs in todo],
                                      _dropper([i for i, _ in todo], canceled))
        except _Dropped as e:
            for i in e.jobs:
                out[i] = {"canceled": True, "error": "canceled while certified in a batch"}
            todo = [(i, imgs) for i, imgs in todo if i not in e.jobs]
            continue
        for i, imgs in todo:
            out[i] = _result(specs[i], [{"name": nm} | next(certs).to_dict() for _, nm in imgs],
                             start, len(todo))
        break
    return out


class _Dropped(Exception):
    """Jobs of a batched pass were canceled (their indices: `jobs`)."""

    def __init__(self, jobs: list[int]):
        super().__init__(jobs)
        self.jobs = jobs


def _dropper(jobs: list[int], canceled: Callable[[int], bool]) -> Callable[[int], None]:
    """An on_chunk that stops the pass when any of `jobs` is canceled."""
    def check(_samples: int) -> None:
        if gone := [i for i in jobs if canceled(i)]:
            raise _Dropped(gone)
    return check


def _certify_together(smooth: Smooth, jobs: list[tuple[JobSpec, list]],
                      on_chunk: Callable[[int], None]) -> Iterator[Certificate]:
    """One certify call over the images of `jobs` (one batch_key); their certificates in order."""
    first = jobs[0][0]
    x = torch.stack([img for _, imgs in jobs for img, _ in imgs])
    seeds = None if first.seed is None else [spec.image_seed(i) for spec, imgs in jobs
                                             for i in range(len(imgs))]
    return iter(smooth.certify(x, n0=first.n0, n=first.n, alpha=first.alpha, seed=seeds,
                               radius=first.radius, bound=first.bound,
                               tolerance=first.tolerance, on_chunk=on_chunk))


def _decode(spec: JobSpec, smooth: Smooth) -> list[tuple[torch.Tensor, str]]:
    names = spec.names or [f"image-{i}" for i in range(len(spec.images))]
    return [(load_image(decode_base64(d, nm), smooth.model.input_shape, nm), nm)
            for d, nm in zip(spec.images, names, strict=True)]


def _result(spec: JobSpec, results: list[dict], start: float, batched: int = 1) -> dict:
    """A job's outcome; `batched` jobs shared its engine pass (seconds is the pass's)."""
    return {"model_id": spec.model_id, "results": results, "batched": batched,
            "seconds": round(time.perf_counter() - start, 3)}


def failure(e: SplitzError) -> dict:
    """A job that failed on an error of the client's or of the repository, with the HTTP status
    a request would get for it (404: the model was deleted, 409: replaced since submission)."""
    return {"error": str(e), "error_status": http_status(e)}


def outcome(result: dict) -> str:
    """A job's final state from what run_job returned."""
    return "canceled" if result.get("canceled") else "failed" if result.get("error") else "finished"


def samples_used(result: dict) -> int:
    """Noise samples behind a job's results: a certificate used n0 + n, an early-stopped radius
    answer n0 + samples."""
    return sum(r["n0"] + (r["samples"] if "samples" in r else r["n"])
               for r in result.get("results") or [])


def run_job(spec: JobSpec, models: ModelCache,
            progress: Callable[[int, int], None] = lambda done, total: None,
            canceled: Callable[[], bool] = lambda: False) -> dict:
    """run_certify, with the errors a client caused and cancellation returned as results (so RQ
    retries only jobs that crashed or whose worker died): {"results": ...}, failure's
    {"error": ..., "error_status": ...} or {"canceled": True, "error": ...}."""
    try:
        return run_certify(spec, models, progress, canceled)
    except Canceled as e:
        return {"canceled": True, "error": str(e)}
    except SplitzError as e:
        return failure(e)
