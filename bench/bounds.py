"""The sequential bounds alone, on simulated votes: which plan decides radius queries and adaptive
certification with the fewest samples while agreeing with fixed-n CERTIFY.

    python bench/bounds.py --model docs/retired/mnist-cohen-s1.0 \
        --tsv docs/retired/mnist-cohen-s1.0/eval-every10-first100-n100000.tsv --repeats 3

Only the model's card is read (sigma, batch size), so a retired model's folder in docs/retired
serves as well as a shipped one in models/ (e.g. models/mnist-input-consistency-s0.5 with its
eval-every10-n100000.tsv).

No network runs: each image of an n = 100,000 evaluation TSV gets a binomial vote stream, one
batch at a time, at the pA its fixed-n run measured (the share that gives its pA_lower), and each
plan (stats.SequentialBound) runs its stopping rule (smoothing.query_stop / adaptive_stop) on that
stream; "fixed" is Clopper-Pearson on all n votes of the same stream, which the randomized
Clopper-Pearson bound (a fresh uniform per stream) is also compared with. Radii are sigma
Phi^-1(pA bound) / L with the TSV's L. Prints one JSON line per plan.
"""

import argparse
import csv
import json
import math

import numpy as np
from scipy.stats import norm

from splitz import checkpoint
from splitz.evaluate import RADII
from splitz.smoothing import adaptive_plan, adaptive_stop, query_plan, query_stop
from splitz.stats import SequentialBound, clopper_pearson_lower, randomized_clopper_pearson_lower


def share_from_lower(p_lower: float, n: int, alpha: float) -> float:
    """The vote share k / n whose Clopper-Pearson bound is closest above p_lower (bisection on
    k: the bound increases with k)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if clopper_pearson_lower(mid, n, alpha) < p_lower else (lo, mid)
    return lo / n


def query_plans(n: int, alpha: float) -> dict[str, SequentialBound]:
    looks = [1000 * 2**j for j in range(math.ceil(math.log2(n / 1000)))] + [n]
    return {
        "bonferroni (looks 1000, 2000, ... at alpha/8)":
            SequentialBound(0.0, tuple((m, alpha / len(looks)) for m in looks)),
        "sequence at alpha": SequentialBound(alpha, ()),
        "sequence at alpha/2 + last look (engine)": query_plan(n, alpha),
    }


def adaptive_plans(n: int, alpha: float, batch: int) -> dict[str, SequentialBound]:
    ninth, third = (-(-n // d // batch) * batch for d in (9, 3))
    return {
        "sequence at alpha": SequentialBound(alpha, ()),
        "sequence at alpha/2 + last look": SequentialBound(alpha / 2, ((n, alpha / 2),)),
        "looks n/3, n at alpha/2 (engine)": adaptive_plan(n, alpha, batch),
        "looks n/9, n/3, n at alpha/4, alpha/4, alpha/2":
            SequentialBound(0.0, ((ninth, alpha / 4), (third, alpha / 4), (n, alpha / 2))),
    }


def run(plan: SequentialBound, counts: np.ndarray, sizes: np.ndarray, n: int, stop) -> tuple:
    """The first (k, t) of a vote stream at which stop(k, t) holds, or the last; its bound."""
    for k, t in zip(counts.tolist(), sizes.tolist(), strict=True):
        if t == n or stop(k, t):
            return plan.lower(k, t).value, t
    raise AssertionError("the stream ends at n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True,
                   help="model directory; only its card.json is read (sigma, batch size)")
    p.add_argument("--tsv", required=True, help="an evaluation TSV at n = --n")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, help="votes per look (default: the card's batch size)")
    p.add_argument("--radii", default="0.25,0.5,1.0,1.5,2.0", help="radius queries")
    p.add_argument("--tolerances", default="0.01,0.02", help="adaptive certify")
    p.add_argument("--repeats", type=int, default=3, help="vote streams per image")
    p.add_argument("--figures", default="queries,adaptive,randomized")
    args = p.parse_args()
    card = checkpoint.read_card(args.model)
    sigma, batch, n, alpha = card.sigma, args.batch or card.batch_size, args.n, args.alpha
    with open(args.tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    shares = [share_from_lower(float(r["pA_lower"]), n, alpha) for r in rows]
    radii = [float(r) for r in args.radii.split(",")]
    tolerances = [float(t) for t in args.tolerances.split(",")]
    sizes = np.minimum(np.arange(1, -(-n // batch) + 1) * batch, n)
    queries = {name: {"samples": 0, "clear_samples": 0, "clear": 0, "agree": 0, "pairs": 0}
               for name in query_plans(n, alpha)}
    adaptive = {(name, tol): {"samples": 0, "radius": [], "fixed": [], "correct": []}
                for name in adaptive_plans(n, alpha, batch) for tol in tolerances}
    randomized = {"radius": [], "fixed": [], "correct": []}
    figures = args.figures.split(",")
    rng = np.random.default_rng(0)
    for _ in range(args.repeats):
        for row, share in zip(rows, shares, strict=True):
            lip, correct = float(row["L"]), int(row["correct"])
            counts = np.cumsum(rng.binomial(np.diff(sizes, prepend=0), share))
            fixed_lower = clopper_pearson_lower(int(counts[-1]), n, alpha)
            fixed = sigma * float(norm.ppf(fixed_lower)) / lip if fixed_lower > 0.5 else 0.0
            if "randomized" in figures:
                low = randomized_clopper_pearson_lower(int(counts[-1]), n, alpha, rng.random())
                randomized["radius"].append(
                    sigma * float(norm.ppf(low)) / lip if low > 0.5 else 0.0)
                randomized["fixed"].append(fixed)
                randomized["correct"].append(correct)
            for r in radii if "queries" in figures else ():
                p_star = max(0.5, float(norm.cdf(r * lip / sigma)))
                for name, plan in query_plans(n, alpha).items():
                    low, t = run(plan, counts, sizes, n, lambda k, t, plan=plan, ps=p_star:
                                 query_stop(plan, k, t, n, (), ps))
                    q = queries[name]
                    q["pairs"] += 1
                    q["samples"] += t
                    q["agree"] += (low > p_star) == (fixed_lower > 0.5 and fixed >= r)
                    if abs(r - fixed) > 0.1:
                        q["clear"] += 1
                        q["clear_samples"] += t
            for name, plan in adaptive_plans(n, alpha, batch).items():
                for tol in tolerances if "adaptive" in figures else ():
                    low, t = run(plan, counts, sizes, n, lambda k, t, plan=plan, tol=tol:
                                 adaptive_stop(plan, k, t, n, (), tol))
                    a = adaptive[name, tol]
                    a["samples"] += t
                    a["radius"].append(sigma * float(norm.ppf(low)) / lip if low > 0.5 else 0.0)
                    a["fixed"].append(fixed)
                    a["correct"].append(correct)
    images = len(rows) * args.repeats
    for name, q in queries.items() if "queries" in figures else ():
        print(json.dumps({"figure": "radius_query", "plan": name, "pairs": q["pairs"],
                          "mean_share_of_n": round(q["samples"] / q["pairs"] / n, 4),
                          "clear_pairs": q["clear"],
                          "clear_mean_share_of_n": round(q["clear_samples"] / q["clear"] / n, 4),
                          "agreement_with_fixed": round(q["agree"] / q["pairs"], 4)}))
    for (name, tol), a in adaptive.items() if "adaptive" in figures else ():
        print(json.dumps({"figure": "adaptive_certify", "plan": name, "tolerance": tol,
                          "mean_share_of_n": round(a["samples"] / images / n, 4),
                          **against_fixed(a)}))
    if "randomized" in figures:
        print(json.dumps({"figure": "fixed_n", "bound": "randomized-clopper-pearson",
                          **against_fixed(randomized)}))


def against_fixed(run: dict) -> dict:
    """ACR over fixed n's, and the largest loss and gain of certified accuracy at any radius."""
    r, f, c = (np.array(run[k]) for k in ("radius", "fixed", "correct"))
    acc = [100 * (((r >= e) & (c == 1)).mean() - ((f >= e) & (c == 1)).mean()) for e in RADII]
    return {"acr_ratio": round(float((r * c).mean() / (f * c).mean()), 4),
            "worst_accuracy_change_points": round(min(acc), 2),
            "best_accuracy_change_points": round(max(acc), 2)}


if __name__ == "__main__":
    main()
