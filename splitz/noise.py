"""The sampler's Gaussian noise: reproducible from a seed, drawn on all CPU threads.

torch draws normals on one CPU thread per generator (one Mersenne Twister, serial), which caps
the sampler on a multi-core CPU: with f2 at the float32 matmul peak, drawing the noise would
be a quarter of the MNIST LeNet's time on one thread, 40 % on two, 73 % on eight. So on the CPU an
image's noise comes in blocks of BLOCK samples, block k from its own generator seeded with
base + k (base: one draw of a generator seeded with the image's seed). Blocks are filled in
parallel; their draws depend on the seed and the chunk sizes only, never on the thread count,
and no two blocks of one image share a seed (torch's CPU seeds are 32-bit: an image would need
2^32 blocks). On a GPU one device generator draws each chunk (the device is already parallel).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import torch
from torch import Tensor

BLOCK = 25  # samples per CPU generator: 1.6-2.4 ms of draws for the shipped models
SEEDS = 2**32  # torch seeds its CPU Mersenne Twister with the seed's low 32 bits


class NoiseStream:
    """One image's noise, chunk after chunk."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        if device.type == "cpu":
            first = torch.Generator().manual_seed(seed)
            self.next_seed = int(torch.randint(SEEDS, (1,), generator=first))
        else:
            self.gen = torch.Generator(device).manual_seed(seed)

    def blocks(self, out: Tensor) -> list[tuple[Tensor, torch.Generator]]:
        """`out` (the next chunk's samples) cut into the pieces to fill, each with its generator."""
        if self.device.type != "cpu":
            return [(out, self.gen)]
        parts = out.split(BLOCK)
        gens = [torch.Generator().manual_seed((self.next_seed + k) % SEEDS)
                for k in range(len(parts))]
        self.next_seed += len(parts)
        return list(zip(parts, gens, strict=True))


def fill_normal(blocks: list[tuple[Tensor, torch.Generator]], std: float = 1.0) -> None:
    """Fill every block with N(0, std^2) draws from its generator, on torch's thread count
    (normal_ releases the GIL, and each generator has its own lock). normal_ computes
    std * x + 0 from the same standard draw x, so the floats equal those of drawing N(0, 1)
    and multiplying by std afterwards (test_noise.py), one pass fewer."""
    draw = partial(_draw, std=std)
    if min(torch.get_num_threads(), len(blocks)) <= 1:
        for block in blocks:
            draw(block)
    else:
        list(_pool(torch.get_num_threads(), os.getpid()).map(draw, blocks))


def _draw(block: tuple[Tensor, torch.Generator], std: float) -> None:
    out, gen = block
    with torch.inference_mode(out.is_inference()):  # the mode is per thread: the caller's
        out.normal_(0.0, std, generator=gen)


@cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count and process (a forked child has the pool but not its threads)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="noise")
