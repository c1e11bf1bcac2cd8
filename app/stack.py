"""The production stack as plain processes: redis-server on a free port, uvicorn, N workers.
Used by the stack tests and bench/service.py."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, binary: str | None = None):
        self.binary = binary or shutil.which("redis-server")
        if not self.binary:
            raise RuntimeError("redis-server is not installed")
        self.port, self.dir = free_port(), workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
             "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _connects(self.port), "redis-server to start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # graceful: the AOF is flushed
        self.proc.wait(10)

    def kill(self) -> None:
        """A crash: SIGKILL (appendfsync always: every acknowledged write is in the AOF)."""
        self.proc.kill()
        self.proc.wait(10)


class Stack:
    """uvicorn + workers against one Redis; every process is killed on close."""

    def __init__(self, redis: RedisServer, model_dir: Path, logdir: Path, workers: int = 1,
                 **settings: str):
        self.redis, self.logdir, self.port = redis, logdir, free_port()
        self.env = environment(redis.url, model_dir, **{"heartbeat_s": 1} | settings)
        self.api = self._spawn("api", "serve", "--port", str(self.port))
        self.workers = [self.add_worker() for _ in range(workers)]
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        _wait(lambda: self._ready(), "the API and a worker to be ready", timeout=120)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        return spawn(self.env, self.logdir, name, *args)

    def add_worker(self) -> subprocess.Popen:
        return self._spawn("worker", "worker")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_job(self, job_id: str, timeout: float = 300.0, seen: list | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.http.get(f"/jobs/{job_id}").json()
            if seen is not None:
                seen.append(body)
            if body["status"] in ("finished", "failed", "canceled"):
                return body
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not done after {timeout}s: {body}")

    def close(self) -> None:
        self.http.close()
        for p in [self.api, *self.workers]:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def environment(redis_url: str, model_dir: Path, **settings) -> dict[str, str]:
    """The environment of the stack's processes: SPLITZ_* settings (small default n)."""
    return os.environ | {"PYTHONPATH": str(ROOT)} | {
        f"SPLITZ_{k.upper()}": str(v) for k, v in
        ({"redis_url": redis_url, "model_dir": model_dir, "default_n": 300} | settings).items()}


def spawn(env: dict[str, str], logdir: Path, name: str, *args: str) -> subprocess.Popen:
    """`splitz ARGS` as a process, its output in logdir/NAME-*.log."""
    with open(logdir / f"{name}-{time.monotonic_ns()}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "splitz", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(ok, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")
