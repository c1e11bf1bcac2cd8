"""The Monte Carlo engine: sample noise at the split, count votes, certify and predict."""

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from scipy.stats import norm
from torch import Tensor
from tqdm import tqdm

from .checkpoint import LoadedModel
from .errors import InputError
from .inference import for_certification
from .lipschitz import F1Bound, input_radius
from .nets import SplitModel
from .noise import NoiseStream, fill_normal
from .stats import (
    CS_BOUND,
    FIXED_BOUNDS,
    LowerBound,
    SequentialBound,
    auxiliary_uniform,
    binomial_pvalue,
    clopper_pearson_lower,
    cs_lower,
    cs_upper,
    feature_radius,
    round_down,
)


@dataclass(frozen=True)
class Certificate:
    """One image's certificate, with every field needed to audit it (DESIGN.md §3).

    prediction is None when the engine abstains. Otherwise, with probability >= 1 - alpha over
    the sampling, the smoothed classifier g predicts `prediction` on the whole l2 ball of
    `radius` around the image, where radius = min(radius_feature / lipschitz, gamma), rounded down.
    """

    prediction: int | None
    radius: float
    radius_feature: float
    p_a_lower: float
    n_a: int
    n: int
    n0: int
    alpha: float
    sigma: float
    lipschitz: float
    gamma: float
    lipschitz_global: float
    float_slack: float  # taken off radius_feature for float rounding of f1 (see lipschitz.py)
    seed: int
    batch_size: int  # with the seed, reproduces the noise draws
    time_s: float
    model_id: str | None = None
    model_sha256: str | None = None
    precision: str = "float32"  # of f2 as computed: the certificate is for that classifier
    certified: bool | None = None  # whether the requested radius is certified, if one was asked
    query_radius: float | None = None
    seed_source: str = "client"  # see SEED_SOURCES
    # p_a_lower is the bound `bound` (stats.py) computed at level bound_level from n_a of n votes,
    # with bound_u the randomized bound's uniform draw (from the seed); `stopping` is "fixed"
    # (n planned) or the adaptive rule that stopped at n of at most `budget` votes.
    bound: str = "clopper-pearson"
    bound_level: float | None = None
    bound_u: float | None = None
    stopping: str = "fixed"
    budget: int | None = None
    # The card's preprocessing (e.g. "resize 256, center crop 224"): the radius is in the pixel
    # space of the image it makes, the model's input. None: the image's own pixels.
    preprocess: str | None = None

    @property
    def abstained(self) -> bool:
        return self.prediction is None

    def to_dict(self) -> dict:
        return asdict(self) | {"abstained": self.abstained}


@dataclass(frozen=True)
class Prediction:
    """Cohen et al.'s PREDICT: returns a class other than g(x) with probability <= alpha."""

    prediction: int | None
    n_a: int
    n_b: int
    p_value: float
    n: int
    alpha: float
    seed: int
    seed_source: str = "client"  # see SEED_SOURCES

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RadiusAnswer:
    """Whether `radius` is certified, decided by sequential sampling (Smooth.query).

    With probability >= 1 - alpha: if certified, g predicts `prediction` on the whole l2 ball of
    `radius`. p_a_lower is `bound` at level bound_level, valid at the data-dependent stop
    (stats.SequentialBound)."""

    certified: bool
    prediction: int | None
    radius: float
    samples: int  # estimation samples used, after the n0 selection samples
    n0: int
    looks: int
    n_a: int
    p_a_lower: float
    p_needed: float  # pA_lower had to exceed this: Phi((radius L_radius + slack) / sigma)
    lipschitz: float
    alpha: float
    seed: int
    seed_source: str = "client"  # see SEED_SOURCES
    bound: str = CS_BOUND
    bound_level: float | None = None
    bound_u: float | None = None
    preprocess: str | None = None  # as in Certificate: the radius is in its output's pixels

    def to_dict(self) -> dict:
        return asdict(self)


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_BFLOAT16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo: bfloat16 in hardware


def native_bfloat16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether `device` computes bfloat16 in hardware. Elsewhere torch emulates it, 8-10x slower
    than float32 (the MNIST LeNet and ResNet-20 on an AVX2 CPU, docs/performance.md)."""
    if device.type == "cuda":  # bfloat16 tensor cores from Ampere (compute capability 8.0)
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        with open(cpuinfo) as f:
            return any(not CPU_BFLOAT16_FLAGS.isdisjoint(line.split())
                       for line in f if line.startswith("flags"))
    except OSError:  # not Linux: not known to be native
        return False


def default_precision(card_precision: str, device: str | torch.device) -> str:
    """f2's precision when none is asked for: the card's, where the device computes it in
    hardware, else float32. Our cards say bfloat16 only after their certified accuracy held at
    bfloat16 (bench/precision.py), so either precision certifies the model as measured; each
    certificate records the one it used."""
    if card_precision == "float32" or native_bfloat16(parse_device(str(device))):
        return card_precision
    return "float32"


class Smooth:
    """The SPLITZ smoothed classifier g(x) = argmax_c P[f2(f1(x) + delta) = c], delta ~ N(0, s^2 I).

    f1 runs once per image; the noise and f2 run in batches of `batch_size` samples, packing
    several images into one forward pass when their chunks are small. Image i of a call uses
    the seed `seed + i` (or seed[i] when `certify` gets a list), so a certificate is reproduced
    by its own seed, alone, with the same batch size. seed=None draws the seed from the OS's
    secure generator (seed_source "random"); a seed the caller gives is "client" (SEED_SOURCES).
    """

    def __init__(self, model: SplitModel, batch_size: int = 1000, device: str = "cpu",
                 model_id: str | None = None, model_sha256: str | None = None,
                 precision: str = "float32", preprocess: str | None = None):
        if batch_size < 1:
            raise InputError("batch size must be at least 1")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.device = parse_device(device)
        self.model = model.to(self.device).eval()
        self.batch_size, self.model_id, self.model_sha256 = batch_size, model_id, model_sha256
        self.preprocess = preprocess
        self.bound = F1Bound(model.f1, model.input_shape)
        # Noise is drawn and added in float32; rounding to `precision` is then the first step
        # of the base classifier, so the certificate is exact for f2 as computed.
        self.precision, self.dtype = precision, PRECISIONS[precision]
        self.f2 = for_certification(model.f2, self.dtype)

    @classmethod
    def from_checkpoint(cls, loaded: LoadedModel, batch_size: int | None = None,
                        device: str = "cpu", precision: str | None = None) -> "Smooth":
        """The card's tuned batch size and precision (`default_precision`) unless others are
        asked for."""
        return cls(loaded.model, batch_size or loaded.card.batch_size, device, loaded.card.id,
                   loaded.sha256, precision or default_precision(loaded.card.precision, device),
                   loaded.card.preprocess.describe() if loaded.card.preprocess else None)

    def certify(self, x: Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                seed: int | Sequence[int] | None = 0, radius: float | None = None,
                progress: bool = False, bound: str = "clopper-pearson",
                tolerance: float | None = None,
                on_chunk: Callable[[int], None] | None = None) -> list[Certificate]:
        """Cohen et al.'s CERTIFY at the split, then Theorem 1 for the input-space radius.

        With probability at least 1 - alpha (per image) over the randomness here, each returned
        prediction equals g(x) on the l2 ball of the returned radius around that image.

        bound: the fixed-n lower bound on pA, "clopper-pearson" or "randomized-clopper-pearson"
        (tighter; its uniform draw comes from the image's seed and is recorded). tolerance:
        adaptive certification with n as the budget (`adaptive_plan`): it stops at the first
        planned look once the radius there is within `tolerance` (relative) of the radius the
        whole budget would give at the same vote share, and abstains as soon as the confidence
        sequence rules out pA > 1/2. on_chunk(m) runs before each chunk of m samples is drawn;
        what it raises stops sampling (how a running job is canceled).
        """
        check_sampling(n, alpha, n0)
        if radius is not None:
            _check_radius(radius)
        plan = (SequentialBound(0.0, ((n, alpha),), _bound(bound)) if tolerance is None
                else adaptive_plan(n, alpha, self.batch_size, _bound(bound), tolerance))
        start = time.perf_counter()
        x = self._images(x)
        seeds = _seeds(len(x), seed)
        us = [[auxiliary_uniform(s, j) for j in range(len(plan.looks))] for s in seeds]
        with torch.inference_mode():
            z = self._features(x)
            streams = self._streams(seeds)
            bar = _Ticker(tqdm(total=(n0 + n) * len(x), unit="sample", unit_scale=True,
                               disable=not progress, desc="certify"), on_chunk)
            top = self.sample_counts(z, n0, streams, bar).argmax(dim=1).tolist()
            if tolerance is None:
                n_a = self.sample_counts(z, n, streams, bar).gather(
                    1, torch.tensor(top)[:, None])[:, 0].tolist()
                drawn = [n] * len(x)
            else:
                def stop(i: int, k: int, t: int) -> bool:
                    return adaptive_stop(plan, k, t, n, us[i], tolerance)
                n_a, drawn = self._rounds(z, streams, top, n, stop, bar)
            bar.close()
        lows = [plan.lower(k, t, u) for k, t, u in zip(n_a, drawn, us, strict=True)]
        # An adaptive abstention between looks has no bound of the plan's; it reports the
        # sequence's, which its stopping rule put at <= 1/2 (capped: it never certifies).
        lows = [low if low.name != "none" else
                LowerBound(min(0.5, cs_lower(k, t, alpha)), CS_BOUND, alpha)
                for low, k, t in zip(lows, n_a, drawn, strict=True)]
        r_z = torch.tensor([feature_radius(b.value, self.model.sigma) for b in lows],
                           dtype=torch.float64)
        r = input_radius(self.bound, x.cpu(), r_z)
        elapsed = (time.perf_counter() - start) / len(x)
        certs = []
        for i, low in enumerate(lows):
            abstain = low.value <= 0.5
            rad = 0.0 if abstain else round_down(float(r.radius[i]))
            certs.append(Certificate(
                prediction=None if abstain else top[i], radius=rad,
                radius_feature=round_down(float(r_z[i])), p_a_lower=low.value,
                n_a=n_a[i], n=drawn[i], n0=n0, alpha=alpha, sigma=self.model.sigma,
                lipschitz=float(r.lipschitz[i]), gamma=float(r.gamma[i]),
                lipschitz_global=self.bound.global_bound, float_slack=float(r.float_slack[i]),
                seed=seeds[i], seed_source=_source(seed), batch_size=self.batch_size,
                time_s=elapsed,
                model_id=self.model_id, model_sha256=self.model_sha256, precision=self.precision,
                certified=None if radius is None else (not abstain and rad >= radius),
                query_radius=radius, bound=low.name, bound_level=low.level, bound_u=low.u,
                stopping="fixed" if tolerance is None else _describe(plan, tolerance),
                budget=None if tolerance is None else n, preprocess=self.preprocess,
            ))
        return certs

    def query(self, x: Tensor, radius: float, alpha: float = 0.001, n0: int = 100,
              n_max: int = 100_000, seed: int | None = 0, bound: str = "clopper-pearson",
              on_chunk: Callable[[int], None] | None = None) -> list[RadiusAnswer]:
        """Is each image certified at `radius`? Samples one batch at a time and stops as soon
        as the answer is decided, at most n_max votes.

        Certified at r  <=>  (R_z - slack) >= r L_r  <=>  pA > p* = Phi((r L_r + slack) / sigma),
        the same test `certify` makes (Theorem 1 at gamma = r). After every batch the beta-
        binomial confidence sequence at alpha/2 (valid at any stopping time) says "certified"
        once its lower end passes p*, "not certified" once its upper end falls to p* or once
        "certified" is out of reach within n_max votes (`out_of_reach`); at n_max
        the fixed-n `bound` at alpha/2 gets a last say (it agrees with fixed-n CERTIFY where the
        sequence alone would stay undecided). One Ville event covers both answers of the
        sequence: with probability >= 1 - alpha no answer is wrong. on_chunk: as in certify."""
        check_sampling(n_max, alpha, n0)
        _check_radius(radius)
        plan = query_plan(n_max, alpha, _bound(bound))
        x = self._images(x)
        gamma = torch.full((len(x),), float(radius), dtype=torch.float64)
        lips = self.bound.local(x, gamma)
        slack = self.bound.float_slack(x, gamma)
        p_star = [max(0.5, float(norm.cdf((radius * lips[i] + slack[i]) / self.model.sigma)))
                  for i in range(len(x))]
        seeds = _seeds(len(x), seed)
        us = [[auxiliary_uniform(s, 0)] for s in seeds]

        def stop(i: int, k: int, t: int) -> bool:
            return query_stop(plan, k, t, n_max, us[i], p_star[i])

        with torch.inference_mode():
            z = self._features(x)
            streams = self._streams(seeds)
            bar = _Ticker(None, on_chunk)
            tops = self.sample_counts(z, n0, streams, bar).argmax(dim=1).tolist()
            n_a, drawn = self._rounds(z, streams, tops, n_max, stop, bar)
        answers = []
        for i in range(len(x)):
            low = plan.lower(n_a[i], drawn[i], us[i])
            certified = low.value > p_star[i]
            answers.append(RadiusAnswer(
                certified, tops[i] if certified else None, radius, drawn[i], n0,
                -(-drawn[i] // self.batch_size), n_a[i], low.value, p_star[i], float(lips[i]),
                alpha, seeds[i], _source(seed), low.name, low.level, low.u, self.preprocess))
        return answers

    def _rounds(self, z: Tensor, streams: list[NoiseStream], top: list[int], n: int, stop,
                bar: tqdm | None = None) -> tuple[list[int], list[int]]:
        """Votes for class top[i] drawn one batch at a time (the chunks of `sample_counts`, so an
        image's first m votes are the same as with n = m), up to n, until stop(i, k, t) is true
        after t votes with k for top[i]. Returns each image's (k, t)."""
        n_a, drawn = [0] * len(z), [0] * len(z)
        active = list(range(len(z)))
        while active:
            m = min(self.batch_size, n - drawn[active[0]])  # all active images drew alike
            counts = self.sample_counts(z[active], m, [streams[i] for i in active], bar)
            for row, i in enumerate(active):
                n_a[i] += int(counts[row, top[i]])
                drawn[i] += m
            active = [i for i in active if drawn[i] < n and not stop(i, n_a[i], drawn[i])]
        return n_a, drawn

    def predict(self, x: Tensor, n: int = 10_000, alpha: float = 0.001,
                seed: int | None = 0) -> list[Prediction]:
        """Cohen et al.'s PREDICT: the top class if a two-sided binomial test against the runner-up
        rejects at level alpha, else abstain (None)."""
        check_sampling(n, alpha)
        x = self._images(x)
        with torch.inference_mode():
            z = self._features(x)
            seeds = _seeds(len(x), seed)
            counts = self.sample_counts(z, n, self._streams(seeds))
        top2 = counts.topk(2, dim=1)
        out = []
        for i in range(len(x)):
            (n_a, n_b), (c_a, _) = top2.values[i].tolist(), top2.indices[i].tolist()
            p = binomial_pvalue(n_a, n_a + n_b)
            out.append(Prediction(c_a if p <= alpha else None, n_a, n_b, p, n, alpha, seeds[i],
                                  _source(seed)))
        return out

    def _features(self, x: Tensor) -> Tensor:
        """The deployed f1: evaluated in float64, rounded once to float32 (lipschitz.py bounds
        the rounding), so the certificate does not depend on conv algorithms or TF32."""
        return self.bound.exact(x).float().to(self.device)

    def sample_counts(self, z: Tensor, n: int, streams: list[NoiseStream],
                      bar: tqdm | None = None) -> Tensor:
        """Votes of f2(z_i + delta) over n noise draws per image: an (images, classes) int64 tensor.

        Image i draws its noise from streams[i] in chunks of min(batch_size, remaining), whatever
        other images share the forward pass, so its votes depend only on its seed and batch size
        (not on the thread count: noise.py).
        """
        k = self.model.num_classes
        counts = torch.zeros(len(z), k, dtype=torch.int64, device=self.device)
        pending: list[tuple[int, int]] = []
        filled = 0
        for i in range(len(z)):
            for start in range(0, n, self.batch_size):
                m = min(self.batch_size, n - start)
                if filled + m > self.batch_size:
                    self._vote(z, pending, streams, counts)
                    pending, filled = [], 0
                pending.append((i, m))
                filled += m
                if bar is not None:
                    bar.update(m)
        if pending:
            self._vote(z, pending, streams, counts)
        return counts.cpu()

    def _vote(self, z: Tensor, chunks: list[tuple[int, int]], streams: list[NoiseStream],
              counts: Tensor) -> None:
        noisy = torch.empty(sum(m for _, m in chunks), *z.shape[1:], device=self.device,
                            dtype=self.dtype, memory_format=torch.channels_last)
        outs = noisy.split([m for _, m in chunks])
        self.draw_noisy([(out, z[i], streams[i])
                         for out, (i, _) in zip(outs, chunks, strict=True)])
        owner = torch.cat([torch.full((m,), i, device=self.device) for i, m in chunks])
        pred = self.f2(noisy).argmax(dim=1)
        k = counts.shape[1]
        counts.view(-1).add_(torch.bincount(owner * k + pred, minlength=counts.numel()))

    def draw_noisy(self, parts: list[tuple[Tensor, Tensor, NoiseStream]]) -> None:
        """For each (out, z, stream): out <- z + sigma * N(0, I), rounded to out's dtype in
        out's memory format. The normals of all parts are drawn together on all threads
        (noise.py) into one contiguous float32 buffer, already times sigma, then added to z
        straight into out: one pass for the shift, the rounding to f2's precision and the
        channels_last layout (the same floats as shifting in float32 and converting after;
        whatever out's dtype and layout, the draws are the same)."""
        sizes = [len(out) for out, _, _ in parts]
        draws = torch.empty(sum(sizes), *parts[0][0].shape[1:], device=parts[0][0].device)
        pieces = draws.split(sizes)
        fill_normal([block for piece, (_, _, stream) in zip(pieces, parts, strict=True)
                     for block in stream.blocks(piece)], std=self.model.sigma)
        for piece, (out, z, _) in zip(pieces, parts, strict=True):
            torch.add(piece, z, out=out)

    def _streams(self, seeds: list[int]) -> list[NoiseStream]:
        return [NoiseStream(s, self.device) for s in seeds]

    def _images(self, x: Tensor) -> Tensor:
        if x.dim() == len(self.model.input_shape):
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != tuple(self.model.input_shape):
            raise InputError(f"expected images of shape {self.model.input_shape}, "
                             f"got {tuple(x.shape[1:])}")
        if not torch.isfinite(x).all():
            raise InputError("image contains NaN or infinite values")
        return x.float()


class _Ticker:
    """The progress bar sample_counts updates before each chunk, also calling on_chunk."""

    def __init__(self, bar: tqdm | None, on_chunk: Callable[[int], None] | None):
        self.bar, self.on_chunk = bar, on_chunk

    def update(self, m: int) -> None:
        if self.on_chunk is not None:
            self.on_chunk(m)
        if self.bar is not None:
            self.bar.update(m)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_device(name: str) -> torch.device:
    """The device called `name`: the CPU or a CUDA GPU that is there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}") from None
    if device.type not in ("cpu", "cuda"):  # torch knows mps, xla, meta...: not run here
        raise InputError(f"device {name!r}: splitz runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA GPU is available")
    return device


def query_plan(n_max: int, alpha: float, bound: str = "clopper-pearson") -> SequentialBound:
    """Radius queries' bounds: the confidence sequence at alpha/2 after every batch, and the
    fixed-n `bound` at alpha/2 at n_max. Measured against the sequence alone at alpha: as few
    samples, and it keeps agreeing with fixed-n CERTIFY near the threshold (docs/performance.md)."""
    return SequentialBound(alpha / 2, ((n_max, alpha / 2),), bound)


def adaptive_plan(n: int, alpha: float, batch_size: int, bound: str = "clopper-pearson",
                  tolerance: float = 0.02) -> SequentialBound:
    """Adaptive certification's bounds: the fixed-n `bound` at alpha/2 at two looks, a third of
    the budget n (rounded up to whole batches, so the votes are those of fixed-n CERTIFY) and n.
    Two looks beat a confidence sequence here (docs/performance.md: a radius within 2 % of the
    budget's needs about n/3 votes anyway, where the sequence pays about (1/2) log t against
    log 2 for two looks)."""
    if not 0.0 < tolerance < 1.0:
        raise InputError(f"tolerance must be in (0, 1), got {tolerance}")
    first = -(-n // 3 // batch_size) * batch_size if n >= 3 else n
    looks = ((first, alpha / 2), (n, alpha / 2)) if first < n else ((n, alpha),)
    return SequentialBound(0.0, looks, bound)


def query_stop(plan: SequentialBound, k: int, t: int, n: int, u: Sequence[float],
               p_star: float) -> bool:
    """A radius query of at most n votes is decided after t votes, k of them for the top class,
    once the plan's lower bound on pA passes p* ("certified"), or its upper bound, the mirror
    image of the lower bound on the other votes (1 - L(t - k, t)), is at most p*, or "certified"
    is out of reach within n votes ("not certified" both times)."""
    return (plan.lower(k, t, u).value > p_star or 1.0 - plan.lower(t - k, t, u).value <= p_star
            or out_of_reach(plan, k, t, n, p_star))


def out_of_reach(plan: SequentialBound, k: int, t: int, n: int, p_star: float) -> bool:
    """Could no bound of the plan pass p* within n votes, even if all n - t votes left went to
    the top class? Then neither could fixed-n Clopper-Pearson on the same n votes, so stopping
    here agrees with it (and "not certified" claims nothing, so soundness is not at stake).
    Every bound of the plan, at any t' <= n on that best path (t - k failures), is at most
    Clopper-Pearson at the plan's whole alpha with those failures (one-sided Clopper-Pearson is
    the largest valid lower bound monotone in the successes; the randomized one is at most
    Clopper-Pearson with one success more), and that grows with t', so t' = n bounds them all."""
    best = k + n - t
    if plan.fixed == "randomized-clopper-pearson":
        if best >= n:
            return False  # at u -> alpha its bound on n of n votes approaches 1
        best += 1
    return clopper_pearson_lower(best, n, plan.alpha) <= p_star


def adaptive_stop(plan: SequentialBound, k: int, t: int, n: int, u: Sequence[float],
                  tolerance: float) -> bool:
    """Adaptive certification's stopping rule after t of at most n votes, k of them for the top
    class: abstain once the confidence sequence at the plan's alpha puts pA <= 1/2 (abstaining
    claims nothing, so this spends no alpha); stop with the plan's bound now when Phi^-1 of it
    is within `tolerance` of Phi^-1 of the plan's bound after all n votes at the same share
    k / t (the radius more samples could bring, at most: radius = sigma Phi^-1(pA_lower) / L)."""
    if cs_upper(k, t, plan.alpha) <= 0.5:
        return True
    now = plan.lower(k, t, u).value
    if now <= 0.5 or t >= n:
        return False
    whole = plan.lower(round(k * n / t), n, u).value
    return float(norm.ppf(now)) >= (1.0 - tolerance) * float(norm.ppf(whole))


def _describe(plan: SequentialBound, tolerance: float) -> str:
    looks = ",".join(str(n) for n, _ in plan.looks)
    return f"adaptive(tolerance={tolerance:g},looks={looks})"


def _bound(name: str) -> str:
    if name not in FIXED_BOUNDS:
        raise InputError(f"bound must be one of {', '.join(FIXED_BOUNDS)}, got {name!r}")
    return name


# Who chose a certificate's seed. "client": the caller, who could have tried K seeds and kept
# the best answer (the guarantee is then only 1 - K alpha); "random": drawn here from the OS's
# secure generator, so nobody could know the noise in advance or shop for it.
SEED_SOURCES = ("client", "random")
SEED_LIMIT = 2**62  # drawn seeds are below this; seed + i stays a valid torch seed
SEED_RANGE = 2**64  # an image's seed: what torch's manual_seed and numpy's SeedSequence take


def known_draw(bound: str, seed: int | Sequence[int] | None) -> str | None:
    """Why the randomized bound with a seed its caller chose is no guarantee to anyone else
    (None when it is not the case): its level alpha is exact over a uniform draw nobody can
    predict, and the draw comes from the seed."""
    if bound != "randomized-clopper-pearson" or seed is None:
        return None
    return ("the randomized bound's uniform draw comes from the seed, so whoever chooses the "
            "seed knows the draw in advance and can pick one that raises pA_lower; its level "
            "alpha holds only for a draw they cannot predict")


def _source(seed: int | Sequence[int] | None) -> str:
    return "random" if seed is None else "client"


def _seeds(count: int, seed: int | Sequence[int] | None) -> list[int]:
    """Image i's seed: seed + i, or seed[i] when given one per image; None: a secure random
    seed + i."""
    if seed is None:
        seed = secrets.randbelow(SEED_LIMIT)
    if isinstance(seed, int):
        seeds = [seed + i for i in range(count)]
    elif len(seed) != count:
        raise InputError(f"{len(seed)} seeds for {count} images")
    else:
        seeds = [int(s) for s in seed]
    if any(not 0 <= s < SEED_RANGE for s in seeds):  # numpy refuses a negative one (bound_u)
        raise InputError(f"seeds must be in [0, 2^64), got {min(seeds)}..{max(seeds)}")
    return seeds


def _check_radius(radius: float) -> None:
    if not (math.isfinite(radius) and radius >= 0):
        raise InputError(f"radius must be a finite number >= 0, got {radius}")


def check_sampling(n: int, alpha: float, n0: int = 1) -> None:
    if n < 1 or n0 < 1:
        raise InputError(f"sample counts must be positive, got n={n}, n0={n0}")
    if not (0.0 < alpha < 1.0) or math.isnan(alpha):
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
