"""Early-stopping radius queries (Smooth.query) against fixed-n certification, on a test subset.

    python bench/radius_query.py --model models/mnist-splitz-quick --every 500 --radii 0.25,0.5,1

For each image (test images 0, every, 2 every, ...) the fixed-n CERTIFY runs once (n samples
after n0); "certified at r" is then `radius >= r`. Each radius query samples in geometric rounds
and stops when decided. Prints a JSON line per radius and overall: mean samples used (n0
included on both sides) as a share of the fixed n0 + n, and how many answers changed.
"""

import argparse  # noqa: I001  (splitz before torch: it sets the OpenMP spin torch loads with)
import json

import splitz  # noqa: F401
import torch
from tqdm import tqdm

from splitz import Smooth, data, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--radii", default="0.25,0.5,0.75,1.0,1.5")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--first", type=int, default=1000, help="samples at the first look")
    p.add_argument("--alpha", type=float, default=0.001)
    args = p.parse_args()
    loaded = load_model(args.model)
    smooth = Smooth.from_checkpoint(loaded)
    test = data.load(loaded.card.dataset, train=False)
    radii = [float(r) for r in args.radii.split(",")]
    stats = {r: {"used": 0, "lost": 0, "gained": 0, "certified_fixed": 0} for r in radii}
    indices = range(0, len(test), args.every)
    for idx in tqdm(indices, desc="images", unit="image"):
        x = test[idx][0]
        fixed = smooth.certify(x, n=args.n, alpha=args.alpha, seed=idx)[0]
        for r in radii:
            q = smooth.query(x, r, alpha=args.alpha, n_max=args.n, first=args.first, seed=idx)[0]
            was = not fixed.abstained and fixed.radius >= r
            s = stats[r]
            s["used"] += q.n0 + q.samples
            s["certified_fixed"] += was
            s["lost"] += was and not q.certified
            s["gained"] += q.certified and not was
    rows = []
    fixed_cost = fixed.n0 + args.n
    for r in radii + ["all"]:
        s = ({k: sum(v[k] for v in stats.values()) for k in stats[radii[0]]} if r == "all"
             else stats[r])
        queries = len(indices) * (len(radii) if r == "all" else 1)
        rows.append({"figure": "radius_query", "model": loaded.card.id, "radius": r,
                     "queries": queries, "mean_samples": round(s["used"] / queries),
                     "share_of_fixed": round(s["used"] / queries / fixed_cost, 4),
                     "certified_fixed": s["certified_fixed"],
                     "certified_to_not": s["lost"], "not_to_certified": s["gained"],
                     "changed_share": round((s["lost"] + s["gained"]) / queries, 4)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmodel {loaded.card.id}: {len(indices)} images, fixed n0+n = {fixed_cost:,}, "
          f"alpha {args.alpha}, first look {args.first}")
    print(f"{'radius':>8}{'mean samples':>14}{'% of fixed':>12}{'cert. (fixed)':>15}"
          f"{'cert.->not':>12}{'not->cert.':>12}")
    for r in rows:
        print(f"{r['radius']!s:>8}{r['mean_samples']:>14}{100 * r['share_of_fixed']:>11.1f}%"
              f"{r['certified_fixed']:>15}{r['certified_to_not']:>12}{r['not_to_certified']:>12}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
