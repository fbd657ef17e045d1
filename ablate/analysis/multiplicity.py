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


def adjust_members(members: Sequence[np.ndarray], grouped: Sequence[bool], method: str) -> list[np.ndarray]:
    """Adjust several arrays of p-values as one family. A grouped array holds p-values already adjusted
    within their group (e.g. min-p over cells): it enters as one member, its smallest p, and each of its
    p-values is scaled by the factor that member received (never below the member's adjusted p)."""
    heads = []
    for values, is_group in zip(members, grouped, strict=True):
        values = np.asarray(values, dtype=float)
        if is_group:
            finite = values[np.isfinite(values)]
            heads.append(np.array([finite.min()]) if len(finite) else np.array([np.nan]))
        else:
            heads.append(values)
    adjusted = adjust(np.concatenate(heads) if heads else np.array([]), method)
    result, start = [], 0
    for values, head, is_group in zip(members, heads, grouped, strict=True):
        values = np.asarray(values, dtype=float)
        part = adjusted[start : start + len(head)]
        start += len(head)
        if is_group and np.isfinite(part[0]):
            scale = part[0] / head[0]
            part = np.where(np.isfinite(values), np.minimum(np.maximum(part[0], values * scale), 1.0), np.nan)
        elif is_group:
            part = np.full(values.shape, np.nan)
        result.append(part)
    return result
