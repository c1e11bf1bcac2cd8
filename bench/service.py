"""Service throughput and latency (HTTP + Redis + RQ workers) against the in-process engine.

    python bench/service.py --model mnist-splitz-quick --n 10000 [--workers 1,2] [--clients 1,8,32]

Starts redis-server on a free port, the API (uvicorn) and 1 or 2 workers as plain processes (the
same helpers the stack tests use), then runs bounded request loops: C client threads, each
POSTing /certify one image at a time until the configuration's answers came back (request i:
image i mod the number of images, seed i). The engine figure is `Smooth.certify` on the same
requests, one after another, in this process, measured just before each configuration (this
machine's speed drifts by ±15 % between minutes). With W workers each worker runs W-times fewer
torch threads, so all configurations use the same cores. Prints a JSON line per configuration,
then a table; overhead = 1 - service images/s / the engine's just before; idle = the share of
the workers' time not spent in the engine (answers' time_s), which the drift does not move.
"""

import argparse  # noqa: I001  (splitz before torch: it sets the OpenMP spin torch loads with)
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import splitz  # noqa: F401
import torch

from app.client import Client
from app.stack import RedisServer, Stack
from splitz import Smooth, checkpoint
from splitz.images import load_image

ROOT = Path(__file__).resolve().parents[1]


class Engine:
    """The in-process engine on the work one configuration's clients ask for: request i
    certifies image i mod len(images) with seed i."""

    def __init__(self, model_dir: Path, model_id: str, images: list[Path], n: int):
        loaded = checkpoint.load(checkpoint.resolve(model_dir, model_id))
        self.smooth, self.n = Smooth.from_checkpoint(loaded), n
        self.xs = [load_image(p, loaded.model.input_shape) for p in images]
        self.smooth.certify(self.xs[0], n=min(n, 1000))  # warm up

    def rate(self, requests: int) -> float:
        start = time.perf_counter()
        for i in range(requests):
            self.smooth.certify(self.xs[i % len(self.xs)], n=self.n, seed=i)
        return requests / (time.perf_counter() - start)


def client_loop(url: str, model_id: str, images: list[Path], n: int, todo: list[int],
                lock: threading.Lock, latencies: list[float], computing: list[float]) -> None:
    client = Client(url, timeout=600)
    while True:
        with lock:
            if not todo:
                return
            i = todo.pop()
        t = time.perf_counter()
        answer = client.certify(images[i % len(images)], model_id, n=n, seed=i)
        latencies.append(time.perf_counter() - t)
        computing.append(answer["time_s"])  # the worker's engine seconds for this image


def service_run(stack: Stack, model_id: str, images: list[Path], n: int, clients: int,
                requests: int) -> dict:
    todo, lock, latencies, computing = list(range(requests)), threading.Lock(), [], []
    threads = [threading.Thread(target=client_loop, args=(stack.url, model_id, images, n, todo,
                                                          lock, latencies, computing))
               for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    # share of the workers' time not spent in the engine: HTTP, queue, decoding, waiting
    idle = 1 - sum(computing) / (elapsed * len(stack.workers))
    return {"images_per_s": round(requests / elapsed, 3), "p50_s": round(q[9], 2),
            "p95_s": round(q[18], 2), "worker_idle": round(idle, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mnist-splitz-quick", help="a model id in --model-dir")
    p.add_argument("--model-dir", type=Path, default=ROOT / "models")
    p.add_argument("--images", default=str(ROOT / "examples" / "mnist-*.png"))
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=32,
                   help="answers per configuration (at least the most clients)")
    args = p.parse_args()
    images = sorted(Path("/").glob(args.images.lstrip("/")))
    threads = torch.get_num_threads()
    clients = [int(c) for c in args.clients.split(",")]
    requests = max(args.requests, *clients)  # every configuration answers the same requests
    engine = Engine(args.model_dir, args.model, images, args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        try:
            for w in map(int, args.workers.split(",")):
                os.environ["OMP_NUM_THREADS"] = str(max(1, threads // w))  # for the children
                stack = Stack(redis, args.model_dir, Path(tmp), workers=w, sync_wait_s=600,
                              max_queue=1000, heartbeat_s=5)
                try:
                    for c in clients:
                        # the engine runs just before each configuration (the workers idle),
                        # so the pair shares the machine's state
                        e = engine.rate(requests)
                        r = service_run(stack, args.model, images, args.n, c, requests)
                        rows.append({"figure": "service", "model": args.model, "n": args.n,
                                     "threads": threads, "workers": w, "clients": c, **r,
                                     "engine_images_per_s": round(e, 3),
                                     "overhead": round(1 - r["images_per_s"] / e, 3)})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    stack.close()
        finally:
            redis.stop()
    print(f"\nmodel {args.model}, n = {args.n:,}, {requests} requests per row, {threads} threads")
    print(f"{'workers':>8}{'clients':>8}{'engine/s':>10}{'images/s':>10}{'p50 s':>8}{'p95 s':>8}"
          f"{'overhead':>10}{'idle':>8}")
    for r in rows:
        print(f"{r['workers']:>8}{r['clients']:>8}{r['engine_images_per_s']:>10}"
              f"{r['images_per_s']:>10}{r['p50_s']:>8}{r['p95_s']:>8}{100 * r['overhead']:>9.1f}%"
              f"{100 * r['worker_idle']:>7.1f}%")

if __name__ == "__main__":
    main()
