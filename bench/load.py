"""Sustained load on the whole service: does every job come back?

    python bench/load.py [--clients 32 --seconds 300 --workers 2 --n 2000 --model ID]

Starts redis-server on a free port (AOF, fsync always), the API (uvicorn) and W workers as plain
processes (app/stack.py, as the stack tests), then C client threads for S seconds, each POSTing
/certify (wait=true) with a shipped example digit and polling the job URL when the answer is a
202. 429 and 503 answers are counted as refused and retried after their Retry-After. After the
clients stop, jobs still running get a drain period; a job is lost if it has an id but never
reaches a final state. Prints one JSON line: submitted, finished, failed, canceled, lost,
refused, and the latency of finished requests (p50, p95, max), from POST to answer.
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.stack import RedisServer, Stack

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("finished", "failed", "canceled")


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, str] = {}  # id -> last status seen
        self.latencies: list[float] = []
        self.refused = 0

    def seen(self, job_id: str, status: str) -> None:
        with self.lock:
            self.jobs[job_id] = status


def client(url: str, model: str, n: int, images: list[bytes], stop: float, tally: Tally,
           index: int) -> None:
    http = httpx.Client(base_url=url, timeout=600)
    k = index
    while time.monotonic() < stop:
        image, k = images[k % len(images)], k + 1
        start = time.monotonic()
        r = http.post("/certify", params={"model": model, "n": n},
                      files={"image": ("x.png", image, "image/png")})
        if r.status_code in (429, 503):
            with tally.lock:
                tally.refused += 1
            if "job_id" in r.json():  # enqueued before the fault: keep following it
                tally.seen(r.json()["job_id"], "queued")
            time.sleep(float(r.headers.get("Retry-After", 1)))
            continue
        body = r.json()
        job_id = body.get("job_id") or body.get("id")
        if r.status_code == 202:
            body = follow(http, job_id, tally)
            status = body["status"] if body else "queued"
        else:
            status = "finished" if r.status_code == 200 else body.get("status", "failed")
        tally.seen(job_id, status)
        if status == "finished":
            with tally.lock:
                tally.latencies.append(time.monotonic() - start)


def follow(http: httpx.Client, job_id: str, tally: Tally, timeout: float = 600) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/jobs/{job_id}").json()
        if body.get("status") in FINAL:
            return body
        time.sleep(0.5)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--model", default="mnist-splitz-quick")
    p.add_argument("--drain", type=float, default=300, help="seconds to wait for running jobs")
    args = p.parse_args()
    images = [path.read_bytes() for path in sorted((ROOT / "examples").glob("mnist-*.png"))]
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        stack = Stack(redis, ROOT / "models", Path(tmp), workers=args.workers,
                      heartbeat_s=5, sync_wait_s=60)
        try:
            tally = Tally()
            stop = time.monotonic() + args.seconds
            threads = [threading.Thread(target=client, args=(stack.url, args.model, args.n,
                                                             images, stop, tally, k))
                       for k in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            http = httpx.Client(base_url=stack.url, timeout=60)
            for job_id, status in list(tally.jobs.items()):
                if status not in FINAL:
                    body = follow(http, job_id, tally, args.drain)
                    tally.seen(job_id, body["status"] if body else status)
        finally:
            stack.close()
            redis.proc.kill()
    states = list(tally.jobs.values())
    lat = sorted(tally.latencies)
    print(json.dumps({
        "clients": args.clients, "seconds": args.seconds, "workers": args.workers, "n": args.n,
        "submitted": len(states), "finished": states.count("finished"),
        "failed": states.count("failed"), "canceled": states.count("canceled"),
        "lost": sum(s not in FINAL for s in states), "refused": tally.refused,
        "latency_s": {"p50": round(statistics.median(lat), 2) if lat else None,
                      "p95": round(lat[int(0.95 * (len(lat) - 1))], 2) if lat else None,
                      "max": round(lat[-1], 2) if lat else None},
    }))


if __name__ == "__main__":
    main()
