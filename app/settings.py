"""One Settings object for the API and the workers (environment variables SPLITZ_*)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLITZ_", env_file=".env", extra="ignore")

    model_dir: Path = Path("models")
    redis_url: str | None = None  # unset: the embedded, in-process backend
    api_keys: list[str] = Field(default_factory=list)  # empty: the API is open
    admin_keys: list[str] = Field(default_factory=list)  # may PUT / DELETE models; empty: nobody
    max_body_bytes: int = 20 * 2**20
    max_model_bytes: int = 2**30  # one PUT /models request: the weights and the card
    max_image_bytes: int = 2 * 2**20  # one image file
    max_decoded_bytes: int = 32 * 2**20  # a request's image files after base64 / zip decoding
    max_n: int = 1_000_000
    default_n: int = 100_000
    max_batch_images: int = 1000
    max_queue: int = 100  # queued jobs before POST answers 429
    sync_wait_s: float = 60.0  # POST /certify waits this long, then answers 202 with a job URL
    job_timeout_s: int = 3600
    job_retries: int = 1  # re-runs of a job whose worker died
    result_ttl_s: int = 24 * 3600
    batch_size: int | None = None  # noise samples per forward pass; unset: each card's
    device: str = "cpu"
    heartbeat_s: float = 5.0  # worker heartbeat while a job runs; a job is abandoned after 3x
