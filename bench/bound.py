"""The Theorem 1 radius search (lipschitz.input_radius) against the dense-eigenvalue reference.

    python bench/bound.py --models models/mnist-splitz-quick,models/cifar10-splitz-s0.25-quick

For each model: test images 0, every, 2 every, ... and feature radii R_z = sigma * Phi^-1(p) for
p in 0.9, 0.99, 0.999. The engine proves each bisection step with a banded Cholesky test; the
reference is the search splitz used before: a full float64 `eigvalsh` of the masked Gram at
every step (the same Gram, made dense), keeping the best certificate evaluated. Prints a JSON
line per model (seconds per search, speed-up, largest relative radius difference) and a table.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from scipy.stats import norm

from splitz import data, load_model
from splitz.lipschitz import GAMMA_REL_TOL, REL_MARGIN, F1Bound, input_radius


def dense_norm(bound: F1Bound, mask: torch.Tensor) -> float:
    band = next(bound._bands(mask))
    d = bound.dim
    g = np.zeros((d, d))
    for k in range(bound.bandwidth + 1):
        idx = np.arange(d - k)
        g[idx + k, idx] = g[idx, idx + k] = band[k, :d - k]
    return math.sqrt(max(0.0, float(np.linalg.eigvalsh(g)[-1])) * (1 + REL_MARGIN))


def reference_radius(bound: F1Bound, x: torch.Tensor, r_z: float) -> float:
    """The earlier search for one image: bisection on gamma with a dense eigvalsh per step."""
    u = bound.preactivation(x)

    def lip(gamma: float) -> float:
        mask = bound.can_change(u, torch.tensor([gamma], dtype=torch.float64))
        return min(dense_norm(bound, mask), bound.global_bound)

    slack = float(bound.float_slack(x, torch.tensor([r_z / lip(0.0)]))[0])
    r_z = max(0.0, r_z - slack)
    lo, hi = r_z / bound.global_bound, r_z / lip(0.0)
    best = lo
    while hi - lo > GAMMA_REL_TOL * lo:
        mid = (lo + hi) / 2
        lm = lip(mid)
        best = max(best, min(r_z / lm, mid))
        lo, hi = (mid, hi) if mid * lm <= r_z else (lo, mid)
    return best


def run(model: str, every: int, limit: int) -> dict:
    loaded = load_model(model)
    m = loaded.model.eval()
    bound = F1Bound(m.f1, m.input_shape)
    test = data.load(loaded.card.dataset, train=False)
    xs = [test[i][0][None] for i in range(0, every * limit, every)]
    radii = [m.sigma * norm.ppf(p) for p in (0.9, 0.99, 0.999)]
    fast = slow = 0.0
    worst = 0.0
    for x in xs:
        for r_z in radii:
            t = time.perf_counter()
            ours = float(input_radius(bound, x, torch.tensor([r_z], dtype=torch.float64)).radius)
            fast += time.perf_counter() - t
            t = time.perf_counter()
            ref = reference_radius(bound, x, r_z)
            slow += time.perf_counter() - t
            worst = max(worst, abs(ours - ref) / ref)
    searches = len(xs) * len(radii)
    return {"figure": "theorem1_search", "model": loaded.card.id, "dim": bound.dim,
            "bandwidth": bound.bandwidth, "searches": searches,
            "engine_s": round(fast / searches, 4), "reference_s": round(slow / searches, 4),
            "speedup": round(slow / fast, 1), "max_rel_radius_diff": float(f"{worst:.2e}")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="models/mnist-splitz-quick,"
                                       "models/cifar10-splitz-s0.25-quick")
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(m, args.every, args.images) for m in args.models.split(",")]
    for r in rows:
        print(json.dumps(r))
    print(f"\n{'model':32} {'d':>5} {'band':>5} {'engine s':>9} {'reference s':>12} "
          f"{'speed-up':>9} {'max rel diff':>13}")
    for r in rows:
        print(f"{r['model']:32} {r['dim']:5d} {r['bandwidth']:5d} {r['engine_s']:9.3f} "
              f"{r['reference_s']:12.3f} {r['speedup']:8.1f}x {r['max_rel_radius_diff']:13.1e}")


if __name__ == "__main__":
    main()
