"""Multiplicity adjustment of a family of p-values: Holm (default) or Benjamini-Hochberg."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from statsmodels.stats.multitest import multipletests

from ablate.analysis.table import StudyDataError

METHODS = {"holm": "holm", "bh": "fdr_bh"}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise StudyDataError(f"unknown adjustment {method!r}; valid: {list(METHODS)}")
    return method


def adjust(pvalues: Sequence[float], method: str) -> np.ndarray:
    """Adjusted p-values for one family; NaN entries stay NaN and do not count toward the family."""
    values = np.asarray(pvalues, dtype=float)
    adjusted = np.full(values.shape, np.nan)
    present = np.isfinite(values)
    if present.any():
        adjusted[present] = multipletests(values[present], method=METHODS[check_method(method)])[1]
    return adjusted
