"""Certification throughput of the engine against (a) Cohen et al.'s CERTIFY followed literally
and (b) this machine's matmul peak, all measured in one process run.

    python bench/engine.py --model models/mnist-splitz-quick [--batches 100,1000,10000] [--record]

Prints one JSON line per figure, then a table; "% of peak" compares with the matmul peak of the
same precision. The reference pushes every sample through the
whole network, one image at a time, batch 400, noise drawn on the CPU, counting in a Python loop
(locuslab/smoothing `core.py`). --record writes the fastest batch size at the card's precision
into the model card, where the engine, evaluation and workers take it from.
"""

import argparse  # noqa: I001  (splitz before torch: it sets the OpenMP spin torch loads with)
import json
import time

import splitz  # noqa: F401
import torch
from torch.utils.flop_counter import FlopCounterMode

from splitz import Smooth, checkpoint, load_model
from splitz.noise import NoiseStream


def matmul_peak(dtype: torch.dtype, device: str, size: int = 2048, seconds: float = 2.0,
                repeat: int = 1) -> float:
    """Best sustained GFLOP/s of square matmuls in `dtype` (`repeat` per timing, for GPUs)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        t = time.perf_counter()
        for _ in range(repeat):
            a @ b
        _sync(device)
        best = max(best, repeat * 2 * size**3 / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


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
        t = time.perf_counter()
        smooth.sample_counts(z, n, streams)  # ends with .cpu(): synchronized
    return n / (time.perf_counter() - t)


def noise_seconds(smooth: Smooth, x: torch.Tensor, batch: int) -> float:
    """Seconds per sample to draw the split's Gaussian noise alone, as the sampler does."""
    buf, z, stream = _noisy_batch(smooth, x, batch)
    return _best(lambda: smooth.draw_noisy([(buf, z, stream)]), smooth.device) / batch


def f2_seconds(smooth: Smooth, x: torch.Tensor, batch: int) -> float:
    """Seconds per sample of f2 alone on a noisy batch, as the sampler calls it: the engine's
    speed if drawing the noise were free."""
    buf = _noisy_batch(smooth, x, batch)[0]
    noisy = buf.to(smooth.dtype, memory_format=torch.channels_last)
    with torch.inference_mode():
        return _best(lambda: smooth.f2(noisy).argmax(dim=1), smooth.device) / batch


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


def reference_rate(smooth: Smooth, x: torch.Tensor, n: int, batch: int = 400) -> float:
    """Cohen et al.'s _sample_noise, literally: whole network per sample, CPU noise, a Python
    counting loop."""
    model, sigma = smooth.model, smooth.model.sigma
    counts = [0] * model.num_classes
    x = x.to(smooth.device)
    t = time.perf_counter()
    with torch.no_grad():
        remaining = n
        while remaining > 0:
            this = min(batch, remaining)
            remaining -= this
            z = model.f1(x[None].repeat(this, 1, 1, 1))  # f1 again for every copy
            noise = torch.randn(z.shape).to(smooth.device)
            preds = model.f2(z + noise * sigma).argmax(1)
            for p in preds.cpu().numpy():
                counts[p] += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="50,100,200,500,1000,10000")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--n", type=int, default=20_000, help="samples per measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", action="store_true", help="store the fastest batch in the card")
    args = p.parse_args()
    loaded = load_model(args.model)
    x = torch.rand(*loaded.model.input_shape)
    rows = []

    def emit(**fields):
        rows.append(fields)
        print(json.dumps(fields), flush=True)

    gpu = args.device.startswith("cuda")
    repeat, size = (20, 8192) if gpu else (1, 2048)
    peak32, peak16 = (matmul_peak(d, args.device, size, repeat=repeat)
                      for d in (torch.float32, torch.bfloat16))
    emit(figure="matmul_peak_gflops", device=_name(args.device), float32=round(peak32, 1),
         bfloat16=round(peak16, 1))
    base = Smooth.from_checkpoint(loaded, device=args.device, precision="float32")
    flops = f2_flops(base)
    emit(figure="f2_flops_per_sample", value=flops)
    # Drawing the noise is work f2's FLOPs do not count: with f2 at the float32 peak, the
    # engine could reach at most this fraction of it.
    noise = noise_seconds(base, x, loaded.card.batch_size)
    at_peak = flops / (peak32 * 1e9)
    emit(figure="noise", us_per_sample=round(noise * 1e6, 1),
         ceiling_fraction_of_peak=round(at_peak / (at_peak + noise), 3))
    # f2's own kernels (oneDNN convolutions) can beat the GEMM peak: the f2-only rate is the
    # engine's other ceiling.
    alone = f2_seconds(base, x, loaded.card.batch_size)
    emit(figure="f2_alone", precision="float32", batch=loaded.card.batch_size,
         us_per_sample=round(alone * 1e6, 1), gflops=round(flops / alone / 1e9, 1),
         fraction_of_peak=round(flops / alone / 1e9 / peak32, 3))
    ref = reference_rate(base, x, args.n if gpu else min(args.n, 4000))
    emit(figure="reference", precision="float32", samples_per_s=round(ref),
         s_per_image_100k=round(1e5 / ref, 2), speedup=1.0,
         fraction_of_peak=round(flops * ref / 1e9 / peak32, 3))
    peaks = {"float32": peak32, "bfloat16": peak16}
    for precision in args.precisions.split(","):
        for b in map(int, args.batches.split(",")):
            smooth = Smooth.from_checkpoint(loaded, b, args.device, precision)
            rate = engine_rate(smooth, x, args.n)
            emit(figure="engine", precision=precision, batch=b, samples_per_s=round(rate),
                 s_per_image_100k=round(1e5 / rate, 2), speedup=round(rate / ref, 2),
                 fraction_of_peak=round(flops * rate / 1e9 / peaks[precision], 3))
    print(f"\nmodel {loaded.card.id}: f2 = {flops / 1e6:.1f} MFLOP/sample; matmul peak "
          f"{peak32:.0f} GFLOP/s float32, {peak16:.0f} bfloat16; noise {noise * 1e6:.0f} us/sample "
          f"(float32 ceiling {100 * at_peak / (at_peak + noise):.0f} % of peak); f2 alone "
          f"{flops / alone / 1e9:.0f} GFLOP/s float32 at batch {loaded.card.batch_size}")
    print(f"{'run':<30}{'samples/s':>12}{'s/image @1e5':>14}{'x ref':>8}{'% of peak':>11}")
    for r in rows:
        if r["figure"] not in ("reference", "engine"):
            continue
        name = ("reference (batch 400)" if r["figure"] == "reference"
                else f"engine {r['precision']} batch {r['batch']}")
        print(f"{name:<30}{r['samples_per_s']:>12}{r['s_per_image_100k']:>14}"
              f"{r['speedup']:>8}{100 * r['fraction_of_peak']:>10.1f}%")
    if args.record:
        own = [r for r in rows
               if r["figure"] == "engine" and r["precision"] == loaded.card.precision]
        card = checkpoint.read_card(args.model)  # fresh: the card may have changed meanwhile
        card.batch_size = max(own, key=lambda r: r["samples_per_s"])["batch"]
        checkpoint.write_card(card, args.model)
        print(f"recorded batch_size={card.batch_size} in {args.model}/card.json")


def _name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
