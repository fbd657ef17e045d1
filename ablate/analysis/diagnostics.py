"""Residual checks of each frame's ANOVA: normality (Shapiro-Wilk) and equal variance across cells
(Brown-Forsythe: Levene's test about the median)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ablate.analysis.frames import Frame
from ablate.analysis.response import ResponseAnalysis

SHAPIRO_LIMIT = 5000


def residual_checks(primary: ResponseAnalysis, frames: Sequence[Frame]) -> pd.DataFrame:
    """One row per (frame, check) with the statistic and p-value."""
    rows = []
    for frame in frames:
        fit = primary.fits.get(frame.name)
        if fit is None or fit.n < 3:
            continue
        resid = fit.resid[:SHAPIRO_LIMIT]
        if np.ptp(resid) > 0:
            shapiro = stats.shapiro(resid)
            rows.append(
                _row(frame.name, "normal residuals (Shapiro-Wilk)", shapiro.statistic, shapiro.pvalue)
            )
        groups = [fit.resid[fit.cells == cell] for cell in pd.unique(fit.cells)]
        groups = [group for group in groups if len(group) > 1]
        if len(groups) > 1:
            levene = stats.levene(*groups, center="median")
            rows.append(
                _row(
                    frame.name,
                    "equal variance across cells (Brown-Forsythe)",
                    levene.statistic,
                    levene.pvalue,
                )
            )
    return pd.DataFrame(rows)


def _row(frame: str, check: str, statistic: float, p: float) -> dict:
    return {"frame": frame, "check": check, "statistic": float(statistic), "p": float(p)}
