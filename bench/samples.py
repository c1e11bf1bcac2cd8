"""Samples per image for the same certificates: fixed-n CERTIFY vs adaptive certify vs radius
queries, on a standard test subset, in one run (issue 14, item 4).

    python bench/samples.py --model models/mnist-input-consistency-s0.5 --out samples-mnist.tsv \
        --fixed models/mnist-input-consistency-s0.5/eval-every10-n100000.tsv [--limit 200]

(docs/performance.md's first MNIST figures are of mnist-cohen-s1.0 and
mnist-splitz-s1.0-theta1-g1, since retired: docs/retired/README.md restores their weights into
models/<id>.)

Image i (test images 0, every, 2 every, ... of --data) is certified adaptively (`--tolerance`,
budget --n) and queried at each radius of --radii (early stopping, at most --n votes), all with
the seed seed + i and the batch size of the fixed run, so each draws the same votes as the fixed
run, in the same order. The fixed-n column comes from --fixed, an existing `splitz evaluate` TSV
of the same model and images at n (its protocol, recorded in the card or beside the TSV, gives
the subset, order, batch size, seed and precision, and must match n0, n and alpha), or, without
it, from certifying here. One row per image is appended to --out and flushed, so an interrupted
run resumes where it stopped, under the options that wrote it only (<out>.protocol.json);
--summary prints the tables of an --out file without sampling.

Prints JSON lines, then markdown tables: mean samples per image (n0 included) with their share
of fixed n; certified accuracy per radius and ACR, fixed vs adaptive; per query radius, the share
of answers that agree with fixed n and the mean samples on pairs whose fixed radius is more than
0.1 away ("clear" pairs).
"""

import argparse  # noqa: I001  (splitz before torch: it sets the OpenMP spin torch loads with)
import csv
import json
import time
from dataclasses import asdict
from pathlib import Path

import splitz  # noqa: F401
import torch
from tqdm import tqdm

from splitz import Smooth, data, load_model
from splitz.errors import SplitzError
from splitz.evaluate import RADII, Protocol, claim, read_tsv, subset, summarize

# The queries' stopping rule, in the protocol so rows of an older rule are not resumed into:
# the confidence sequence, Clopper-Pearson's last look, and since 2026-12-07 "out of reach".
QUERY_STOP = "sequence at alpha/2, last look, out of reach"


def columns(radii: list[float]) -> list[str]:
    return (["idx", "label", "fixed_predict", "fixed_radius", "fixed_samples", "fixed_time",
             "adaptive_predict", "adaptive_radius", "adaptive_samples", "adaptive_bound",
             "adaptive_time"]
            + [f"q{r:g}_{k}" for r in radii for k in ("certified", "samples")] + ["query_time"])


def fixed_run(loaded, tsv: Path | None) -> tuple[dict[int, dict], dict]:
    """The fixed-n rows by image index and their evaluation's protocol: the card's record of
    it, else the protocol file beside the TSV ({} without either)."""
    if tsv is None:
        return {}, {}
    entry = next((m for m in loaded.card.metrics.values()
                  if isinstance(m, dict) and m.get("tsv") == tsv.name), None)
    sidecar = tsv.with_suffix(".protocol.json")
    if entry is None and sidecar.is_file():
        entry = json.loads(sidecar.read_text())
    return {int(r["idx"]): r for r in read_tsv(tsv)}, entry or {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="per-image TSV (appended, resumed)")
    p.add_argument("--fixed", type=Path, help="fixed-n evaluation TSV of the same model and n")
    p.add_argument("--data", help="test set (default: the fixed run's, else the card's)")
    p.add_argument("--every", type=int, help="every k-th test image (default: the fixed run's, "
                   "else 10 for MNIST, 20 for CIFAR-10)")
    p.add_argument("--limit", type=int, help="at most this many images")
    p.add_argument("--n", type=int, default=100_000, help="fixed n, and the budget of the others")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--tolerance", type=float, default=0.02, help="adaptive certify")
    p.add_argument("--radii", default="0.25,0.5,1.0,1.5,2.0", help="radius queries")
    p.add_argument("--batch", type=int, help="default: the fixed run's, else the card's")
    p.add_argument("--seed", type=int, help="image i uses seed + i (default: the fixed run's, 0)")
    p.add_argument("--summary", action="store_true", help="only summarize --out")
    args = p.parse_args()
    radii = [float(r) for r in args.radii.split(",")]
    if not args.summary:
        try:
            sample(args, radii)
        except SplitzError as e:  # e.g. a protocol other than the fixed run's or --out's
            raise SystemExit(f"samples.py: error: {e}") from None
    report(read_tsv(args.out), radii, args.n0 + args.n, args.model.name)


def sample(args, radii: list[float]) -> None:
    loaded = load_model(args.model)
    fixed, entry = fixed_run(loaded, args.fixed)
    protocol = Protocol.of(loaded, args.data or entry.get("data"), args.every or entry.get("every"),
                           entry.get("order", "index"), args.n0, args.n, args.alpha,
                           args.seed if args.seed is not None else entry.get("seed", 0),
                           entry.get("precision"), args.batch or entry.get("batch"))
    if args.fixed:  # its votes are the fixed column's only under the same protocol
        claim(args.fixed, asdict(protocol), entry)
    claim(args.out, asdict(protocol) | {"tolerance": args.tolerance, "radii": radii,
                                        "fixed": args.fixed.name if args.fixed else None,
                                        "query_stop": QUERY_STOP})
    smooth = Smooth.from_checkpoint(loaded, protocol.batch, precision=protocol.precision)
    test = data.load(protocol.data, train=False)
    indices = subset(len(test), protocol.every, protocol.order)
    if args.fixed:
        indices = [i for i in indices if i in fixed]
    indices = indices[:args.limit]
    new = not args.out.exists() or args.out.stat().st_size == 0  # killed before its header
    done = set() if new else {int(r["idx"]) for r in read_tsv(args.out)}
    print(f"model {loaded.card.id}: {protocol.data}, every {protocol.every}, {len(indices)} "
          f"images ({len(done)} done), batch {protocol.batch}, seed {protocol.seed} + i, "
          f"n {args.n}")
    with open(args.out, "a", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        if new:
            writer.writerow(columns(radii))
        for idx in tqdm([i for i in indices if i not in done], desc="images", unit="image"):
            x, label = test[idx]
            writer.writerow([idx, int(label),
                             *fixed_columns(smooth, x, idx, protocol.seed, fixed, args),
                             *measured_columns(smooth, x, idx + protocol.seed, radii, args)])
            f.flush()


def fixed_columns(smooth: Smooth, x: torch.Tensor, idx: int, seed: int, fixed: dict,
                  args) -> list:
    if idx in fixed:
        r = fixed[idx]
        return [r["predict"], r["radius"], args.n0 + args.n, r["time"]]
    c = smooth.certify(x, n0=args.n0, n=args.n, alpha=args.alpha, seed=seed + idx)[0]
    return [-1 if c.abstained else c.prediction, f"{c.radius:.6f}", args.n0 + c.n,
            f"{c.time_s:.3f}"]


def measured_columns(smooth: Smooth, x: torch.Tensor, seed: int, radii: list[float],
                     args) -> list:
    c = smooth.certify(x, n0=args.n0, n=args.n, alpha=args.alpha, seed=seed,
                       tolerance=args.tolerance)[0]
    row = [-1 if c.abstained else c.prediction, f"{c.radius:.6f}", args.n0 + c.n, c.bound,
           f"{c.time_s:.3f}"]
    start = time.perf_counter()
    for r in radii:
        a = smooth.query(x, r, alpha=args.alpha, n0=args.n0, n_max=args.n, seed=seed)[0]
        row += [int(a.certified), args.n0 + a.samples]
    return row + [f"{time.perf_counter() - start:.3f}"]


def report(rows: list[dict], radii: list[float], fixed_cost: int, name: str) -> None:
    """JSON lines and markdown tables of a samples TSV."""
    images = len(rows)
    mean = {k: sum(int(r[k]) for r in rows) / images
            for k in ("fixed_samples", "adaptive_samples")}
    runs = {}
    for kind in ("fixed", "adaptive"):
        runs[kind] = summarize([{"radius": r[f"{kind}_radius"],
                                 "correct": int(r[f"{kind}_predict"] == r["label"])}
                                for r in rows], RADII)
    seconds = {k: sum(float(r[f"{k}_time"]) for r in rows) / images
               for k in ("fixed", "adaptive", "query")}
    out = {"figure": "samples", "model": name, "images": images,
           "fixed_mean_samples": round(mean["fixed_samples"]),
           "adaptive_mean_samples": round(mean["adaptive_samples"]),
           "adaptive_share": round(mean["adaptive_samples"] / mean["fixed_samples"], 4),
           "fixed_acr": round(runs["fixed"].average_certified_radius, 4),
           "adaptive_acr": round(runs["adaptive"].average_certified_radius, 4),
           "mean_seconds": {k: round(v, 2) for k, v in seconds.items()}}
    print(json.dumps(out))
    queries = []
    for r in radii:
        was = [int(row["fixed_predict"]) >= 0 and float(row["fixed_radius"]) >= r
               for row in rows]
        said = [row[f"q{r:g}_certified"] == "1" for row in rows]
        used = [int(row[f"q{r:g}_samples"]) for row in rows]
        clear = [u for u, row in zip(used, rows, strict=True)
                 if abs(float(row["fixed_radius"]) - r) > 0.1]
        q = {"figure": "radius_query", "model": name, "radius": r, "pairs": images,
             "mean_samples": round(sum(used) / images),
             "share_of_fixed": round(sum(used) / images / fixed_cost, 4),
             "clear_pairs": len(clear),
             "clear_share_of_fixed": round(sum(clear) / max(len(clear), 1) / fixed_cost, 4),
             "agree": sum(w == s for w, s in zip(was, said, strict=True)),
             "certified_fixed": sum(was), "certified_query": sum(said)}
        queries.append(q)
        print(json.dumps(q))
    print(f"\n{name}: {images} images; mean samples per image (n0 included): fixed "
          f"{mean['fixed_samples']:,.0f}, adaptive {mean['adaptive_samples']:,.0f} "
          f"({100 * out['adaptive_share']:.1f} %)\n")
    print("| run | samples | " + " | ".join(f"ε={e:g}" for e in RADII) + " | ACR |")
    print("|" + "---|" * (len(RADII) + 3))
    for kind in ("fixed", "adaptive"):
        acc = " | ".join(f"{100 * a:.1f}" for a in runs[kind].certified_accuracy.values())
        print(f"| {kind} | {mean[f'{kind}_samples']:,.0f} | {acc} | "
              f"{runs[kind].average_certified_radius:.3f} |")
    print("\n| query radius | mean samples | % of fixed | clear pairs: % of fixed | agree | "
          "certified (fixed / query) |")
    print("|---|---|---|---|---|---|")
    for q in queries:
        print(f"| {q['radius']:g} | {q['mean_samples']:,} | {100 * q['share_of_fixed']:.1f} | "
              f"{100 * q['clear_share_of_fixed']:.1f} ({q['clear_pairs']}) | "
              f"{q['agree']}/{q['pairs']} | {q['certified_fixed']} / {q['certified_query']} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
