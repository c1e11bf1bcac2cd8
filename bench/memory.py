"""Peak resident memory of a worker-like process certifying one image, for growing n.

    python bench/memory.py --model models/cifar10-splitz-quick [--ns 1000,10000,100000]

Each n runs in a fresh process (load the model as a worker does, certify one image, report
ru_maxrss), so the peaks do not mix. The engine samples in chunks of the batch size, so the peak
should not grow with n. Prints a JSON line per n, then a table.
"""

import argparse
import json
import resource
import subprocess
import sys


def child(model: str, n: int, batch: int | None) -> dict:
    import torch

    from splitz import Smooth, load_model

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = load_model(model)
    smooth = Smooth.from_checkpoint(loaded, batch)
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    smooth.certify(torch.rand(*loaded.model.input_shape), n0=100, n=n)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"figure": "peak_rss", "model": loaded.card.id, "n": n, "batch": smooth.batch_size,
            "rss_after_import_mib": round(before / 1024, 1),
            "rss_after_load_mib": round(loaded_kib / 1024, 1),
            "peak_rss_mib": round(peak / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--ns", default="1000,10000,100000")
    p.add_argument("--batch", type=int, help="default: the model card's")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.batch)))
        return
    rows = []
    for n in map(int, args.ns.split(",")):
        cmd = [sys.executable, __file__, "--model", args.model, "--child", str(n)]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmodel {rows[0]['model']}, batch {rows[0]['batch']}")
    print(f"{'n':>10}{'after load MiB':>16}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['n']:>10}{r['rss_after_load_mib']:>16}{r['peak_rss_mib']:>10}")


if __name__ == "__main__":
    main()
