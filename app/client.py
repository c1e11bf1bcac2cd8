"""A small Python client for the splitz service."""

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


class ServiceError(Exception):
    """The service answered with an error (its JSON `error` message)."""


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 120.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def certify(self, image: Path, model: str, **params: Any) -> dict:
        """Certify one image, waiting for the answer (polls if the server answers 202)."""
        with open(image, "rb") as f:
            r = self.http.post("/certify", params={"model": model, **params},
                               files={"image": (Path(image).name, f.read(), "image/png")})
        body = self._check(r)
        return self.wait(body["id"])["results"][0] if r.status_code == 202 else body

    def submit(self, images: Iterable[Path], model: str, **params: Any) -> str:
        files = [("images", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in images]
        return self._check(self.http.post("/jobs", params={"model": model, **params},
                                          files=files))["id"]

    def job(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.delete(f"/jobs/{job_id}"))

    def wait(self, job_id: str, progress: bool = False, poll: float = 0.5) -> dict:
        """Poll until the job is finished, failed or canceled; raise unless finished."""
        bar = tqdm(unit="image", disable=not progress, desc=f"job {job_id[:8]}")
        while True:
            body = self.job(job_id)
            bar.total = body["progress"]["total"]
            bar.n = body["progress"]["done"]
            bar.refresh()
            if body["status"] in ("finished", "failed", "canceled"):
                bar.close()
                if body["status"] != "finished":
                    raise ServiceError(f"job {job_id} {body['status']}: {body['error']}")
                return body
            time.sleep(poll)

    @staticmethod
    def _check(r: httpx.Response) -> dict:
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise ServiceError(f"HTTP {r.status_code}: {message}")
        return r.json()
