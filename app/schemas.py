"""Request and response models: what the routes validate and what the OpenAPI document shows."""

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model, model_validator

from splitz.checkpoint import ModelCard
from splitz.smoothing import SEED_LIMIT, Certificate, RadiusAnswer
from worker.jobs import Bound


class Params(BaseModel):
    """Parameters of a certification request (query string, or the JSON body)."""

    model: str = Field(description="model id (GET /models)")
    radius: float | None = Field(None, ge=0, allow_inf_nan=False,
                                 description="also answer whether this l2 radius is certified")
    n: int | None = Field(None, ge=1, description="noise samples (default: the server's)")
    n0: int = Field(100, ge=1, description="selection samples")
    alpha: float = Field(0.001, gt=0, lt=1, description="failure probability")
    seed: int | None = Field(None, ge=0, le=SEED_LIMIT,
                             description="noise seed; default: drawn by the server from the OS's "
                                         "secure generator (seed_source in each result)")
    early_stop: bool = Field(False, description="with radius: stop sampling once 'certified at "
                                                "radius?' is decided")
    bound: Bound = Field("clopper-pearson",
                         description="the fixed-n lower bound on pA: clopper-pearson, or "
                                     "randomized-clopper-pearson (tighter at the same n; exact "
                                     "level alpha over an auxiliary uniform draw made from the "
                                     "seed and recorded as bound_u; so refused with a "
                                     "client-chosen seed). Each result records it")
    tolerance: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False,
                                    description="adaptive certification: n is a budget; stop at "
                                                "a third of it once the radius is within this "
                                                "share of the whole budget's (e.g. 0.02). Each "
                                                "result's stopping and budget record the rule. "
                                                "Not with early_stop")
    wait: bool = Field(True, description="POST /certify: wait for the answer (else 202)")


class QueryParams(Params):
    """The query string: `model` may come in the JSON body instead."""

    model: str | None = Field(None, description="model id (GET /models); required here or in "
                                                "the JSON body")


class CertifyJSON(QueryParams):
    image: str = Field(description="the PNG or JPEG file, base64")


class JobsJSON(QueryParams):
    images: list[str] = Field(min_length=1, description="PNG or JPEG files, base64")
    names: list[str] | None = Field(None, description="one name per image (default image-<i>)")

    @model_validator(mode="after")
    def _one_name_per_image(self) -> "JobsJSON":
        if self.names is not None and len(self.names) != len(self.images):
            raise ValueError(f"{len(self.names)} names for {len(self.images)} images")
        return self


class CertifyForm(BaseModel):
    image: bytes = Field(description="the PNG or JPEG file")


class JobsForm(BaseModel):
    images: list[bytes] = Field([], description="PNG or JPEG files (repeat the field)")
    zip: bytes | None = Field(None, description="a zip of PNG or JPEG files")


def request_body(form: type[BaseModel], json: type[BaseModel] | None = None) -> dict[str, Any]:
    """openapi_extra for a route that reads multipart (or JSON) itself (its limits need the raw
    stream): the bodies it accepts."""
    content = {"multipart/form-data": {"schema": form.model_json_schema()}}
    if json is not None:
        content["application/json"] = {"schema": json.model_json_schema()}
    return {"requestBody": {"required": True, "content": content}}


class ModelUpload(BaseModel):
    """PUT /models/{model_id}: what `splitz import` takes, as multipart fields."""

    weights: bytes = Field(description="the state dict: .safetensors, or a .pt / .pth file "
                                       "(tensors only; a pickle that needs code is refused)")
    card: bytes | None = Field(None, description="the card fields as a JSON object (a card.json "
                                                 "file or a text field), as `splitz import "
                                                 "--card`; `id` is the path's")


class ModelUploaded(BaseModel):
    id: str
    sha256: str = Field(description="of the weights as stored: certificates name it")
    replaced: bool = Field(description="an existing model of this id was replaced")
    warnings: list[str] = Field(description="likely mistakes that could be meant (e.g. sigma in "
                                            "normalized units)")
    card: ModelCard


class ErrorBody(BaseModel):
    error: str
    job_id: str | None = Field(None, description="the job, when one was created")
    status_url: str | None = None


def _answer_model(cls: type, name: str) -> type[BaseModel]:
    """One image's answer as the API sends it: the engine's dataclass fields, plus its name in
    the request and the job id (POST /certify)."""
    fields = {f.name: (f.type, ... if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(cls)}
    return create_model(name, name=(str, ...), job_id=(str | None, None), **fields)


CertificateOut = create_model("CertificateOut", __base__=_answer_model(Certificate, "_Cert"),
                              abstained=(bool, ...))
RadiusAnswerOut = _answer_model(RadiusAnswer, "RadiusAnswerOut")
Answer = CertificateOut | RadiusAnswerOut


class Progress(BaseModel):
    done: int
    total: int


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "started", "finished", "failed", "canceled"]
    model_id: str
    progress: Progress
    results: list[Answer] | None
    error: str | None
    error_status: int | None = Field(
        None, description="a failed job: the HTTP status of its error, as POST /certify answers "
                          "it (404: the model was deleted after the job was submitted; 409: it "
                          "was replaced, weights or card; 422: bad input); null: a server fault "
                          "(500)")
    batched: int | None = Field(None, description="jobs that shared this job's engine pass")
    status_url: str | None = Field(None, description="in 202 answers: where to poll")


class Readiness(BaseModel):
    ready: bool
    reason: str


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route, all {"error": ...}."""
    what = {400: "malformed multipart body",
            401: "missing or invalid X-API-Key (when keys are configured)",
            403: "not an admin key (model uploads are disabled when no admin key is configured)",
            404: "unknown model or job; or the job's model was deleted after it was submitted",
            409: "the job was canceled, or its model was replaced after it was submitted; or the "
                 "model exists (PUT without overwrite=true)",
            413: "request body too large", 415: "send multipart/form-data or application/json",
            422: "invalid input", 429: "queue full: retry after Retry-After seconds",
            500: "the job failed on the server, or the model repository cannot be read or written",
            503: "queue or model repository unavailable"}
    return {s: {"model": ErrorBody, "description": what[s]} for s in statuses}
