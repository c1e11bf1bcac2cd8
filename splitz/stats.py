"""Confidence bounds and tests on binomial counts (float64 throughout).

A lower bound L(k, n) on p is valid at level alpha when P[L > p] <= alpha for every p. Three are
offered, each for the way it is used:
- `clopper_pearson_lower`: n fixed before sampling (Cohen et al.'s CERTIFY).
- `randomized_clopper_pearson_lower`: n fixed, plus one auxiliary uniform draw u, independent of
  the samples: exact level alpha, and never below Clopper-Pearson.
- `cs_lower` / `cs_upper`: a confidence sequence, valid simultaneously at every n, hence at any
  data-dependent stopping time (early-stopping queries, adaptive certification).
`SequentialBound` combines a confidence sequence with fixed-n bounds at planned looks, splitting
alpha between them; it is what the engine reports, whatever its stopping rule.
"""

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

import numpy as np
from scipy.optimize import brentq
from scipy.special import betaln
from scipy.stats import beta, binom, binomtest, norm

# brentq's tolerances; a root it returns is moved down by twice their sum (its error bound)
_XTOL, _RTOL = 1e-15, 4e-15
_LOG_B_HALF = math.log(math.pi)  # log B(1/2, 1/2), the Jeffreys prior's normalizer


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on p from k successes in n trials.

    Equals `beta.ppf(alpha, k, n - k + 1)`, i.e. statsmodels'
    `proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]`; 0 when k = 0.
    """
    _check_counts(k, n)
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def randomized_clopper_pearson_lower(k: int, n: int, alpha: float, u: float) -> float:
    """Stevens' randomized (1 - alpha) lower bound on p, with u ~ Uniform(0, 1) drawn
    independently of the k successes in n trials (Stevens 1950, Biometrika 37; in randomized
    smoothing: Voráček 2024, arXiv 2406.17830, "randomized Clopper-Pearson").

    L is the root in p of the randomized p-value of H0: p' <= p,

        pi(p) = P_p[X > k] + u P_p[X = k] = alpha,   X ~ Bin(n, p).

    Validity: under the true p, pi(p) = P[X > k] + u P[X = k] is exactly Uniform(0, 1) (the
    probability integral transform of X + 1 - u), and pi is increasing in p, so
    P[L > p] = P[pi(p) < alpha] = alpha. u = 1 gives Clopper-Pearson at k, u = 0 at k + 1, so
    L lies between them and is never below Clopper-Pearson. When k = n and u <= alpha every p < 1
    is rejected (pi(p) = u p^n < alpha), so L would be 1, an infinite radius; the
    Clopper-Pearson bound is returned instead, a smaller and so still valid bound.
    """
    _check_counts(k, n)
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u must be in [0, 1], got {u}")
    lo = clopper_pearson_lower(k, n, alpha)
    if (k == n and u <= alpha) or (k == 0 and u > alpha):
        return lo
    hi = 1.0 if k == n else float(beta.ppf(alpha, k + 1, n - k))

    def excess(p: float) -> float:  # alpha - pi(p): >= 0 exactly where p is rejected
        return alpha - (float(binom.sf(k, n, p)) + u * float(binom.pmf(k, n, p)))

    return _root_below(excess, lo, hi)


def mixture_log_wealth(k: int, n: int, p: float) -> float:
    """log M_n(p) for the beta-binomial (Jeffreys, Beta(1/2, 1/2)) mixture martingale:

        M_n(p) = B(k + 1/2, n - k + 1/2) / B(1/2, 1/2) / (p^k (1 - p)^(n - k)),

    the likelihood of k successes in n trials averaged over q ~ Beta(1/2, 1/2), divided by their
    likelihood under p (Robbins 1970, Ann. Math. Statist. 41; the Krichevsky-Trofimov
    estimator's wealth). Under the true p it is a nonnegative martingale with M_0 = 1.
    """
    _check_counts(k, n)
    if not 0.0 < p < 1.0:
        raise ValueError(f"need 0 < p < 1, got {p}")
    return (betaln(k + 0.5, n - k + 0.5) - _LOG_B_HALF
            - k * math.log(p) - (n - k) * math.log1p(-p))


def cs_lower(k: int, n: int, alpha: float) -> float:
    """Lower end of the beta-binomial mixture confidence sequence {p : M_n(p) < 1 / alpha}.

    By Ville's inequality P[exists n: M_n(p) >= 1/alpha] <= alpha under the true p, so
    P[exists n: cs_lower(k_n, n, alpha) > p] <= alpha: the bound holds at every n at once,
    hence at any stopping time, however the stop depends on the samples (Howard, Ramdas,
    McAuliffe & Sekhon 2021, Ann. Statist. 49, "time-uniform confidence sequences"; the same
    Jeffreys mixture decides Voráček 2024's radius queries). log M_n is convex in p with its
    minimum (<= 0) at k / n, so the set is an interval and its lower end is the root of
    log M_n(p) = log(1/alpha) below k / n; 0 when k = 0.
    """
    _check_counts(k, n)
    if k == 0:
        return 0.0
    target = math.log(1.0 / alpha)

    def excess(p: float) -> float:  # >= 0 exactly where p is outside the sequence
        return mixture_log_wealth(k, n, p) - target

    lo, hi = 1e-300, k / n if k < n else math.nextafter(1.0, 0.0)
    return _root_below(excess, lo, hi) if excess(lo) >= 0 else 0.0


def cs_upper(k: int, n: int, alpha: float) -> float:
    """Upper end of the same confidence sequence: 1 - cs_lower(n - k, n, alpha) by symmetry
    (M_n(p) for k successes equals M_n(1 - p) for n - k). Valid at stopping times together
    with cs_lower: one Ville event covers both ends."""
    return 1.0 - cs_lower(n - k, n, alpha)


def _root_below(excess, lo: float, hi: float) -> float:
    """A point at or below the root of `excess` (decreasing on [0, 1]) where it is still >= 0:
    brentq's root moved down by its error bound, else lo. The guessed bracket [lo, hi] comes
    from other rounded roots, so it is first widened until it brackets."""
    step = max(hi - lo, 1e-12)
    while excess(lo) < 0 and lo > 0.0:
        lo, step = max(0.0, lo - step), 2 * step
    while excess(hi) > 0 and hi < 1.0:
        hi, step = min(1.0, hi + step), 2 * step
    x = brentq(excess, lo, hi, xtol=_XTOL, rtol=_RTOL)
    x = max(lo, x - 2 * (_XTOL + _RTOL * abs(x)))
    return x if excess(x) >= 0 else lo


FIXED_BOUNDS = ("clopper-pearson", "randomized-clopper-pearson")
CS_BOUND = "beta-binomial-cs"  # the name certificates record for cs_lower


def fixed_lower(bound: str, k: int, n: int, alpha: float, u: float | None = None) -> float:
    """The fixed-n lower bound named `bound` (FIXED_BOUNDS); the randomized one needs u."""
    if bound == "clopper-pearson":
        return clopper_pearson_lower(k, n, alpha)
    if bound == "randomized-clopper-pearson":
        if u is None:
            raise ValueError("the randomized Clopper-Pearson bound needs its uniform draw u")
        return randomized_clopper_pearson_lower(k, n, alpha, u)
    raise ValueError(f"unknown bound {bound!r}; one of {', '.join(FIXED_BOUNDS)}")


def auxiliary_uniform(seed: int, look: int) -> float:
    """The randomized bound's u for a certificate's seed and look: Uniform[0, 1) from numpy's
    PCG64 seeded with (seed, look) through a SeedSequence, a generator unrelated to the torch
    Mersenne Twisters that draw the noise, so u is independent of the votes."""
    return float(np.random.default_rng([seed, look]).random())


@dataclass(frozen=True)
class LowerBound:
    """A lower confidence bound on pA as reported: its value, the bound's name, the level it was
    computed at, and the auxiliary uniform of a randomized bound (None otherwise)."""

    value: float
    name: str
    level: float
    u: float | None = None


@dataclass(frozen=True)
class SequentialBound:
    """The lower bounds on p a sampling procedure may report when it stops, whatever its
    stopping rule: the confidence sequence at level cs_alpha at any n (cs_alpha = 0: none),
    and the fixed-n bound `fixed` at level alpha_j at each planned look n_j (`looks`: pairs
    (n_j, alpha_j), n_j fixed before sampling). The sequence fails at some n with probability
    <= cs_alpha, look j fails with probability <= alpha_j (its bound uses the first n_j votes,
    whether or not the procedure stops there), so by the union bound every reported bound holds
    with probability >= 1 - alpha, alpha = cs_alpha + sum_j alpha_j.
    """

    cs_alpha: float
    looks: tuple[tuple[int, float], ...]
    fixed: str = "clopper-pearson"

    def __post_init__(self):
        sizes = [n for n, _ in self.looks]
        if self.fixed not in FIXED_BOUNDS:
            raise ValueError(f"unknown bound {self.fixed!r}; one of {', '.join(FIXED_BOUNDS)}")
        if sizes != sorted(set(sizes)) or any(n < 1 for n in sizes):
            raise ValueError(f"looks must be increasing sample counts, got {sizes}")
        if self.cs_alpha < 0 or any(a <= 0 for _, a in self.looks) or not 0 < self.alpha < 1:
            raise ValueError("levels must be positive and sum to alpha in (0, 1)")

    @property
    def alpha(self) -> float:
        return self.cs_alpha + sum(a for _, a in self.looks)

    def lower(self, k: int, n: int, u: Sequence[float] = ()) -> LowerBound:
        """The largest bound available after n votes with k successes (value 0 when none is);
        u[j] is look j's uniform draw, for the randomized bound."""
        best = LowerBound(0.0, "none", self.alpha)
        if self.cs_alpha > 0:
            best = LowerBound(cs_lower(k, n, self.cs_alpha), CS_BOUND, self.cs_alpha)
        for j, (n_j, a_j) in enumerate(self.looks):
            if n_j == n:
                u_j = u[j] if self.fixed == "randomized-clopper-pearson" else None
                value = fixed_lower(self.fixed, k, n, a_j, u_j)
                if value > best.value:
                    best = LowerBound(value, self.fixed, a_j, u_j)
        return best


def binomial_pvalue(k: int, n: int) -> float:
    """Two-sided p-value of k successes in n trials under p = 1/2 (Cohen et al.'s PREDICT)."""
    _check_counts(k, n)
    return 1.0 if n == 0 else float(binomtest(k, n, 0.5).pvalue)


def feature_radius(p_lower: float, sigma: float) -> float:
    """R_z = sigma * Phi^-1(p_lower), the l2 radius certified at the split; 0 if p_lower <= 1/2."""
    return sigma * float(norm.ppf(p_lower)) if p_lower > 0.5 else 0.0


def text_down(value: float, digits: int) -> str:
    """`value` printed with `digits` decimals, rounded down exactly (radii and lower bounds: a
    printed number never claims more than the certificate)."""
    return _decimal(value, digits, ROUND_FLOOR)


def text_up(value: float, digits: int) -> str:
    """Printed rounded up exactly (upper bounds such as L)."""
    return _decimal(value, digits, ROUND_CEILING)


def _decimal(value: float, digits: int, rounding: str) -> str:
    if not math.isfinite(value):
        return str(value)
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=rounding))


def round_down(radius: float, digits: int = 6) -> float:
    """Round a radius down to `digits` decimals, past any float64 rounding of the last step."""
    scale = 10**digits
    below = radius * (1.0 - 1e-12)
    if below * scale == math.inf:  # no decimals to drop at this size; an overflowed sigma / L
        return min(below, sys.float_info.max)  # (huge sigma, f1 near 0): the largest float
    return max(0.0, math.floor(below * scale) / scale)


def _check_counts(k: int, n: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
