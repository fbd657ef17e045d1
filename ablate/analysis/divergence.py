"""Divergence as an outcome: counts and rates per cell with exact intervals, a test per cell and per
factor, and a reference reanalysis of the loss with diverged runs capped.

Per cell: the rate with its Clopper-Pearson 95% interval, and an exact permutation test of whether the
cell diverges more often than the others (so one bad cell is seen even when no main effect is), adjusted
over the cells by the min-p method; it enters the verdict's family as one member. Per factor: logistic regression
of diverged ~ main effects (sum contrasts), one likelihood-ratio test per factor; under
(quasi-)separation (e.g. every rbf run diverges) the logistic estimates do not exist and each factor is
tested with Fisher's exact test on its levels x {diverged, not} table (Monte Carlo p for tables larger
than 2x2). Nothing is tested when no run diverged.

Treatments of the loss: `excluded` (diverged runs dropped) is the primary analysis and the only one the
verdicts use. `capped` (diverged runs and any loss above ln(vocab_size) set to ln(vocab_size), the loss
of a uniform predictor) is computed only when a run diverged, and shown for reference: a few capped runs
sit several nats above the rest and dominate every error term, so its p-values say more about the cap
than about the factors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

from ablate.analysis.factors import FactorSpace
from ablate.analysis.frames import Frame
from ablate.analysis.multiplicity import adjust_members
from ablate.analysis.response import frame_anova

TREATMENTS = ("excluded", "capped")
PERMUTATIONS = 999
LARGEST_SANE_LOGIT = 10.0


def divergence_by_cell(
    trials: pd.DataFrame, cells: pd.DataFrame, factors: Sequence[str], rng: np.random.Generator | None = None
) -> pd.DataFrame:
    """Per design cell: trials run to an outcome (finished + diverged), diverged, failed, the rate with its
    Clopper-Pearson interval, and (when any run diverged) the cell's test against the rest (`cell_tests`)."""
    counts = pd.crosstab([trials[name] for name in factors], trials["status"])
    counts = counts.reindex(columns=["finished", "diverged", "failed"], fill_value=0).reset_index()
    table = cells.merge(counts, on=list(factors), how="left").fillna(
        {"finished": 0, "diverged": 0, "failed": 0}
    )
    table["trials"] = table["finished"] + table["diverged"]
    table = table[[*factors, "trials", "diverged", "failed"]].astype(
        {"trials": int, "diverged": int, "failed": int}
    )
    table["rate"] = table["diverged"] / table["trials"].where(table["trials"] > 0)
    table["rate_ci_low"], table["rate_ci_high"] = clopper_pearson(table["diverged"], table["trials"])
    rng = rng if rng is not None else np.random.default_rng(0)
    table["p"] = cell_tests(table["diverged"].to_numpy(), table["trials"].to_numpy(), rng)
    return table


def clopper_pearson(
    successes: pd.Series, trials: pd.Series, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Exact binomial interval of each rate (NaN for cells without trials)."""
    k, n = successes.to_numpy(dtype=float), trials.to_numpy(dtype=float)
    tail = (1.0 - confidence) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, stats.beta.ppf(tail, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.ppf(1.0 - tail, k + 1, n - k), 1.0)
    empty = n == 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def cell_tests(
    diverged: np.ndarray, trials: np.ndarray, rng: np.random.Generator, n_permutations: int = PERMUTATIONS
) -> np.ndarray:
    """Per cell, the p-value that some cell diverges this much more often than the rest, adjusted over
    the cells (Westfall-Young min-p over permutations of the diverged labels among trials).

    A cell's raw statistic is the hypergeometric upper tail P(X >= k) of its k diverged runs out of n, given
    the study-wide count; the adjusted p of a cell is the share of permutations whose smallest tail over
    all cells is at or below the cell's. NaN when nothing (or everything) diverged or the cell is empty."""
    total, total_diverged = int(trials.sum()), int(diverged.sum())
    p = np.full(len(trials), np.nan)
    if total_diverged in (0, total):
        return p
    present = trials > 0
    observed = stats.hypergeom.sf(diverged - 1, total, total_diverged, trials)
    cell_of_trial = np.repeat(np.arange(len(trials)), trials.astype(int))
    chosen = np.argpartition(rng.random((n_permutations, total)), total_diverged - 1, axis=1)[
        :, :total_diverged
    ]
    counts = np.zeros((n_permutations, len(trials)))
    np.add.at(
        counts, (np.repeat(np.arange(n_permutations), total_diverged), cell_of_trial[chosen].ravel()), 1.0
    )
    tails = stats.hypergeom.sf(counts - 1, total, total_diverged, trials[None, :])
    smallest = np.sort(tails[:, present].min(axis=1))
    at_or_below = np.searchsorted(smallest, observed[present] * (1 + 1e-12), side="right")
    p[present] = (at_or_below + 1) / (n_permutations + 1)
    return p


def divergence_tests(data: pd.DataFrame, factors: Sequence[str], rng: np.random.Generator) -> pd.DataFrame:
    """One row per factor: method, statistic, df, p (unadjusted). `data`: finished and diverged trials."""
    factors = [name for name in factors if data[name].nunique() > 1]
    diverged = (data["status"] == "diverged").astype(float)
    if not factors or diverged.sum() in (0, len(data)):
        return pd.DataFrame()
    coded = pd.DataFrame({f"f{i}": data[name].to_numpy() for i, name in enumerate(factors)})
    coded["d"] = diverged.to_numpy()
    full = _logistic(coded, [f"f{i}" for i in range(len(factors))])
    if full is None:
        return pd.DataFrame([_fisher(data, name, diverged, rng) for name in factors])
    rows = []
    for i, name in enumerate(factors):
        reduced = _logistic(coded, [f"f{j}" for j in range(len(factors)) if j != i])
        statistic = max(0.0, reduced.deviance - full.deviance) if reduced is not None else math.nan
        df = full.df_model - (reduced.df_model if reduced is not None else 0)
        rows.append(
            {
                "factor": name,
                "method": "logistic LR",
                "statistic": statistic,
                "df": df,
                "p": stats.chi2.sf(statistic, df),
            }
        )
    return pd.DataFrame(rows)


def _logistic(coded: pd.DataFrame, columns: list[str]):
    # None when separation or non-convergence makes the logistic estimates meaningless
    formula = "d ~ " + (" + ".join(f"C({column}, Sum)" for column in columns) if columns else "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.glm(formula, coded, family=sm.families.Binomial()).fit()
        except (np.linalg.LinAlgError, ValueError):
            return None
    troubled = any(issubclass(w.category, PerfectSeparationWarning | ConvergenceWarning) for w in caught)
    if troubled or not np.all(np.isfinite(fit.params)) or np.abs(fit.params).max() > LARGEST_SANE_LOGIT:
        return None
    return fit


def _fisher(data: pd.DataFrame, factor: str, diverged: pd.Series, rng: np.random.Generator) -> dict:
    table = pd.crosstab(data[factor], diverged).to_numpy()
    if table.shape == (2, 2):
        result = stats.fisher_exact(table)
        method = "Fisher exact"
    else:
        result = stats.fisher_exact(table, method=stats.MonteCarloMethod(n_resamples=9999, rng=rng))
        method = "Fisher exact (Monte Carlo)"
    return {
        "factor": factor,
        "method": method,
        "statistic": math.nan,
        "df": table.shape[0] - 1,
        "p": result.pvalue,
    }


def treat(data: pd.DataFrame, response: str, treatment: str, vocab_size: int | None) -> pd.DataFrame:
    """The frame's trials with `response` as the given treatment defines it (usable rows only)."""
    finished = (data["status"] == "finished") & data[response].notna()
    if treatment == "excluded":
        return data[finished]
    outcome = data[finished | (data["status"] == "diverged")].copy()
    is_diverged = outcome["status"] == "diverged"
    if treatment == "capped":
        if vocab_size is None:
            raise ValueError("capped treatment needs vocab_size")
        cap = math.log(vocab_size)
        outcome[response] = outcome[response].clip(upper=cap).where(~is_diverged, cap)
    else:
        raise ValueError(f"unknown treatment {treatment!r}; valid: {list(TREATMENTS)}")
    return outcome


def compare_conclusions(adjusted: dict[str, pd.Series], alpha: float) -> pd.DataFrame:
    """Adjusted p per term under each treatment, and whether the significance verdicts agree."""
    table = pd.DataFrame({f"p_adj_{name}": values for name, values in adjusted.items()})
    verdicts = table.lt(alpha).where(table.notna())
    table["agree"] = verdicts.apply(lambda row: row.dropna().nunique() <= 1, axis=1)
    return table.rename_axis(["frame", "term"]).reset_index()


@dataclass
class DivergenceResult:
    """Divergence per cell, the factor tests, and the loss verdicts under each treatment."""

    per_cell: pd.DataFrame
    tests: pd.DataFrame
    sensitivity: pd.DataFrame
    conclusions_differ: bool
    notes: list[str] = field(default_factory=list)


def analyze_divergence(
    table: pd.DataFrame,
    frames: Sequence[Frame],
    design: FactorSpace,
    response: str,
    vocab_size: int | None,
    method: str,
    alpha: float,
    seed: int,
) -> DivergenceResult:
    """Rates and tests per cell, factor tests (p_adj here within the family; `analyze` adjusts them
    again with every other claim) and, when a run diverged, the capped reanalysis for reference."""
    rng = np.random.default_rng(seed)
    outcome = table["status"] != "failed"
    tests = []
    for frame in frames:
        found = divergence_tests(table[frame.mask & outcome], frame.factors, rng)
        if not found.empty:
            keep = [frame.keeps_term((name,)) for name in found["factor"]]
            tests.append(found[keep].assign(frame=frame.name))
    tests_table = pd.concat(tests, ignore_index=True) if tests else pd.DataFrame()
    per_cell = divergence_by_cell(table, design.cells(), design.factors, rng)
    factor_p, cell_p = adjust_members(
        [tests_table.get("p", pd.Series(dtype=float)).to_numpy(), per_cell["p"].to_numpy()],
        [False, True],
        method,
    )
    if not tests_table.empty:
        tests_table["p_adj"] = factor_p
        tests_table["significant"] = tests_table["p_adj"] < alpha
    per_cell["p_adj"] = cell_p
    per_cell["significant"] = per_cell["p_adj"] < alpha
    any_diverged = bool((table["status"] == "diverged").any())
    sensitivity, notes = (
        _sensitivity(table, frames, response, vocab_size, method, alpha)
        if any_diverged
        else (pd.DataFrame(), [])
    )
    differs = bool(not sensitivity.empty and not sensitivity["agree"].all())
    return DivergenceResult(per_cell, tests_table, sensitivity, differs, notes)


def _sensitivity(table, frames, response, vocab_size, method, alpha) -> tuple[pd.DataFrame, list[str]]:
    if not vocab_size:
        return pd.DataFrame(), ["vocab_size not given: the capped reanalysis of diverged runs is skipped"]
    notes: list[str] = []
    adjusted = {}
    for treatment in TREATMENTS:
        frame_data = {
            frame.name: treat(table[frame.mask], response, treatment, vocab_size) for frame in frames
        }
        anova, _, _ = frame_anova(frames, frame_data, response, method)
        if not anova.empty:
            adjusted[treatment] = anova.set_index(["frame", "term"])["p_adj"]
    return (compare_conclusions(adjusted, alpha) if adjusted else pd.DataFrame()), notes
