"""The sampler's noise: the same draws on any thread count, fresh seeds, standard normal."""

import multiprocessing
import os

import pytest
import torch
from scipy import stats

from splitz import Smooth
from splitz.nets import create_model
from splitz.noise import BLOCK, SEEDS, NoiseStream, fill_normal

CPU = torch.device("cpu")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def noise(seed: int, chunks: list[int]) -> torch.Tensor:
    stream = NoiseStream(seed, CPU)
    outs = [torch.empty(m, 3, 4, 4) for m in chunks]
    fill_normal([b for out in outs for b in stream.blocks(out)])
    return torch.cat(outs)


def test_draws_and_votes_do_not_depend_on_the_thread_count(threads):
    smooth = Smooth(create_model("lenet", "mnist", "conv1", sigma=0.5), batch_size=120)
    x = torch.rand(2, 1, 28, 28)
    runs = []
    for t in (1, 2, 3):
        threads(t)
        runs.append((noise(7, [100, 60, 3]), smooth.certify(x, n0=50, n=500, seed=5)))
    for draws, certs in runs[1:]:
        assert torch.equal(draws, runs[0][0])
        assert [c.n_a for c in certs] == [c.n_a for c in runs[0][1]]


def test_no_two_blocks_of_an_image_share_a_seed():
    stream = NoiseStream(0, CPU)
    stream.next_seed = SEEDS - 3  # wraps around torch's 32-bit seed range
    seeds = [g.initial_seed() for m in (100, 7, BLOCK * 40 + 1)
             for _, g in stream.blocks(torch.empty(m, 2))]
    assert len(seeds) == 4 + 1 + 41
    assert len(set(seeds)) == len(seeds) and max(seeds) < SEEDS
    assert NoiseStream(1, CPU).next_seed != NoiseStream(2, CPU).next_seed


def test_draws_are_independent_standard_normals(threads):
    threads(2)
    draws = noise(3, [200, 200, BLOCK]).reshape(17, -1)  # rows: the 17 consecutive blocks
    assert stats.kstest(draws.flatten().double().numpy(), "norm").pvalue > 1e-4
    # neighbouring blocks (different generators) and samples uncorrelated
    for a, b in [(draws[:-1], draws[1:]), (draws[:, :-1], draws[:, 1:])]:
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(r)) < 5 / a.numel() ** 0.5


def _child_draws(expected: torch.Tensor) -> None:
    torch.set_num_threads(2)
    os._exit(0 if torch.equal(noise(7, [100]), expected) else 1)


def test_a_forked_child_draws_on_its_own_threads(threads):
    threads(2)
    expected = noise(7, [100])  # the parent's pool now exists; its threads do not fork
    child = multiprocessing.get_context("fork").Process(target=_child_draws, args=(expected,))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()  # waiting forever on the parent's pool
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0


@pytest.mark.parametrize("std", [0.12, 0.25, 0.5, 1.0, 3.7])
def test_drawing_with_std_gives_the_floats_of_drawing_then_scaling(std):
    outs = [torch.empty(60, 3, 4, 4) for _ in range(2)]
    fill_normal([(outs[0], torch.Generator().manual_seed(9))], std=std)
    fill_normal([(outs[1], torch.Generator().manual_seed(9))])
    assert torch.equal(outs[0], outs[1].mul_(std))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_noisy_batch_is_shifted_rounded_and_laid_out_in_one_pass_with_the_same_floats(precision):
    """draw_noisy into f2's dtype and channels_last equals z + sigma * N(0, 1), drawn, scaled and
    shifted in float32 and converted afterwards (the sampler's old three passes)."""
    smooth = Smooth(create_model("lenet", "mnist", "conv1", sigma=0.5), precision=precision)
    z = torch.randn(3, 4, 4)
    out = torch.empty(60, 3, 4, 4, dtype=smooth.dtype, memory_format=torch.channels_last)
    smooth.draw_noisy([(out, z, NoiseStream(4, CPU))])
    expected = noise(4, [60]).mul_(0.5).add_(z)
    assert torch.equal(out, expected.to(smooth.dtype, memory_format=torch.channels_last))
