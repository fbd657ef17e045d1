"""Multiplicity adjustment of a family of p-values: Holm (default) or Benjamini-Hochberg.

BH comes from statsmodels. Holm is the step-down max(p_(1..i) * (m - j + 1)) written out here:
statsmodels' Holm branch runs gc.collect() on every call (~0.2 s with a full heap), and a report adjusts
many families. tests/test_analysis_anova.py checks it against statsmodels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from statsmodels.stats.multitest import multipletests

from ablate.analysis.table import StudyDataError

METHODS = ("holm", "bh")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise StudyDataError(f"unknown adjustment {method!r}; valid: {list(METHODS)}")
    return method


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values."""
    order = np.argsort(pvalues)
    steps = pvalues[order] * np.arange(len(pvalues), 0, -1)
    adjusted = np.empty_like(steps)
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


def adjust(pvalues: Sequence[float], method: str) -> np.ndarray:
    """Adjusted p-values for one family; NaN entries stay NaN and do not count toward the family."""
    values = np.asarray(pvalues, dtype=float)
    adjusted = np.full(values.shape, np.nan)
    present = np.isfinite(values)
    if present.any():
        if check_method(method) == "holm":
            adjusted[present] = holm(values[present])
        else:
            adjusted[present] = multipletests(values[present], method="fdr_bh")[1]
    return adjusted
