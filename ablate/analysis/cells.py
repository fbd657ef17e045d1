"""Cell means of one response over design cells, and the one model behind every estimate, interval and
test of a contrast of them.

Every quantity the report estimates (level effects, two-way means, comparisons, Shapley values,
ablation-path steps, simple effects) is a linear contrast: a weight vector w over cells. The data are a
cell x seed table y[c, s] (the mean when a cell holds several trials of one seed).

Split-plot model (the default with two or more seeds): each seed gives its own value of the contrast,
v_s = sum_c w_c y[c, s]; the estimate is their mean (the seed-adjusted contrast: seed offsets cancel
because a contrast's weights sum to zero). The cell space is split into terms (the grand mean, main
effects, interactions; `factorial_strata`), and each term's error is its own seed interaction
(term x seed): its mean square MS_T with (df_T)(S - 1) degrees of freedom. A contrast's variance is
sum_T ||B_T w||^2 MS_T / S (B_T: the term's orthonormal rows), with Satterthwaite degrees of freedom,
and its t test and 95% interval use them. Because no variance is pooled across terms, this stays valid
when seeds differ in how much a factor helps (seed x factor random effects) and, to a good
approximation, when levels differ in variance (see `ablate.bench.calibrate`).

Pooled model (one seed): one error mean square for every contrast (see `Error`).

Missing values: a (cell, seed) without a usable trial is filled from the additive model
cell + seed fitted to the observed values (the Yates approach for missing values in blocked designs);
every error df shrinks by the share of the error df the m filled entries use up, 1 - m / ((C - 1)(S - 1)),
and a contrast's variance counts, per cell, the seeds observed there. A cell without any usable trial is unknown: a contrast that needs
it is not estimable, unless the caller predicts the cell (`predict_cells`, used by factorial frames
under a model without the highest-order interaction).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from ablate.levels import cell_label

CONFIDENCE = 0.95
SPLIT_PLOT = "split-plot"
POOLED = "pooled"


@dataclass(frozen=True)
class Error:
    """How contrasts get their error: per contrast over seeds (split-plot) or one pooled mean square."""

    kind: str = SPLIT_PLOT
    mse: float = float("nan")
    df: float = float("nan")


def additive_fit(
    values: np.ndarray, observed: np.ndarray, sweeps: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares cell means and seed offsets (offsets sum to zero) of y[c, s] = mu_c + b_s + e.

    Alternating means converge to the least-squares fit for a connected design; rows without any
    observed value get NaN.
    """
    offsets = np.zeros(values.shape[1])
    counts_cell, counts_seed = observed.sum(axis=1), observed.sum(axis=0)
    zeroed = np.where(observed, values, 0.0)
    mu = np.full(values.shape[0], np.nan)
    for _ in range(sweeps):
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = (zeroed - observed * offsets[None, :]).sum(axis=1) / counts_cell
            new = (zeroed - observed * np.nan_to_num(mu)[:, None]).sum(axis=0) / np.maximum(counts_seed, 1)
        new -= new.mean()
        if np.max(np.abs(new - offsets)) < 1e-13:
            offsets = new
            break
        offsets = new
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (zeroed - observed * offsets[None, :]).sum(axis=1) / counts_cell
    return mu, offsets


def per_seed_contrasts(rows: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """rows @ filled, each contrast's value per seed, with every value inside the product's rounding error
    set to exactly 0: a contrast of equal cell values is 0, not the last bits of their magnitude (tokens to
    a target of 7.3M gave 1e-9, and intervals of 1e-10 around an exact 0 that changed with the BLAS build)."""
    return _rounding_to_zero(rows @ filled, np.abs(rows) @ np.abs(filled), rows.shape[-1])


def _rounding_to_zero(values: np.ndarray, scale: np.ndarray, terms: int) -> np.ndarray:
    # values computed from `terms` terms whose magnitudes sum to `scale`, 0 where within their rounding error
    return np.where(np.abs(values) <= terms * np.finfo(float).eps * scale, 0.0, values)


class CellTable:
    """Per-seed means of `response` in each cell of `cells` (a frame of factor columns), and contrasts."""

    def __init__(
        self,
        data: pd.DataFrame,
        factors: Sequence[str],
        response: str,
        cells: pd.DataFrame,
        seeds: Sequence[int],
    ) -> None:
        self.factors = tuple(factors)
        self.response = response
        self.cells = cells[list(self.factors)].drop_duplicates().reset_index(drop=True)
        self._columns = {name: self.cells[name].to_numpy() for name in self.factors}
        self._labels: list[str] | None = None
        keys = {tuple(row): i for i, row in enumerate(self.cells.itertuples(index=False, name=None))}
        rows = data[list(self.factors)].itertuples(index=False, name=None)
        cell_of_trial = np.array([keys[row] for row in rows], dtype=int)
        present = set(data["seed"])
        self.seeds = np.asarray([seed for seed in seeds if seed in present])  # seeds with data here
        seed_position = {seed: j for j, seed in enumerate(self.seeds)}
        seed_of_trial = np.array([seed_position[seed] for seed in data["seed"]], dtype=int)
        sums = np.zeros((len(self.cells), len(self.seeds)))
        self.counts = np.zeros_like(sums)
        values = data[response].to_numpy(dtype=float)
        np.add.at(sums, (cell_of_trial, seed_of_trial), values)
        np.add.at(self.counts, (cell_of_trial, seed_of_trial), 1.0)
        self.observed = self.counts > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            self.values = sums / self.counts
        self.mu, self.offsets = additive_fit(self.values, self.observed)
        self.predicted: list[int] = []
        self.error = Error(SPLIT_PLOT if len(self.seeds) >= 2 else POOLED)
        self.strata: dict[tuple[str, ...], Stratum] = {}
        if self.error.kind == SPLIT_PLOT:
            self.use_strata(factorial_strata(self.cells, self.factors))
        self._cell_of_trial, self._seed_of_trial, self._trial_values = cell_of_trial, seed_of_trial, values

    # ----- the table ---------------------------------------------------------------------------------

    @property
    def n(self) -> np.ndarray:
        """Usable trials per cell."""
        return self.counts.sum(axis=1)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def means(self) -> np.ndarray:
        """Seed-adjusted cell means (NaN for a cell without usable trials that was not predicted)."""
        return self.mu

    @property
    def filled(self) -> np.ndarray:
        """y[c, s] with missing entries filled from the additive model (NaN rows: unknown cells)."""
        fit = self.mu[:, None] + self.offsets[None, :]
        return np.where(self.observed, self.values, fit)

    @property
    def unknown(self) -> np.ndarray:
        return ~np.isfinite(self.mu)

    def labels(self) -> list[str]:
        if self._labels is None:
            self._labels = [cell_label(row) for row in self.cells.to_dict("records")]
        return self._labels

    def weights(self, spec: Mapping[str, str]) -> np.ndarray:
        """Equal weights over the cells matching `spec` (a partial assignment); zero elsewhere."""
        match = np.ones(len(self.cells), dtype=bool)
        for factor, level in spec.items():
            if factor in self.factors:
                match &= self._columns[factor] == level
        if not match.any():
            raise ValueError(f"no cell matches {cell_label(spec)}")
        return match / match.sum()

    def empty_cells(self, weights: np.ndarray) -> list[str]:
        """Labels of the cells a contrast needs that have no usable trials (and were not predicted)."""
        needed = np.flatnonzero((np.abs(np.atleast_2d(weights)).sum(axis=0) > 0) & self.unknown)
        return [self.labels()[i] for i in needed] if len(needed) else []

    def predict_cells(self, cells: Sequence[int], means: Sequence[float]) -> None:
        """Give cells without trials model-predicted means (they then count as fully imputed)."""
        for cell, mean in zip(cells, means, strict=True):
            self.mu[cell] = mean
            self.predicted.append(int(cell))
        if self.strata:
            self.use_strata({term: stratum.basis for term, stratum in self.strata.items()})

    @property
    def df_fraction(self) -> float:
        """The share of error degrees of freedom left after filling missing entries (Yates: each filled
        value costs one df of the (C - 1)(S - 1) of the additive model's residual)."""
        complete = (len(self.cells) - 1) * (self.n_seeds - 1)
        missing = int((~self.observed).sum())
        return max(0.0, 1.0 - missing / complete) if complete > 0 else 0.0

    def use_strata(self, bases: Mapping[tuple[str, ...], np.ndarray]) -> None:
        """Split the contrast space into error strata (one per term): each stratum's error is its own seed
        interaction (term x seed), and a contrast's variance sums over the strata it touches, with
        Satterthwaite degrees of freedom. Recomputed after cells are predicted."""
        fraction = self.df_fraction
        filled = np.nan_to_num(self.filled)
        self.strata = {}
        for term, basis in bases.items():
            per_seed = per_seed_contrasts(basis, filled)
            deviations = per_seed - per_seed.mean(axis=1, keepdims=True)
            deviations = _rounding_to_zero(deviations, np.abs(basis) @ np.abs(filled), per_seed.shape[-1])
            df = len(basis) * (self.n_seeds - 1) * fraction
            ms = float((deviations**2).sum() / df) if df > 0 else np.nan
            self.strata[term] = Stratum(basis, ms, df)

    def use_pooled(self, mse: float, df: float) -> None:
        """Test every contrast against one pooled error mean square with `df` degrees of freedom."""
        self.error = Error(POOLED, float(mse), float(df))

    # ----- the additive fit as residuals, for diagnostics ------------------------------------------

    def residuals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fitted, residual, cell index) per usable trial under the additive model cell + seed."""
        fitted = self.mu[self._cell_of_trial] + self.offsets[self._seed_of_trial]
        return fitted, self._trial_values - fitted, self._cell_of_trial

    def additive_error(self) -> tuple[float, float]:
        """Mean square and df of the additive model's residual (the classic seed-as-block error)."""
        _, resid, _ = self.residuals()
        df = len(resid) - int(np.isfinite(self.mu).sum() - len(self.predicted)) - (self.n_seeds - 1)
        return (float(resid @ resid / df), float(df)) if df > 0 else (float("nan"), 0.0)

    # ----- contrasts -------------------------------------------------------------------------------

    def estimate(self, weights: np.ndarray) -> np.ndarray:
        """Point estimates of contrasts of shape (n_cells,) or (k, n_cells); NaN where not estimable."""
        rows = np.atleast_2d(np.asarray(weights, dtype=float))
        needed = np.abs(rows) > 0
        values = np.where(needed, rows, 0.0) @ np.nan_to_num(self.mu)
        values[(needed & self.unknown[None, :]).any(axis=1)] = np.nan
        return values.reshape(np.shape(weights)[:-1])

    def summarise(self, weights: np.ndarray, confidence: float = CONFIDENCE) -> pd.DataFrame:
        """Per contrast row: estimate, se, df, t, p and the t interval (NaN where not estimable)."""
        rows = np.atleast_2d(np.asarray(weights, dtype=float))
        estimable = ~((np.abs(rows) > 0) & self.unknown[None, :]).any(axis=1)
        per_seed = per_seed_contrasts(np.where(np.abs(rows) > 0, rows, 0.0), np.nan_to_num(self.filled))
        estimate = per_seed.mean(axis=1)
        if self.error.kind == SPLIT_PLOT:
            variance, df = self._stratified_variance(rows)
        else:
            df = np.full(len(rows), self.error.df)
            per_cell = np.maximum(self.n, 1.0)
            variance = self.error.mse * (rows**2 / per_cell[None, :]).sum(axis=1)
        return _t_summary(estimate, variance, df, estimable, confidence)

    def _stratified_variance(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # var(w'mu) = sum_T ||B_T w||^2 MS_T * sum_c(w_c^2 / n_c) / sum_c(w_c^2), with n_c the seeds
        # observed in cell c (S for a predicted cell); Satterthwaite df
        seeds_seen = self.observed.sum(axis=1)
        per_cell = np.where(seeds_seen > 0, seeds_seen, self.n_seeds)
        with np.errstate(invalid="ignore", divide="ignore"):
            inverse = (rows**2 / per_cell[None, :]).sum(axis=1) / (rows**2).sum(axis=1)
        inverse = np.nan_to_num(inverse)  # an all-zero row (a level against itself) has variance 0
        strata = list(self.strata.values())
        loads = np.array([((stratum.basis @ rows.T) ** 2).sum(axis=0) for stratum in strata])  # (T, k)
        ms = np.array([stratum.ms for stratum in strata])[:, None]
        dfs = np.array([stratum.df for stratum in strata])[:, None]
        parts = loads * ms * inverse[None, :]
        variance = parts.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            df = variance**2 / (parts**2 / dfs).sum(axis=0)
        return variance, df

    def f_test(self, weights: np.ndarray) -> tuple[float, float, float, float]:
        """F, numerator df, denominator df and p for the joint null of the contrast rows (split-plot: a
        Wald F with the stratified covariance, Satterthwaite denominator df)."""
        rows = np.atleast_2d(np.asarray(weights, dtype=float))
        if self.empty_cells(rows):
            return (np.nan, np.nan, np.nan, np.nan)
        basis = _orthonormal_rows(rows)
        k = len(basis)
        if k == 0:
            return (np.nan, np.nan, np.nan, np.nan)
        per_seed = per_seed_contrasts(basis, np.nan_to_num(self.filled))  # (k, S)
        mean = per_seed.mean(axis=1)
        if self.error.kind == SPLIT_PLOT:
            return self._stratified_f(basis, mean)
        df_error, error = self.error.df, self.error.mse
        if not (df_error > 0 and error > 0):
            return (np.nan, float(k), float(df_error), np.nan)
        f_value = self.n_seeds * float(mean @ mean) / k / error
        return (float(f_value), float(k), float(df_error), float(stats.f.sf(f_value, k, df_error)))

    def _stratified_f(self, basis: np.ndarray, mean: np.ndarray) -> tuple[float, float, float, float]:
        # Wald F with the stratified covariance; denominator df by Satterthwaite on its trace
        effective = self.n_seeds * float(self.observed.mean())
        covariance = np.zeros((len(basis), len(basis)))
        traces, dfs = [], []
        for stratum in self.strata.values():
            projected = basis @ stratum.basis.T
            part = projected @ projected.T * stratum.ms / effective
            covariance += part
            traces.append(np.trace(part))
            dfs.append(stratum.df)
        k = len(basis)
        traces_arr = np.array(traces)
        with np.errstate(invalid="ignore", divide="ignore"):
            df_error = traces_arr.sum() ** 2 / (traces_arr**2 / np.array(dfs)).sum()
        try:
            f_value = float(mean @ np.linalg.solve(covariance, mean)) / k
        except np.linalg.LinAlgError:
            return (np.nan, float(k), float(df_error), np.nan)
        return (f_value, float(k), float(df_error), float(stats.f.sf(f_value, k, df_error)))


@dataclass(frozen=True)
class Stratum:
    """An error stratum: orthonormal contrast rows (k, n_cells), their seed-interaction mean square, df."""

    basis: np.ndarray
    ms: float
    df: float


def factorial_strata(cells: pd.DataFrame, factors: Sequence[str]) -> dict[tuple[str, ...], np.ndarray]:
    """Orthonormal rows per term (the grand mean, main effects, then interactions by order) that together
    span every linear function of the cell means. In a crossed design they are the classic ANOVA terms; where conditional
    factors break the crossing, each term keeps what the lower-order terms do not already explain."""
    factors = list(factors)
    spanned = np.full((len(cells), 1), 1.0 / np.sqrt(len(cells)))
    codes = np.column_stack([pd.factorize(cells[name])[0] for name in factors])
    bases = {(): spanned.T.copy()}  # the grand mean: its error is the seed-to-seed variation
    for size in range(1, len(factors) + 1):
        for term in itertools.combinations(factors, size):
            _, groups = np.unique(
                codes[:, [factors.index(name) for name in term]], axis=0, return_inverse=True
            )
            indicator = np.eye(groups.max() + 1)[groups.ravel()]  # (n_cells, n_groups)
            rest = indicator - spanned @ (spanned.T @ indicator)
            u, singular, _ = np.linalg.svd(rest, full_matrices=False)
            rank = int((singular > 1e-9 * max(1.0, singular.max(initial=0.0))).sum())
            if rank:
                bases[term] = u[:, :rank].T
                spanned = np.hstack([spanned, u[:, :rank]])
    return bases


def _orthonormal_rows(rows: np.ndarray) -> np.ndarray:
    # an orthonormal basis of the row space (the hypothesis), rank-revealing
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    rank = int((singular > singular.max(initial=0.0) * 1e-10).sum())
    return vt[:rank]


def _t_summary(
    estimate: np.ndarray, variance: np.ndarray, df: np.ndarray, estimable: np.ndarray, confidence: float
) -> pd.DataFrame:
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(variance)
        t = estimate / se
        p = 2.0 * stats.t.sf(np.abs(t), df)
        half = stats.t.ppf(0.5 + confidence / 2.0, df) * se
    low, high = estimate - half, estimate + half
    exact = estimable & (se == 0)  # a contrast the data pin exactly (e.g. identical cells)
    low, high = np.where(exact, estimate, low), np.where(exact, estimate, high)
    t, p = np.where(exact, np.nan, t), np.where(exact, np.nan, p)
    columns = {"estimate": estimate, "ci_low": low, "ci_high": high, "se": se, "df": df, "t": t, "p": p}
    return pd.DataFrame({name: np.where(estimable, values, np.nan) for name, values in columns.items()})
