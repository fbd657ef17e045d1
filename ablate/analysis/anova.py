"""Factorial ANOVA with statsmodels: OLS, sum-to-zero contrasts, seed as a block.

Type II sums of squares when the design is balanced (every cell has the same trials of every seed),
Type III otherwise. The model holds every interaction up to the highest order the data can estimate;
when a cell is empty or there is no replication, higher orders are pooled into the residual (noted).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm
from statsmodels.tools.sm_exceptions import SingularMatrixWarning

from ablate.analysis.cells import seeds_are_blocks
from ablate.analysis.power import minimum_detectable_effect

SEED_TERM = "seed"
RESIDUAL = "Residual"


@dataclass
class AnovaFit:
    """An ANOVA table (terms, the seed block, the residual) and what a reader needs to judge it."""

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


def is_balanced(data: pd.DataFrame, factors: Sequence[str]) -> bool:
    """Every combination of levels present, each with the same number of trials of every seed."""
    counts = data.groupby([*factors, "seed"], observed=True).size()
    expected = int(np.prod([data[name].nunique() for name in factors])) * data["seed"].nunique()
    return len(counts) == expected and counts.nunique() == 1


def fit_anova(data: pd.DataFrame, factors: Sequence[str], response: str) -> AnovaFit:
    """Fit response ~ factors (all estimable interactions) + seed block and tabulate the ANOVA."""
    data = data.dropna(subset=[response])
    factors = [name for name in factors if data[name].nunique() > 1]
    if not factors:
        raise ValueError(f"no factor varies among the usable trials of {response!r}")
    if np.ptp(data[response].to_numpy()) == 0:
        raise ValueError(f"{response!r} is constant among the usable trials")
    coded = pd.DataFrame({f"f{i}": data[name].to_numpy() for i, name in enumerate(factors)})
    coded["y"] = data[response].to_numpy()
    coded["block"] = data["seed"].to_numpy()
    cell = coded.groupby([f"f{i}" for i in range(len(factors))], sort=False).ngroup()
    use_block = seeds_are_blocks(coded["block"], cell)
    notes = [] if use_block else ["seed is not a block here (one seed, or seeds not shared across cells)"]
    model, order = _largest_estimable_model(coded, len(factors), use_block)
    if order < len(factors):
        notes.append(
            f"interactions of order {order + 1} and above are pooled into the residual "
            "(empty cells or no replication leave them inestimable)"
        )
    balanced = is_balanced(data, factors)
    table = anova_lm(model, typ=2 if balanced else 3).drop(index="Intercept", errors="ignore")
    names = {f"C(f{i}, Sum)": name for i, name in enumerate(factors)} | {"C(block, Sum)": SEED_TERM}
    table.index = [":".join(names.get(part, part) for part in str(term).split(":")) for term in table.index]
    table = table.rename(columns={"PR(>F)": "p"})
    terms = {term: tuple(term.split(":")) for term in table.index if term not in (SEED_TERM, RESIDUAL)}
    values = coded["y"].to_numpy()
    return AnovaFit(
        table=table[["df", "sum_sq", "F", "p"]],
        terms=terms,
        typ="II" if balanced else "III",
        n=len(coded),
        df_resid=float(model.df_resid),
        mse=float(model.mse_resid),
        ss_total=float(((values - values.mean()) ** 2).sum()),
        fitted=np.asarray(model.fittedvalues),
        resid=np.asarray(model.resid),
        cells=cell.to_numpy(),
        level_counts={name: int(data[name].nunique()) for name in factors},
        notes=notes,
    )


def _largest_estimable_model(coded: pd.DataFrame, n_factors: int, use_block: bool):
    for order in range(n_factors, 0, -1):
        terms = [
            ":".join(f"C(f{i}, Sum)" for i in combo)
            for size in range(1, order + 1)
            for combo in itertools.combinations(range(n_factors), size)
        ]
        formula = "y ~ " + " + ".join(terms) + (" + C(block, Sum)" if use_block else "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingularMatrixWarning)  # rank is checked just below
            model = smf.ols(formula, coded).fit()
        if model.model.rank == model.model.exog.shape[1] and model.df_resid >= 1:
            return model, order
    raise ValueError("no estimable model: too few usable trials for the factors given")


def term_statistics(fit: AnovaFit) -> pd.DataFrame:
    """Per term: df, SS, F, p, partial eta^2, partial omega^2 (negative estimates set to 0), share of
    the total sum of squares, and the minimum detectable effect at 80% power."""
    ss_resid = float(fit.table.loc[RESIDUAL, "sum_sq"])
    rows = []
    for term, factors in fit.terms.items():
        df, ss, f_value, p = fit.table.loc[term, ["df", "sum_sq", "F", "p"]]
        omega = _ratio(ss - df * fit.mse, ss + (fit.n - df) * fit.mse)
        mde, meaning = minimum_detectable_effect(
            [fit.level_counts[name] for name in factors], df, fit.df_resid, fit.n, fit.mse
        )
        rows.append(
            {
                "term": term,
                "order": len(factors),
                "df": df,
                "sum_sq": ss,
                "F": f_value,
                "p": p,
                "partial_eta2": _ratio(ss, ss + ss_resid),
                "partial_omega2": max(0.0, omega) if math.isfinite(omega) else math.nan,
                "share": _ratio(ss, fit.ss_total),
                "mde": mde,
                "mde_measures": meaning,
                "df_resid": fit.df_resid,
                "n_trials": fit.n,
                "anova_type": fit.typ,
            }
        )
    return pd.DataFrame(rows)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan
