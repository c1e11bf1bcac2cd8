import math

import pytest
from scipy.stats import binom, norm

from splitz.stats import (
    binomial_pvalue,
    clopper_pearson_lower,
    clopper_pearson_upper,
    feature_radius,
    round_down,
)


def test_lower_bound_all_successes_is_closed_form():
    # P[X = n] = p^n = alpha  =>  p_lower = alpha^(1/n)
    assert clopper_pearson_lower(100_000, 100_000, 0.001) == pytest.approx(
        0.001 ** (1 / 100_000), rel=1e-12)


def test_lower_bound_one_success_is_closed_form():
    # P[X >= 1] = 1 - (1-p)^n = alpha  =>  p_lower = 1 - (1-alpha)^(1/n)
    assert clopper_pearson_lower(1, 50, 0.01) == pytest.approx(1 - 0.99 ** (1 / 50), rel=1e-9)


def test_upper_bound_zero_successes_is_closed_form():
    # P[X = 0] = (1-p)^n = alpha  =>  p_upper = 1 - alpha^(1/n)
    assert clopper_pearson_upper(0, 200, 0.05) == pytest.approx(1 - 0.05 ** (1 / 200), rel=1e-9)


@pytest.mark.parametrize("k,n,alpha", [(990, 1000, 0.001), (60, 100, 0.05), (7, 9, 0.2)])
def test_lower_bound_is_the_exact_binomial_tail_inversion(k, n, alpha):
    # By definition P[X >= k | p_lower] = alpha; checked with the binomial law, not the beta.
    p = clopper_pearson_lower(k, n, alpha)
    assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-9)
    assert binom.sf(k - 1, n, p * 0.999) < alpha  # and it is the smallest such p


def test_upper_bound_is_the_exact_binomial_tail_inversion():
    p = clopper_pearson_upper(40, 100, 0.01)
    assert binom.cdf(40, 100, p) == pytest.approx(0.01, rel=1e-9)


def test_bounds_bracket_the_estimate_and_edges():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    lo, hi = clopper_pearson_lower(30, 100, 0.01), clopper_pearson_upper(30, 100, 0.01)
    assert lo < 0.3 < hi


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


def test_round_down_never_rounds_up():
    assert round_down(1.2345678) == 1.234567
    assert round_down(0.9999999999) == 0.999999
    assert round_down(2.0) <= 2.0
    for v in (0.1, 0.3, 1 / 3, math.pi, 1e-7):
        assert round_down(v) <= v
