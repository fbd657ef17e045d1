"""Factorial ANOVA of a fully crossed frame, on the cell x seed table of `cells.CellTable`.

Each term (main effect or interaction) is a set of orthonormal contrasts of the cell means (products of
Helmert contrasts), so its sum of squares, its F test and every estimate of the report come from one
model. Error terms:

- split-plot (two or more seeds, the default): each term is tested against its own seed interaction
  (term x seed), F = MS_term / MS_term x seed, with the Greenhouse-Geisser correction of both df. Valid
  when seeds differ in how much a factor helps (seed x factor random effects) and when levels differ in
  variance, where one pooled residual is not (measured in `ablate.bench.calibrate`);
- pooled (one seed): the highest-order interaction is the error term, which assumes it is absent; with one
  factor and one seed nothing measures the noise and nothing is tested.

With balanced complete data the split-plot sums of squares are the classic ones (Type I = II = III).
A cell without usable trials is predicted from the model without the highest-order interaction, which
then goes untested (noted); missing (cell, seed) entries are filled from the additive model and cost
error degrees of freedom (see cells.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import linalg, stats

from ablate.analysis.cells import POOLED, SPLIT_PLOT, CellTable
from ablate.analysis.power import minimum_detectable_effect

SEED_TERM = "seed"
RESIDUAL = "Residual"


@dataclass
class AnovaFit:
    """The term table and what a reader needs to judge it (residuals of the additive fit for plots)."""

    table: pd.DataFrame
    terms: dict[str, tuple[str, ...]]
    typ: str
    n: int
    df_resid: float
    mse: float
    ss_total: float
    fitted: np.ndarray
    resid: np.ndarray
    cells: np.ndarray
    level_counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    cell_table: CellTable | None = None


def frame_cells(data: pd.DataFrame, factors: Sequence[str]) -> pd.DataFrame:
    """Every combination of the levels present (a frame is crossed by construction)."""
    levels = [list(pd.unique(data[name])) for name in factors]
    return pd.MultiIndex.from_product(levels, names=list(factors)).to_frame(index=False)


def term_basis(cells: pd.DataFrame, factors: Sequence[str], term: Sequence[str]) -> np.ndarray:
    """(df, n_cells) orthonormal contrasts of a term: Helmert rows for its factors, means for the rest."""
    rows = np.ones((1, len(cells)))
    for name in factors:
        levels = list(pd.unique(cells[name]))
        index = cells[name].map({level: i for i, level in enumerate(levels)}).to_numpy()
        if name in term:
            part = linalg.helmert(len(levels))
        else:
            part = np.full((1, len(levels)), 1.0 / math.sqrt(len(levels)))
        rows = (rows[:, None, :] * part[None, :, index]).reshape(-1, len(cells))
    return rows


def all_terms(factors: Sequence[str], max_order: int) -> list[tuple[str, ...]]:
    return [combo for size in range(1, max_order + 1) for combo in itertools.combinations(factors, size)]


def fit_anova(data: pd.DataFrame, factors: Sequence[str], response: str) -> AnovaFit:
    """ANOVA of `response` over the crossed `factors` of `data` (usable trials), seed as a block."""
    data = data.dropna(subset=[response])
    factors = [name for name in factors if data[name].nunique() > 1]
    if not factors:
        raise ValueError(f"no factor varies among the usable trials of {response!r}")
    if np.ptp(data[response].to_numpy()) == 0:
        raise ValueError(f"{response!r} is constant among the usable trials")
    table = CellTable(data, factors, response, frame_cells(data, factors), sorted(data["seed"].unique()))
    notes = predict_empty_cells(table)
    top = len(factors) - (1 if table.predicted else 0)
    tested = all_terms(factors, top)
    if table.n_seeds < 2:
        tested, pooled_note = _pool_highest_order(table, tested)
        notes.append(pooled_note)
    floor = rounding_floor(table)
    rows = {":".join(term): _term_row(table, term, floor) for term in tested}
    fitted, resid, cell_index = table.residuals()
    mse, df_resid = table.additive_error()
    values = data[response].to_numpy()
    return AnovaFit(
        table=pd.DataFrame.from_dict(rows, orient="index"),
        terms={":".join(term): term for term in tested},
        typ=table.error.kind,
        n=len(data),
        df_resid=df_resid,
        mse=mse,
        ss_total=float(((values - values.mean()) ** 2).sum()),
        fitted=fitted,
        resid=resid,
        cells=cell_index,
        level_counts={name: int(data[name].nunique()) for name in factors},
        notes=notes,
        cell_table=table,
    )


def predict_empty_cells(table: CellTable) -> list[str]:
    """Predict cells without trials from the model without the highest-order interaction; notes."""
    empty = np.flatnonzero(table.unknown)
    if not len(empty):
        return []
    known = np.flatnonzero(~table.unknown)
    lower = all_terms(table.factors, len(table.factors) - 1)
    design = np.vstack(
        [np.ones((1, len(table.cells)))] + [term_basis(table.cells, table.factors, t) for t in lower]
    ).T
    coefficients, *_ = np.linalg.lstsq(design[known], table.mu[known], rcond=None)
    table.predict_cells(empty, design[empty] @ coefficients)
    labels = table.labels()
    return [
        f"cells without usable trials: {'; '.join(labels[i] for i in empty)}; their means are predicted "
        f"from the model without the {len(table.factors)}-way interaction, which is therefore not tested"
    ]


def _pool_highest_order(table: CellTable, tested: list[tuple[str, ...]]) -> tuple[list, str]:
    # one seed: the highest-order interaction left is the error of every other term
    order = max(len(term) for term in tested)
    error_terms = [term for term in tested if len(term) == order]
    if order == 1:
        table.use_pooled(math.nan, 0.0)
        return [], "one seed and one factor: nothing measures the noise, so nothing is tested; add seeds"
    basis = np.vstack([term_basis(table.cells, table.factors, term) for term in error_terms])
    values = basis @ np.nan_to_num(table.mu)
    df = len(basis) - len(table.predicted)
    table.use_pooled(float(values @ values / df) if df > 0 else math.nan, float(max(df, 0)))
    return [term for term in tested if len(term) < order], (
        f"one seed: no seed-based error; the {order}-way interaction serves as the error term "
        f"(df {df}), which assumes it is absent; add seeds for tests that do not"
    )


# How many units of float64 rounding, per entry of the cell x seed table, a contrast of it may carry
NOISE_ULPS = 16


def rounding_floor(table: CellTable) -> float:
    """The mean square that floating-point rounding alone can give a term's contrasts of this table.

    A response that several cells share exactly (a token count to a target, on the evaluation grid) makes
    some terms and their seed interactions zero, which contrasts compute as noise of ~1e-16 of the data's
    scale; their ratio is then any number at all, and the numeric library's build decides whether that
    "F" is significant. Mean squares at or below this floor are zero."""
    values = np.abs(np.nan_to_num(table.filled))
    return float(NOISE_ULPS * np.finfo(float).eps * values.max(initial=0.0) * values.size) ** 2


def _term_row(table: CellTable, term: tuple[str, ...], floor: float) -> dict:
    """A term's df, SS, F and p against its error; mean squares at or below `floor` count as zero."""
    basis = table.strata[term].basis if term in table.strata else term_basis(table.cells, table.factors, term)
    per_seed = basis @ np.nan_to_num(table.filled)
    mean = per_seed.mean(axis=1)
    k = len(basis)
    if table.error.kind == SPLIT_PLOT:
        deviations = per_seed - mean[:, None]
        df_error = k * (table.n_seeds - 1) * table.df_fraction
        ms_error = float((deviations**2).sum() / df_error) if df_error > 0 else math.nan
        ss = table.n_seeds * float(table.observed.mean()) * float(mean @ mean)
        error = f"{' x '.join(term)} x seed"
    else:
        df_error, ms_error = table.error.df, table.error.mse
        ss = table.n_seeds * float(mean @ mean)
        error = "highest-order interaction"
    if ss / k <= floor:
        ss = 0.0  # no effect beyond rounding
    if ms_error <= floor:
        ms_error = 0.0  # no error beyond rounding
    tested = df_error > 0 and ms_error > 0  # a noise-free table has no error to test against
    f_value = (ss / k) / ms_error if tested else math.nan
    p = float(stats.f.sf(f_value, k, df_error)) if tested else math.nan
    return {
        "df": float(k),
        "sum_sq": ss,
        "F": f_value,
        "p": p,
        "df_error": df_error,
        "ms_error": ms_error,
        "error": error,
    }


def term_statistics(fit: AnovaFit) -> pd.DataFrame:
    """Per term: df, SS, F, p, partial eta^2 and omega^2 against the term's error (negative omega set to
    0), share of the total sum of squares, and the minimum detectable effect at 80% power."""
    n_cells = int(np.prod(list(fit.level_counts.values())))
    n_seeds = fit.cell_table.n_seeds if fit.cell_table is not None else 1
    rows = []
    for term, factors in fit.terms.items():
        row = fit.table.loc[term]
        df, ss, ms_error, df_error = row["df"], row["sum_sq"], row["ms_error"], row["df_error"]
        ss_error = ms_error * df_error
        n = n_cells * n_seeds
        omega = _ratio(ss - df * ms_error, ss + (n - df) * ms_error)
        mde, meaning = minimum_detectable_effect(
            [fit.level_counts[name] for name in factors], df, df_error, n, ms_error
        )
        rows.append(
            {
                "term": term,
                "order": len(factors),
                "df": df,
                "sum_sq": ss,
                "F": row["F"],
                "p": row["p"],
                "partial_eta2": _ratio(ss, ss + ss_error),
                "partial_omega2": max(0.0, omega) if math.isfinite(omega) else math.nan,
                "share": _ratio(ss, fit.ss_total),
                "mde": mde,
                "mde_measures": meaning,
                "df_resid": df_error,
                "error": row["error"],
                "n_trials": fit.n,
                "anova_type": fit.typ,
            }
        )
    return pd.DataFrame(rows)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 and math.isfinite(denominator) else math.nan


__all__ = ["POOLED", "SPLIT_PLOT", "AnovaFit", "fit_anova", "term_statistics"]
