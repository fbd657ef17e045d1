"""Cell means of one response over design cells: point estimates, bootstrap draws and contrast tests.

Every quantity the report estimates from cell means (level effects, comparisons, Shapley values,
ablation-path steps) is a linear contrast: a weight vector over cells. Estimates, bootstrap intervals
and t/F tests all go through the contrast's weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

from ablate.analysis.bootstrap import interval
from ablate.analysis.design import cell_label


def seeds_are_blocks(seeds: pd.Series, cells: pd.Series) -> bool:
    """Seed works as a block when there are several seeds and each one spans two or more cells."""
    per_seed = pd.DataFrame({"seed": seeds, "cell": cells}).groupby("seed")["cell"].nunique()
    return len(per_seed) > 1 and bool((per_seed >= 2).all())


class CellTable:
    """Per-seed sums and counts of `response` in each cell of `cells` (a frame of factor columns)."""

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
        self.seeds = np.asarray(seeds)
        keys = {tuple(row): i for i, row in enumerate(self.cells.itertuples(index=False, name=None))}
        rows = data[list(self.factors)].itertuples(index=False, name=None)
        self._cell_of_trial = np.array([keys[row] for row in rows], dtype=int)
        seed_position = {seed: j for j, seed in enumerate(self.seeds)}
        seed_of_trial = np.array([seed_position[seed] for seed in data["seed"]], dtype=int)
        self.sums = np.zeros((len(self.cells), len(self.seeds)))
        self.counts = np.zeros_like(self.sums)
        values = data[response].to_numpy(dtype=float)
        np.add.at(self.sums, (self._cell_of_trial, seed_of_trial), values)
        np.add.at(self.counts, (self._cell_of_trial, seed_of_trial), 1.0)
        self._values = values
        self._seed_of_trial = data["seed"].to_numpy()

    @property
    def n(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    @property
    def means(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums.sum(axis=1) / self.n

    def labels(self) -> list[str]:
        return [cell_label(row) for row in self.cells.to_dict("records")]

    def weights(self, spec: Mapping[str, str]) -> np.ndarray:
        """Equal weights over the cells matching `spec` (a partial assignment); zero elsewhere."""
        match = np.ones(len(self.cells), dtype=bool)
        for factor, level in spec.items():
            if factor in self.factors:
                match &= (self.cells[factor] == level).to_numpy()
        if not match.any():
            raise ValueError(f"no cell matches {cell_label(spec)}")
        return match / match.sum()

    def empty_cells(self, weights: np.ndarray) -> list[str]:
        """Labels of the cells a contrast needs that have no usable trials."""
        needed = (np.abs(weights) > 0) & (self.n == 0)
        labels = self.labels()
        return [labels[i] for i in np.flatnonzero(needed)]

    def estimate(self, weights: np.ndarray) -> np.ndarray:
        """Contrast estimates for weights of shape (n_cells,) or (n_contrasts, n_cells)."""
        return _apply(self.means[None, :], np.atleast_2d(weights)).reshape(np.shape(weights)[:-1])

    def bootstrap(self, seed_weights: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(n_boot, ...) bootstrap draws of the contrasts; `seed_weights` columns follow `self.seeds`."""
        with np.errstate(invalid="ignore", divide="ignore"):
            draws = (seed_weights @ self.sums.T) / (seed_weights @ self.counts.T)
        result = _apply(draws, np.atleast_2d(weights))
        return result.reshape((seed_weights.shape[0], *np.shape(weights)[:-1]))

    @property
    def n_clusters(self) -> int:
        """Seeds with at least one usable trial in these cells."""
        return int((self.counts.sum(axis=0) > 0).sum())

    def summarise(self, weights: np.ndarray, seed_weights: np.ndarray) -> pd.DataFrame:
        """Estimate and bootstrap interval of each contrast row."""
        rows = np.atleast_2d(weights)
        low, high = interval(self.bootstrap(seed_weights, rows), self.n_clusters)
        return pd.DataFrame({"estimate": self.estimate(rows), "ci_low": low, "ci_high": high})

    def t_test(self, weights: np.ndarray) -> pd.DataFrame:
        """t, df and two-sided p of each contrast from the cell-means model (seed as a block)."""
        rows = np.atleast_2d(weights)
        result = self._model.t_test(self._parameter_rows(rows))
        return pd.DataFrame(
            {"t": np.ravel(result.tvalue), "df": result.df_denom, "p": np.ravel(result.pvalue)}
        )

    def f_test(self, weights: np.ndarray) -> tuple[float, float, float, float]:
        """F, numerator df, denominator df and p for the joint null of the contrast rows."""
        result = self._model.f_test(self._parameter_rows(np.atleast_2d(weights)))
        return (
            float(np.squeeze(result.fvalue)),
            float(result.df_num),
            float(result.df_denom),
            float(result.pvalue),
        )

    @cached_property
    def _model(self):
        observed = pd.DataFrame(
            {
                "y": self._values,
                "cell": [f"c{i:05d}" for i in self._cell_of_trial],
                "block": self._seed_of_trial,
            }
        )
        blocks = seeds_are_blocks(observed["block"], observed["cell"])
        formula = "y ~ 0 + C(cell)" + (" + C(block, Sum)" if blocks else "")
        return smf.ols(formula, observed).fit()

    def _parameter_rows(self, rows: np.ndarray) -> np.ndarray:
        names = list(self._model.params.index)
        matrix = np.zeros((rows.shape[0], len(names)))
        for i in np.flatnonzero(np.abs(rows).sum(axis=0) > 0):
            matrix[:, names.index(f"C(cell)[c{i:05d}]")] = rows[:, i]
        return matrix


def _apply(means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    # means (B, n_cells) @ weights.T over the cells with non-zero weight only: the others may be NaN.
    used = np.abs(weights).sum(axis=0) > 0
    return means[:, used] @ weights[:, used].T
