"""Main-effect level contrasts and two-way cell-mean tables, in response units, with t intervals of the
frame's model (see cells.py): estimate, interval and p of each row come from one model.

Marginal means are unweighted means of seed-adjusted cell means (each cell counts once), so they stay
comparable in unbalanced designs. Each level is reported two ways: as a deviation from the grand mean (the sum-to-zero
effect the ANOVA tests) and as a difference from the reference level (the baseline of the first
comparison, else the first level).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ablate.analysis.cells import CellTable


def main_effects(table: CellTable, factors: Sequence[str], reference: Mapping[str, str]) -> pd.DataFrame:
    """One row per (factor, level): marginal mean, effect vs grand mean, difference vs reference."""
    grand = np.full(len(table.cells), 1.0 / len(table.cells))
    keys, rows = [], []
    for factor in factors:
        levels = list(pd.unique(table.cells[factor]))
        reference_level = reference[factor] if reference[factor] in levels else levels[0]
        at_reference = table.weights({factor: reference_level})
        for level in levels:
            at_level = table.weights({factor: level})
            keys.append((factor, level, reference_level, table.n @ (at_level > 0)))
            rows.extend([at_level, at_level - grand, at_level - at_reference])
    summary = table.summarise(np.array(rows))
    values = summary[["estimate", "ci_low", "ci_high", "p"]].to_numpy().reshape(len(keys), 3, 4)
    records = []
    for (factor, level, reference_level, n_trials), row in zip(keys, values, strict=True):
        records.append(
            {"factor": factor, "level": level, "reference": reference_level, "n_trials": int(n_trials)}
            | _named("mean", row[0])
            | _named("effect", row[1])
            | _named("diff_vs_reference", row[2])
            | {"diff_vs_reference_p": float(row[2][3])}
        )
    return pd.DataFrame(records)


def two_way_tables(table: CellTable, pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Marginal cell means of every (a, b) level pair for each pair of factors, with CIs."""
    keys, rows = [], []
    for first, second in pairs:
        for level_a, level_b in itertools.product(
            pd.unique(table.cells[first]), pd.unique(table.cells[second])
        ):
            weights = table.weights({first: level_a, second: level_b})
            keys.append(
                {
                    "term": f"{first}:{second}",
                    "factor_a": first,
                    "level_a": level_a,
                    "factor_b": second,
                    "level_b": level_b,
                    "n_trials": int(table.n @ (weights > 0)),
                }
            )
            rows.append(weights)
    if not rows:
        return pd.DataFrame()
    summary = table.summarise(np.array(rows))[["estimate", "ci_low", "ci_high"]]
    return pd.concat([pd.DataFrame(keys), summary.rename(columns={"estimate": "mean"})], axis=1)


def _named(prefix: str, values: np.ndarray) -> dict[str, float]:
    estimate, low, high = (float(value) for value in values[:3])
    return {prefix: estimate, f"{prefix}_ci_low": low, f"{prefix}_ci_high": high}
