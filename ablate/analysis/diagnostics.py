"""Residual checks of each frame's additive fit (cell + seed): normality (Shapiro-Wilk) and equal variance
across cells (Brown-Forsythe: Levene's test about the median). A check that cannot be computed is listed
as skipped, with the reason, instead of printing a degenerate statistic."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ablate.analysis.anova import AnovaFit
from ablate.analysis.frames import Frame
from ablate.analysis.response import ResponseAnalysis

SHAPIRO_LIMIT = 5000
NORMALITY = "normal residuals (Shapiro-Wilk)"
EQUAL_VARIANCE = "equal variance across cells (Brown-Forsythe)"
MIN_PER_CELL = 3


def residual_checks(primary: ResponseAnalysis, frames: Sequence[Frame]) -> pd.DataFrame:
    """One row per (frame, check): statistic and p-value, or a note saying why it was skipped."""
    rows = []
    for frame in frames:
        fit = primary.fits.get(frame.name)
        if fit is not None:
            rows += [_normality(frame.name, fit), _equal_variance(frame.name, fit)]
    return pd.DataFrame(rows)


def _normality(frame: str, fit: AnovaFit) -> dict:
    resid = fit.resid[:SHAPIRO_LIMIT]
    if len(resid) < 3 or np.ptp(resid) <= 1e-12 * max(1.0, np.abs(fit.fitted).max(initial=0.0)):
        return _skipped(frame, NORMALITY, "fewer than 3 residuals, or all residuals zero")
    result = stats.shapiro(resid)
    return _row(frame, NORMALITY, result.statistic, result.pvalue)


def _equal_variance(frame: str, fit: AnovaFit) -> dict:
    groups = [fit.resid[fit.cells == cell] for cell in pd.unique(fit.cells)]
    groups = [group for group in groups if len(group) >= MIN_PER_CELL]
    if len(groups) < 2:
        return _skipped(
            frame,
            EQUAL_VARIANCE,
            f"needs {MIN_PER_CELL} or more trials in two or more cells (with 2 seeds a cell's residuals "
            "mirror each other, so the test is degenerate)",
        )
    spread = [np.abs(group - np.median(group)) for group in groups]
    if max(float(np.ptp(np.concatenate([s - s.mean() for s in spread]))), 0.0) <= 0.0:
        return _skipped(frame, EQUAL_VARIANCE, "the absolute deviations are constant within every cell")
    result = stats.levene(*groups, center="median")
    return _row(frame, EQUAL_VARIANCE, result.statistic, result.pvalue)


def _row(frame: str, check: str, statistic: float, p: float) -> dict:
    return {"frame": frame, "check": check, "statistic": float(statistic), "p": float(p), "note": ""}


def _skipped(frame: str, check: str, reason: str) -> dict:
    return {"frame": frame, "check": check, "statistic": np.nan, "p": np.nan, "note": f"skipped: {reason}"}
