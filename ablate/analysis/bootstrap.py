"""Cluster bootstrap over seeds: all trials of a seed are resampled together.

Intervals are expanded percentile intervals (Hesterberg 2015): the percentile interval taken at the
tail probability alpha' = 2 * Phi(-sqrt(n / (n - 1)) * t_{1 - alpha/2, n - 1}) for n seeds. With few
seeds the plain percentile interval is too narrow (the bootstrap variance of a mean is (n - 1)/n of the
true one, and t quantiles exceed normal ones); the expansion corrects both.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def seed_weights(n_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_seeds) counts: how often each seed is drawn in each bootstrap replicate."""
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot).astype(float)


def tail_probability(n_clusters: int, confidence: float = CONFIDENCE) -> float:
    """alpha' for the expanded percentile interval with n_clusters seeds."""
    alpha = 1.0 - confidence
    t_quantile = stats.t.ppf(1.0 - alpha / 2.0, n_clusters - 1)
    return float(2.0 * stats.norm.sf(np.sqrt(n_clusters / (n_clusters - 1)) * t_quantile))


def interval(
    draws: np.ndarray, n_clusters: int, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds over axis 0 of bootstrap draws (replicates with an empty cell are
    skipped); NaN with fewer than 2 seeds."""
    draws = np.asarray(draws, dtype=float)
    if n_clusters < 2 or draws.shape[0] == 0:
        return np.full(draws.shape[1:], np.nan), np.full(draws.shape[1:], np.nan)
    tail = tail_probability(n_clusters, confidence) / 2.0
    finite = np.where(np.isfinite(draws), draws, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(finite, [tail, 1.0 - tail], axis=0)
    return low, high
