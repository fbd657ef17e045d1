"""Minimum detectable effect (MDE) of an ANOVA term at a given power, from the residual variance.

The F test of a term with df1 numerator and df2 residual degrees of freedom has power
P(F'(df1, df2, lambda) > F_crit), F_crit = F^-1(1 - alpha; df1, df2), with noncentrality
lambda = N * mean(tau^2) / sigma^2 (tau: the term's effects over the N trials; sigma^2: residual mean
square). We solve power(lambda) = target for lambda with scipy's noncentral F, then convert:

- main effect with L levels: the smallest difference between two levels that is detected when the
  other levels sit midway (the least favourable pattern): delta = sigma * sqrt(2 * L * lambda / N);
- interaction of two-level factors (order m): the difference of differences: 2^m * sigma * sqrt(lambda / N);
- other interactions: the root mean square of the interaction effects, sigma * sqrt(lambda / N).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.80


@functools.lru_cache(maxsize=4096)
def noncentrality_for_power(
    df_num: float, df_den: float, alpha: float = ALPHA, power: float = POWER
) -> float:
    """The noncentrality lambda at which the F test of (df_num, df_den) has the given power."""
    critical = stats.f.isf(alpha, df_num, df_den)

    def shortfall(lam: float) -> float:
        return float(stats.ncf.sf(critical, df_num, df_den, lam)) - power

    upper = 1.0
    while shortfall(upper) < 0:
        upper *= 2.0
    return float(optimize.brentq(shortfall, 0.0, upper, xtol=1e-10))


def minimum_detectable_effect(
    level_counts: Sequence[int], df_num: float, df_den: float, n: int, mse: float
) -> tuple[float, str]:
    """MDE in response units and what it measures, for a term over factors with `level_counts` levels."""
    if df_den < 1 or not math.isfinite(mse):
        return math.nan, "not available (no residual degrees of freedom)"
    scale = math.sqrt(noncentrality_for_power(df_num, df_den) * mse / n)
    if len(level_counts) == 1:
        return scale * math.sqrt(2 * level_counts[0]), "difference between two levels"
    if all(count == 2 for count in level_counts):
        return scale * 2 ** len(level_counts), "difference of differences"
    return scale, "root mean square of the interaction effects"
