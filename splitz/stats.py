"""Confidence bounds and tests on binomial counts (float64 throughout)."""

import math

from scipy.stats import beta, binomtest, norm


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on p from k successes in n trials.

    Equals `beta.ppf(alpha, k, n - k + 1)`, i.e. statsmodels'
    `proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]`; 0 when k = 0.
    """
    _check_counts(k, n)
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound on p; 1 when k = n."""
    _check_counts(k, n)
    return 1.0 if k == n else float(beta.ppf(1.0 - alpha, k + 1, n - k))


def binomial_pvalue(k: int, n: int) -> float:
    """Two-sided p-value of k successes in n trials under p = 1/2 (Cohen et al.'s PREDICT)."""
    _check_counts(k, n)
    return 1.0 if n == 0 else float(binomtest(k, n, 0.5).pvalue)


def feature_radius(p_lower: float, sigma: float) -> float:
    """R_z = sigma * Phi^-1(p_lower), the l2 radius certified at the split; 0 if p_lower <= 1/2."""
    return sigma * float(norm.ppf(p_lower)) if p_lower > 0.5 else 0.0


def round_down(radius: float, digits: int = 6) -> float:
    """Round a radius down to `digits` decimals, past any float64 rounding of the last step."""
    scale = 10**digits
    return max(0.0, math.floor(radius * (1.0 - 1e-12) * scale) / scale)


def _check_counts(k: int, n: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
