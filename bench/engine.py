"""Sampling throughput of the engine against Cohen et al.'s CERTIFY applied as its users would,
in paired runs of one process.

    python bench/engine.py --model models/mnist-splitz-quick [--repeats 5] [--record]
    python bench/engine.py --arch resnet --dataset cifar10 --depth 110 --device cuda  # no weights

The reference is locuslab/smoothing's `Smooth._sample_noise` (code/core.py) on this model: f1
once (nothing for input smoothing: f1 is empty there), then per batch the features repeated,
`randn_like` noise times sigma, f2 as trained (float32, BatchNorm unfolded, default memory
format) under `torch.no_grad`, argmax, and its Python counting loop; at the fastest of
--ref-batches, found first. The engine samples through `Smooth.sample_counts` at each batch of
--batches (and precision); then --repeats rounds alternate the reference and the engine at its
fastest batch in each precision, and the speed-ups of each round's pair are reported as median
and range, so a load that drifts during the run moves both sides of a ratio alike.

Prints one JSON line per figure, then a table. --record writes the fastest batch at the precision
the card gives on this device (default_precision) into the card, where the engine, evaluation
and workers take it from. --arch times an architecture of the registry with random weights
(speed does not depend on them).
"""

import argparse  # noqa: I001  (splitz before torch: it sets the OpenMP spin torch loads with)
import json
import statistics
import time

import splitz  # noqa: F401
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from splitz import Smooth, checkpoint, load_model
from splitz.nets import SplitModel, create_model
from splitz.noise import NoiseStream
from splitz.smoothing import default_precision


def f2_flops(smooth: Smooth) -> float:
    """FLOPs of f2 for one sample (matmuls and convs, as counted by torch)."""
    z = smooth._features(torch.rand(1, *smooth.model.input_shape))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        smooth.model.f2(z)
    return float(counter.get_total_flops())


def engine_rate(smooth: Smooth, x: torch.Tensor, n: int) -> float:
    """Noise samples per second through the engine's sampler (f1 once, f2 in batches)."""
    z = smooth._features(x[None])
    streams = smooth._streams([0])
    with torch.inference_mode():
        smooth.sample_counts(z, min(n, smooth.batch_size), streams)  # warm up
        _sync(smooth.device)
        t = time.perf_counter()
        smooth.sample_counts(z, n, streams)  # ends with .cpu(): synchronized
    return n / (time.perf_counter() - t)


def reference_rate(model: SplitModel, x: torch.Tensor, n: int, batch: int,
                   device: torch.device) -> float:
    """Samples per second of Cohen et al.'s `_sample_noise` + `_count_arr` on f2, f1 run once."""
    counts = np.zeros(model.num_classes, dtype=int)
    with torch.no_grad():
        z = model.f1(x[None].to(device))
        model.f2(z.repeat((min(batch, n), 1, 1, 1)))  # warm up
        _sync(device)
        t = time.perf_counter()
        remaining = n
        while remaining > 0:
            this = min(batch, remaining)
            remaining -= this
            noisy = z.repeat((this, 1, 1, 1))
            noise = torch.randn_like(noisy) * model.sigma
            predictions = model.f2(noisy + noise).argmax(1)
            for idx in predictions.cpu().numpy():
                counts[idx] += 1
    return n / (time.perf_counter() - t)


def noise_seconds(smooth: Smooth, x: torch.Tensor, batch: int) -> float:
    """Seconds per sample to draw the split's Gaussian noise alone, as the sampler does."""
    buf, z, stream = _noisy_batch(smooth, x, batch)
    return _best(lambda: smooth.draw_noisy([(buf, z, stream)]), smooth.device) / batch


def f2_seconds(smooth: Smooth, x: torch.Tensor, batch: int) -> float:
    """Seconds per sample of the engine's f2 alone on a noisy batch: its speed if drawing the
    noise were free."""
    buf = _noisy_batch(smooth, x, batch)[0]
    noisy = buf.to(smooth.dtype, memory_format=torch.channels_last)
    with torch.inference_mode():
        return _best(lambda: smooth.f2(noisy).argmax(dim=1), smooth.device) / batch


def reference_f2_seconds(model: SplitModel, x: torch.Tensor, batch: int,
                         device: torch.device) -> float:
    """Seconds per sample of f2 as the reference runs it (as trained: float32, BatchNorm
    unfolded, default memory format) alone on a noisy batch."""
    with torch.no_grad():
        z = model.f1(x[None].to(device))
        noisy = z.repeat((batch, 1, 1, 1)) + torch.randn_like(z.repeat((batch, 1, 1, 1)))
        return _best(lambda: model.f2(noisy).argmax(1), device) / batch


def _noisy_batch(smooth: Smooth, x: torch.Tensor,
                 batch: int) -> tuple[torch.Tensor, torch.Tensor, NoiseStream]:
    """A batch of noisy features of x as the sampler draws them, its z and noise stream."""
    z = smooth._features(x[None])[0]
    buf = torch.empty(batch, *z.shape, device=smooth.device)
    stream = smooth._streams([0])[0]
    smooth.draw_noisy([(buf, z, stream)])
    return buf, z, stream


def _best(step, device: torch.device, repeat: int = 20) -> float:
    """Fastest of `repeat` timed calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model directory")
    what.add_argument("--arch", help="registry architecture, random weights")
    p.add_argument("--dataset", default="cifar10", help="with --arch")
    p.add_argument("--split", default="input", help="with --arch")
    p.add_argument("--depth", type=int, help="with --arch resnet")
    p.add_argument("--batch", type=int, default=1000, help="with --arch: the engine's batch")
    p.add_argument("--batches", default="50,100,200,500,1000", help="engine batch sweep")
    p.add_argument("--ref-batches", default="50,100,200,400,1000", help="reference batch sweep")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--n", type=int, default=20_000, help="samples per measurement")
    p.add_argument("--repeats", type=int, default=5, help="paired rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", action="store_true", help="store the fastest batch in the card")
    args = p.parse_args()
    if args.model:
        loaded = load_model(args.model)
        model, name, batch = loaded.model, loaded.card.id, loaded.card.batch_size
    else:
        model = create_model(args.arch, args.dataset, args.split, 0.25,
                             **({"depth": args.depth} if args.depth else {}))
        name = f"{args.arch}{args.depth or ''}-{args.dataset}-{args.split} (random weights)"
        batch = args.batch
    device = torch.device(args.device)
    x = torch.rand(*model.input_shape)
    reference_model = model.to(device).eval()
    precisions = args.precisions.split(",")
    rows = []

    def emit(**fields):
        rows.append(fields)
        print(json.dumps(fields), flush=True)

    base = Smooth(model, batch, args.device, precision="float32")
    flops = f2_flops(base)
    emit(figure="f2_flops_per_sample", model=name, value=flops, device=_name(args.device))
    noise = noise_seconds(base, x, batch)
    alone = f2_seconds(base, x, batch)
    emit(figure="noise", batch=batch, us_per_sample=round(noise * 1e6, 1))
    emit(figure="f2_alone", precision="float32", batch=batch,
         us_per_sample=round(alone * 1e6, 1), gflops=round(flops / alone / 1e9, 1))
    trained = reference_f2_seconds(reference_model, x, batch, device)
    emit(figure="f2_alone_as_trained", precision="float32", batch=batch,
         us_per_sample=round(trained * 1e6, 1), engine_speedup=round(trained / alone, 2))
    ref_batches = {b: reference_rate(reference_model, x, args.n, b, device)
                   for b in map(int, args.ref_batches.split(","))}
    ref_batch = max(ref_batches, key=ref_batches.get)
    for b, rate in ref_batches.items():
        emit(figure="reference", batch=b, samples_per_s=round(rate))
    for precision in precisions:
        for b in map(int, args.batches.split(",")):
            rate = engine_rate(Smooth(model, b, args.device, precision=precision), x, args.n)
            emit(figure="engine", precision=precision, batch=b, samples_per_s=round(rate),
                 speedup=round(rate / ref_batches[ref_batch], 2))
    best = {pr: max((r for r in rows if r["figure"] == "engine" and r["precision"] == pr),
                    key=lambda r: r["samples_per_s"])["batch"] for pr in precisions}
    engines = {pr: Smooth(model, best[pr], args.device, precision=pr) for pr in precisions}
    paired = {"reference": [], **{pr: [] for pr in precisions}}
    for _ in range(args.repeats):
        paired["reference"].append(reference_rate(reference_model, x, args.n, ref_batch, device))
        for pr, smooth in engines.items():
            paired[pr].append(engine_rate(smooth, x, args.n))
    for pr in precisions:
        ratios = [e / r for e, r in zip(paired[pr], paired["reference"], strict=True)]
        emit(figure="paired", precision=pr, batch=best[pr], reference_batch=ref_batch,
             repeats=args.repeats, samples_per_s=_spread(paired[pr]),
             reference_samples_per_s=_spread(paired["reference"]), speedup=_spread(ratios))
    print(f"\nmodel {name}: f2 = {flops / 1e6:.1f} MFLOP/sample; noise "
          f"{noise * 1e6:.0f} us/sample, f2 alone {alone * 1e6:.0f} us/sample (float32, batch "
          f"{batch}; as trained {trained * 1e6:.0f}); reference fastest at batch {ref_batch}")
    print(f"{'paired rounds (' + str(args.repeats) + ')':<28}{'samples/s median':>18}"
          f"{'range':>18}{'x reference median':>20}{'range':>14}")
    for r in rows:
        if r["figure"] == "paired":
            s, q = r["samples_per_s"], r["speedup"]
            print(f"{'engine ' + r['precision'] + ' batch ' + str(r['batch']):<28}"
                  f"{s['median']:>18,.0f}"
                  f"{s['min']:>9,.0f}-{s['max']:<8,.0f}{q['median']:>20}"
                  f"{q['min']:>8}-{q['max']:<5}")
    ref = _spread(paired["reference"])
    print(f"{'reference batch ' + str(ref_batch):<28}{ref['median']:>18,.0f}"
          f"{ref['min']:>9,.0f}-{ref['max']:<8,.0f}")
    if args.record and args.model:
        own = [r for r in rows
               if r["figure"] == "engine" and r["precision"] == default_precision(
                   loaded.card.precision, args.device)]
        best = max(own, key=lambda r: r["samples_per_s"])["batch"]
        card = checkpoint.update_card(args.model, lambda c: setattr(c, "batch_size", best))
        print(f"recorded batch_size={card.batch_size} in {args.model}/card.json")


def _name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
