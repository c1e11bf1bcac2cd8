import math

import numpy as np
import pytest
from scipy.special import betaln
from scipy.stats import binom, norm

from splitz.smoothing import adaptive_plan, query_plan
from splitz.stats import (
    SequentialBound,
    auxiliary_uniform,
    binomial_pvalue,
    clopper_pearson_lower,
    cs_lower,
    cs_upper,
    feature_radius,
    mixture_log_wealth,
    randomized_clopper_pearson_lower,
    round_down,
    text_down,
    text_up,
)


def test_lower_bound_all_successes_is_closed_form():
    # P[X = n] = p^n = alpha  =>  p_lower = alpha^(1/n)
    assert clopper_pearson_lower(100_000, 100_000, 0.001) == pytest.approx(
        0.001 ** (1 / 100_000), rel=1e-12)


def test_lower_bound_one_success_is_closed_form():
    # P[X >= 1] = 1 - (1-p)^n = alpha  =>  p_lower = 1 - (1-alpha)^(1/n)
    assert clopper_pearson_lower(1, 50, 0.01) == pytest.approx(1 - 0.99 ** (1 / 50), rel=1e-9)


@pytest.mark.parametrize("k,n,alpha", [(990, 1000, 0.001), (60, 100, 0.05), (7, 9, 0.2)])
def test_lower_bound_is_the_exact_binomial_tail_inversion(k, n, alpha):
    # By definition P[X >= k | p_lower] = alpha; checked with the binomial law, not the beta.
    p = clopper_pearson_lower(k, n, alpha)
    assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-9)
    assert binom.sf(k - 1, n, p * 0.999) < alpha  # and it is the smallest such p


def test_bounds_bracket_the_estimate_and_edges():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert cs_lower(0, 10, 0.05) == 0.0 and cs_upper(10, 10, 0.05) == 1.0
    assert clopper_pearson_lower(30, 100, 0.01) < 0.3
    assert cs_lower(30, 100, 0.01) < clopper_pearson_lower(30, 100, 0.01)  # the price of anytime
    assert cs_upper(30, 100, 0.01) > 0.3


def test_counts_out_of_range_are_rejected():
    with pytest.raises(ValueError):
        clopper_pearson_lower(11, 10, 0.05)


def test_binomial_pvalue():
    assert binomial_pvalue(5, 10) == pytest.approx(1.0)
    assert binomial_pvalue(10, 10) == pytest.approx(2 * 0.5**10)


def test_feature_radius_and_abstain_region():
    assert feature_radius(0.5, 1.0) == 0.0
    assert feature_radius(0.3, 1.0) == 0.0
    assert feature_radius(0.99, 0.5) == pytest.approx(0.5 * norm.ppf(0.99))


def test_a_radius_past_float_range_rounds_down_to_the_largest_float():
    import sys

    assert round_down(math.inf) == sys.float_info.max  # sigma / L overflowed: still a bound
    assert round_down(1e305) <= 1e305 and math.isfinite(round_down(1e305))


def test_round_down_never_rounds_up():
    assert round_down(1.2345678) == 1.234567
    assert round_down(0.9999999999) == 0.999999
    assert round_down(2.0) <= 2.0
    for v in (0.1, 0.3, 1 / 3, math.pi, 1e-7):
        assert round_down(v) <= v


# -- randomized Clopper-Pearson (Stevens 1950) -------------------------------------------------

def test_randomized_bound_closed_forms():
    # k = n: pi(p) = u p^n = alpha  =>  L = (alpha / u)^(1/n)
    assert randomized_clopper_pearson_lower(40, 40, 0.01, 0.3) == pytest.approx(
        (0.01 / 0.3) ** (1 / 40), rel=1e-12)
    # k = 0: pi(p) = 1 - (1 - u)(1 - p)^n = alpha  =>  L = 1 - ((1 - alpha) / (1 - u))^(1/n)
    assert randomized_clopper_pearson_lower(0, 40, 0.05, 0.02) == pytest.approx(
        1 - (0.95 / 0.98) ** (1 / 40), rel=1e-9)
    assert randomized_clopper_pearson_lower(0, 40, 0.05, 0.5) == 0.0  # u > alpha rejects no p
    # k = n, u <= alpha: every p < 1 is rejected; the Clopper-Pearson bound is returned
    assert randomized_clopper_pearson_lower(40, 40, 0.01, 0.005) == clopper_pearson_lower(
        40, 40, 0.01)


@pytest.mark.parametrize("k,n,alpha,u", [(990, 1000, 0.001, 0.4), (60, 100, 0.05, 0.9),
                                         (7, 9, 0.2, 0.01), (99_000, 100_000, 0.001, 0.5)])
def test_randomized_bound_solves_its_definition_between_the_clopper_pearson_bounds(
        k, n, alpha, u):
    p = randomized_clopper_pearson_lower(k, n, alpha, u)
    assert binom.sf(k, n, p) + u * binom.pmf(k, n, p) == pytest.approx(alpha, rel=1e-9)
    assert clopper_pearson_lower(k, n, alpha) <= p <= clopper_pearson_lower(k + 1, n, alpha)
    assert randomized_clopper_pearson_lower(k, n, alpha, 1.0) == pytest.approx(
        clopper_pearson_lower(k, n, alpha), rel=1e-12)


def randomized_share(k: int, n: int, alpha: float, p: float) -> float:
    """|{u in [0, 1] : randomized_clopper_pearson_lower(k, n, alpha, u) > p}|. The definition puts
    the edge at u* = (alpha - P_p[X > k]) / P_p[X = k] (L decreases in u); the implementation is
    checked on both sides of it."""
    pmf = binom.pmf(k, n, p)
    edge = min(1.0, max(0.0, (alpha - binom.sf(k, n, p)) / pmf)) if pmf > 0 else float(
        binom.sf(k, n, p) < alpha)
    if edge > 1e-6:
        assert randomized_clopper_pearson_lower(k, n, alpha, edge - 1e-6) > p
    if edge < 1 - 1e-6:
        assert randomized_clopper_pearson_lower(k, n, alpha, edge + 1e-6) <= p
    return edge


@pytest.mark.parametrize("p", [0.5, 0.83, 0.97])
def test_randomized_bound_has_exact_coverage_under_the_binomial_law(p):
    """P[L(X, U) > p] = sum_k P[X = k] |{u : L(k, u) > p}| is alpha exactly; Clopper-Pearson's
    miss rate stays below alpha (it is conservative)."""
    n, alpha = 40, 0.05
    miss = sum(binom.pmf(k, n, p) * randomized_share(k, n, alpha, p) for k in range(n + 1))
    assert miss == pytest.approx(alpha, abs=1e-12)
    plain = sum(binom.pmf(k, n, p) for k in range(n + 1) if clopper_pearson_lower(k, n, alpha) > p)
    assert plain < alpha


def test_auxiliary_uniform_is_reproducible_and_varies():
    draws = [auxiliary_uniform(s, look) for s in range(50) for look in (0, 1)]
    assert draws[:4] == [auxiliary_uniform(0, 0), auxiliary_uniform(0, 1),
                         auxiliary_uniform(1, 0), auxiliary_uniform(1, 1)]
    assert len(set(draws)) == 100 and all(0.0 <= u < 1.0 for u in draws)


# -- the beta-binomial mixture confidence sequence ---------------------------------------------

def test_mixture_wealth_is_the_krichevsky_trofimov_betting_product():
    """M_n(p) = prod_t q_t^x_t (1 - q_t)^(1 - x_t) / p^x_t (1 - p)^(1 - x_t), q_t = (k_t + 1/2) /
    (t + 1) after t votes with k_t successes: a product over any order of the votes."""
    votes = [1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    p, log_m, k = 0.6, 0.0, 0
    for t, x in enumerate(votes):
        q = (k + 0.5) / (t + 1)
        log_m += math.log(q / p) if x else math.log((1 - q) / (1 - p))
        k += x
    assert mixture_log_wealth(k, len(votes), p) == pytest.approx(log_m, rel=1e-12)


def test_cs_lower_all_successes_is_closed_form():
    # M_n(p) = B(n + 1/2, 1/2) / pi / p^n = 1/alpha  =>  L = (alpha B(n + 1/2, 1/2) / pi)^(1/n)
    n, alpha = 100_000, 0.001
    expected = math.exp((math.log(alpha) + betaln(n + 0.5, 0.5) - math.log(math.pi)) / n)
    assert cs_lower(n, n, alpha) == pytest.approx(expected, rel=1e-12)
    assert cs_lower(n, n, alpha) <= expected


@pytest.mark.parametrize("k,n", [(990, 1000, ), (3, 10), (99_000, 100_000)])
def test_cs_ends_are_the_roots_of_the_wealth(k, n):
    lo, hi = cs_lower(k, n, 0.001), cs_upper(k, n, 0.001)
    assert mixture_log_wealth(k, n, lo) == pytest.approx(math.log(1000), rel=1e-9)
    assert mixture_log_wealth(k, n, lo) >= math.log(1000)  # on the excluded side
    assert mixture_log_wealth(k, n, hi) == pytest.approx(math.log(1000), rel=1e-9)
    assert lo < k / n < hi


def first_crossing(p: float, horizon: int, lower=None, looks=None) -> float:
    """P[some bound ever exceeds p] under the exact binomial law: the worst case over all
    stopping times, even ones that know the randomized bounds' u (stop at the first crossing).
    lower(k, t): a bound checked after every vote, increasing in k; looks[t](k): the share of the
    auxiliary draw u for which look t's bound exceeds p (0 or 1 for a deterministic bound). The
    mass of each path is carried forward until it crosses."""
    looks = looks or {}
    alive = np.array([1.0])
    crossed = 0.0
    for t in range(1, horizon + 1):
        alive = np.append(alive * (1 - p), 0.0) + np.append(0.0, alive * p)  # k = 0..t
        if lower is not None:
            lo, hi = 0, t + 1  # the smallest k with lower(k, t) > p, by bisection
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if lower(mid, t) > p else (mid + 1, hi)
            crossed += alive[lo:].sum()
            alive[lo:] = 0.0
        if t in looks:
            share = np.array([looks[t](k) for k in range(t + 1)])
            crossed += (alive * share).sum()
            alive *= 1 - share
    return crossed


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_cs_holds_at_adversarial_stopping_times(p):
    alpha = 0.05
    worst = first_crossing(p, 500, lambda k, t: cs_lower(k, t, alpha))
    assert alpha / 20 < worst <= alpha  # the computation sees crossings at all
    # the same search breaks Clopper-Pearson looked at after every vote
    naive = first_crossing(p, 500, lambda k, t: clopper_pearson_lower(k, t, alpha))
    assert naive > 2 * alpha


@pytest.mark.parametrize("plan", [query_plan(300, 0.05), adaptive_plan(300, 0.05, 1)])
def test_the_engines_plans_hold_at_adversarial_stopping_times(plan):
    """Radius queries: the sequence at alpha/2 after every vote and a last look at alpha/2;
    adaptive certify: looks at a third and all of the budget, alpha/2 each. Whatever the
    stopping time, the bound the plan reports exceeds p with probability <= alpha (the union
    bound is nearly tight)."""
    worst = first_crossing(0.8, 300, lambda k, t: plan.lower(k, t).value)
    assert plan.alpha / 2 < worst <= plan.alpha
    # the same search catches a plan that spends the whole alpha at each of its looks
    unsplit = SequentialBound(0.0, tuple((n, plan.alpha) for n, _ in plan.looks))
    if len(unsplit.looks) > 1:
        assert first_crossing(0.8, 300, lambda k, t: unsplit.lower(k, t).value) > plan.alpha


@pytest.mark.parametrize("plan", [query_plan(300, 0.05, "randomized-clopper-pearson"),
                                  adaptive_plan(300, 0.05, 1, "randomized-clopper-pearson")])
def test_the_randomized_plans_hold_at_adversarial_stopping_times(plan):
    p = 0.8
    looks = {t: (lambda k, t=t, a=a: randomized_share(k, t, a, p)) for t, a in plan.looks}
    cs = (lambda k, t: cs_lower(k, t, plan.cs_alpha)) if plan.cs_alpha else None
    worst = first_crossing(p, 300, cs, looks)
    assert plan.alpha / 2 < worst <= plan.alpha


def test_sequential_bound_reports_its_best_valid_bound():
    plan = SequentialBound(0.0005, ((1000, 0.00025), (3000, 0.00025)))
    assert plan.alpha == pytest.approx(0.001)
    mid = plan.lower(990, 2000)
    assert (mid.name, mid.level, mid.value) == ("beta-binomial-cs", 0.0005,
                                                cs_lower(990, 2000, 0.0005))
    look = plan.lower(2990, 3000)
    assert look.name == "clopper-pearson" and look.value == clopper_pearson_lower(
        2990, 3000, 0.00025)
    assert SequentialBound(0.0, ((10, 0.001),)).lower(9, 5).value == 0.0  # nothing at n = 5
    with pytest.raises(ValueError):
        SequentialBound(0.0, ((10, 0.5), (5, 0.1)))
    with pytest.raises(ValueError):
        SequentialBound(0.0, ((10, 0.001),), "wald")


def test_printed_bounds_round_toward_safety():
    """A printed radius or lower bound never exceeds the value, a printed L never falls short."""
    assert text_down(0.5711406539, 6) == "0.571140"
    assert text_up(0.5711406469, 6) == "0.571141"
    assert text_down(0.25, 4) == "0.2500" and text_up(0.25, 4) == "0.2500"
    assert text_down(float("inf"), 4) == "inf"
