"""May this model certify with a bfloat16 f2? The rule (issue 12, item 4): on 100 test images,
certified accuracy may move by at most one point at every radius; the certificate is then for the
bfloat16 classifier, which the card records.

    python bench/precision.py --model models/mnist-splitz-quick \
        --out-dir precision-mnist-splitz-quick [--limit 100 --n 10000] [--record]

Evaluates the same images with the same seeds and batch size in float32 and bfloat16 (two
`splitz evaluate` TSVs in --out-dir, resumed if present), prints both tables and the largest
change, and with --record, when the rule holds, sets the card's precision to bfloat16 and files
the comparison in its metrics.
"""

import argparse
from pathlib import Path

from splitz import checkpoint, load_model
from splitz.errors import SplitzError
from splitz.evaluate import Protocol, evaluate, markdown_table

TOLERANCE_POINTS = 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True, help="where the two TSVs go")
    p.add_argument("--every", type=int, help="default: 10 for MNIST, 20 for CIFAR-10")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--data", help="test set (default: the card's)")
    p.add_argument("--record", action="store_true", help="set the card to bfloat16 if it holds")
    args = p.parse_args()
    loaded = load_model(args.model)
    runs = {}
    for precision in ("float32", "bfloat16"):
        try:
            protocol = Protocol.of(loaded, args.data, args.every, n=args.n, precision=precision)
            test_set = "" if protocol.data == loaded.card.dataset else f"-{protocol.data}"
            every = protocol.every
            tsv = args.out_dir / (f"{loaded.card.id}{test_set}-every{every}-first{args.limit}-"
                                  f"n{args.n}-{precision}.tsv")
            runs[precision] = evaluate(loaded, tsv, protocol, args.limit)
        except SplitzError as e:  # e.g. a TSV of another protocol, a test set of another model
            raise SystemExit(f"precision.py: error: {e}") from None
    print(markdown_table(runs))
    change = max(abs(a - b) * 100 for a, b in zip(
        runs["float32"].certified_accuracy.values(), runs["bfloat16"].certified_accuracy.values(),
        strict=True))
    holds = change <= TOLERANCE_POINTS and runs["float32"].images >= args.limit
    print(f"\nlargest change of certified accuracy: {change:.1f} points on "
          f"{runs['float32'].images} images: bfloat16 {'qualifies' if holds else 'does not'}")
    if args.record and holds:
        def qualify(card: checkpoint.ModelCard) -> None:
            card.precision = "bfloat16"
            card.metrics["precision_check"] = {
                "images": runs["float32"].images, "every": every, "n": args.n,
                "largest_change_points": round(change, 2),
                "certified_accuracy": {pr: {str(r): a for r, a in s.certified_accuracy.items()}
                                       for pr, s in runs.items()}}

        checkpoint.update_card(args.model, qualify)
        print(f"recorded precision=bfloat16 in {args.model}/card.json")


if __name__ == "__main__":
    main()
