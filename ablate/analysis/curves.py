"""Effects over training, and tokens to a target loss: statistics of the trials' validation-loss curves.

Effects over training: at every evaluation step, from the validation loss of the finished trials at that
step, each factor's main effect (every level against the reference level: unweighted means of cell
means, as in `effects`) and each comparison's total and exact Shapley split (v(S) a mean of cell means,
players as in `shapley`). Every statistic is a linear contrast of cell means, estimated at each step by
the same model as every other estimate of the report (`cells.CellTable`: seed-adjusted cell means, each
term tested against its own seed interaction, t intervals with Satterthwaite degrees of freedom).

Tokens to a target: the tokens a trial had trained on at the first evaluation where its validation loss
was at or below the target; NaN if it never was (reported as not reached: such a trial has no value, and
the report counts them per cell). "Converges faster" is read from these, "ends lower" from the final loss.

Statistics only: no plotting, no rendering (see `curve_sections`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ablate.analysis.cells import CellTable
from ablate.levels import NOT_APPLICABLE

TREND_POINTS = (0.1, 0.25, 0.5, 1.0)  # fractions of training at which the verdicts read a curve


@dataclass(frozen=True)
class Contrast:
    """One statistic: a named linear combination of cell means."""

    kind: str  # "effect" | "total" | "shapley"
    name: str  # the factor, or the comparison
    term: str  # the level (vs reference), or the player; "" for a total
    weights: np.ndarray  # (n_cells,)


def target_column(target: float) -> str:
    """The trials-table column of a target loss, e.g. tokens_to_3.5."""
    return f"tokens_to_{target:g}"


def tokens_to_target(curves: pd.DataFrame, targets: Sequence[float]) -> pd.DataFrame:
    """One row per trial: trial_id and, per target, tokens at the first evaluation with val_loss <= it."""
    points = curves.dropna(subset=["val_loss"]).sort_values(["trial_id", "step"])
    rows = []
    for trial_id, curve in points.groupby("trial_id", sort=True):
        loss, tokens = curve["val_loss"].to_numpy(float), curve["tokens"].to_numpy(float)
        row: dict[str, object] = {"trial_id": trial_id}
        for target in targets:
            reached = np.flatnonzero(loss <= target)
            row[target_column(target)] = tokens[reached[0]] if len(reached) else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["trial_id", *[target_column(t) for t in targets]])


def with_tokens_to_targets(
    trials: pd.DataFrame, curves: pd.DataFrame, targets: Sequence[float]
) -> pd.DataFrame:
    """`trials` with one tokens-to-target column per target (NaN: not reached, or no curve)."""
    if not targets:
        return trials
    reached = tokens_to_target(curves, targets)
    extra = (
        trials[["trial_id"]].astype(str).merge(reached.astype({"trial_id": str}), on="trial_id", how="left")
    )
    return trials.assign(**{c: extra[c].to_numpy() for c in reached.columns if c != "trial_id"})


# ----------------------------------------------------------------------------- contrasts of cell means


def _cell_index(trials: pd.DataFrame, factors: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The distinct cells (levels as strings) and each trial's cell number."""
    levels = trials[list(factors)].fillna(NOT_APPLICABLE).astype(str)  # a conditional factor may not apply
    cells = levels.drop_duplicates().sort_values(list(factors)).reset_index(drop=True)
    lookup = {tuple(row): i for i, row in enumerate(cells.itertuples(index=False, name=None))}
    return cells, np.array([lookup[tuple(row)] for row in levels.itertuples(index=False, name=None)])


def _mean_of(cells: pd.DataFrame, levels: Mapping[str, str]) -> np.ndarray:
    """Weights that average the cells matching `levels` (zeros if none does)."""
    match = np.ones(len(cells), dtype=bool)
    for factor, level in levels.items():
        match &= (cells[factor] == str(level)).to_numpy()
    return match / match.sum() if match.any() else np.full(len(cells), np.nan)


def effect_contrasts(
    cells: pd.DataFrame, factors: Sequence[str], reference: Mapping[str, str]
) -> list[Contrast]:
    """Each factor's levels against its reference level (the first level when the reference is absent);
    a conditional factor only where it applies."""
    contrasts = []
    for factor in factors:
        levels = [level for level in pd.unique(cells[factor]) if level != NOT_APPLICABLE]
        if len(levels) < 2:
            continue
        ref = str(reference.get(factor, levels[0]))
        ref = ref if ref in levels else levels[0]
        at_ref = _mean_of(cells, {factor: ref})
        for level in levels:
            if level != ref:
                contrasts.append(
                    Contrast("effect", factor, f"{level} vs {ref}", _mean_of(cells, {factor: level}) - at_ref)
                )
    return contrasts


def shapley_contrasts(
    cells: pd.DataFrame,
    name: str,
    baseline: Mapping[str, str],
    target: Mapping[str, str],
    players: Sequence[str],
) -> list[Contrast]:
    """The total (target - baseline) and each player's exact Shapley value, as contrasts of cell means.

    A player is a factor, or factors joined by "+" that change together; factors named on neither side
    are averaged over."""
    groups = {player: player.split("+") for player in players}
    fixed = {f: v for f, v in baseline.items() if f in target and target[f] == v}

    def value(coalition: frozenset[str]) -> np.ndarray:
        levels = dict(fixed)
        for player, members in groups.items():
            side = target if player in coalition else baseline
            levels |= {f: side[f] for f in members if f in side}
        return _mean_of(cells, levels)

    n, everyone = len(groups), frozenset(groups)
    contrasts = [Contrast("total", name, "", value(everyone) - value(frozenset()))]
    for player in groups:
        others = sorted(everyone - {player})
        weights = np.zeros(len(cells))
        for size in range(n):
            share = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                weights = weights + share * (value(s | {player}) - value(s))
        contrasts.append(Contrast("shapley", name, player, weights))
    return contrasts


# ----------------------------------------------------------------------------- contrasts at each point


def contrast_table(
    values: np.ndarray,
    cell: np.ndarray,
    seed: np.ndarray,
    contrasts: Sequence[Contrast],
    cells: pd.DataFrame,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimates, interval lows and highs, each (n_contrasts, n_points), of contrasts of cell means.

    `values` (n_trials, n_points), NaN where a trial has no value; at each point the trials with a value
    there form one `CellTable` (a contrast needing a cell without any is NaN)."""
    matrix = np.array([c.weights for c in contrasts])  # (K, C); a NaN row: a side that matches no cell
    invalid = np.isnan(matrix).any(axis=1)
    rows = np.where(np.isnan(matrix), 0.0, matrix)
    factors = list(cells.columns)
    trials = cells.iloc[cell].reset_index(drop=True).assign(seed=seed)
    shape = (len(contrasts), values.shape[1])
    estimate, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for point in range(values.shape[1]):
        present = np.isfinite(values[:, point])
        if not present.any():
            continue
        data = trials[present].assign(value=values[present, point])
        summary = CellTable(data, factors, "value", cells, sorted(set(seed.tolist()))).summarise(rows)
        estimate[:, point] = summary["estimate"].to_numpy()
        low[:, point], high[:, point] = summary["ci_low"].to_numpy(), summary["ci_high"].to_numpy()
    for table in (estimate, low, high):
        table[invalid] = np.nan
    return estimate, low, high


# ----------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class ComparisonSides:
    """A comparison as the curves need it: name, both sides and its players."""

    name: str
    baseline: Mapping[str, str]
    target: Mapping[str, str]
    players: Sequence[str]


def _finished(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["status"] == "finished"] if "status" in trials else trials


def _layout(trials: pd.DataFrame, factors: Sequence[str]):
    cells, cell = _cell_index(trials, factors)
    seeds = np.sort(trials["seed"].unique())
    return cells, cell, np.searchsorted(seeds, trials["seed"].to_numpy())


def _contrasts(cells, factors, reference, comparisons: Sequence[ComparisonSides]) -> list[Contrast]:
    contrasts = effect_contrasts(cells, factors, reference)
    for c in comparisons:
        contrasts += shapley_contrasts(cells, c.name, c.baseline, c.target, c.players)
    return contrasts


def effects_over_training(
    trials: pd.DataFrame,
    curves: pd.DataFrame,
    factors: Sequence[str],
    reference: Mapping[str, str],
    comparisons: Sequence[ComparisonSides] = (),
) -> pd.DataFrame:
    """Long table: kind, name, term, step, tokens, estimate, ci_low, ci_high, n_trials (at that step).

    Uses finished trials; a step counts only the trials evaluated there (all of them, in a study whose
    trials share a batch size and evaluation interval)."""
    used = _finished(trials).astype({"trial_id": str}).reset_index(drop=True)
    val = curves.dropna(subset=["val_loss"]).astype({"trial_id": str})
    val = val[val["trial_id"].isin(used["trial_id"])]
    if used.empty or val.empty:
        return pd.DataFrame(
            columns=["kind", "name", "term", "step", "tokens", "estimate", "ci_low", "ci_high", "n_trials"]
        )
    wide = val.pivot_table(index="trial_id", columns="step", values="val_loss", aggfunc="first")
    wide = wide.reindex(used["trial_id"])  # (T, P), NaN where a trial has no evaluation at that step
    tokens = val.groupby("step")["tokens"].first().reindex(wide.columns)
    cells, cell, seed = _layout(used, factors)
    contrasts = _contrasts(cells, factors, reference, comparisons)
    values = wide.to_numpy(float)
    estimate, low, high = contrast_table(values, cell, seed, contrasts, cells)
    counts = np.isfinite(values).sum(axis=0)
    frames = []
    for k, c in enumerate(contrasts):
        frames.append(
            pd.DataFrame(
                {
                    "kind": c.kind,
                    "name": c.name,
                    "term": c.term,
                    "step": wide.columns.to_numpy(),
                    "tokens": tokens.to_numpy(),
                    "estimate": estimate[k],
                    "ci_low": low[k],
                    "ci_high": high[k],
                    "n_trials": counts,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def target_effects(
    trials: pd.DataFrame,
    factors: Sequence[str],
    reference: Mapping[str, str],
    targets: Sequence[float],
    comparisons: Sequence[ComparisonSides] = (),
) -> pd.DataFrame:
    """Per target: effects and Shapley splits of tokens to the target (trials that reached it), with
    the number of finished trials that did not reach it."""
    used = _finished(trials).reset_index(drop=True)
    columns = [target_column(t) for t in targets]
    if used.empty or not columns:
        return pd.DataFrame()
    cells, cell, seed = _layout(used, factors)
    contrasts = _contrasts(cells, factors, reference, comparisons)
    values = used[columns].to_numpy(float)
    estimate, low, high = contrast_table(values, cell, seed, contrasts, cells)
    rows = []
    for j, target in enumerate(targets):
        for k, c in enumerate(contrasts):
            rows.append(
                {
                    "target": target,
                    "kind": c.kind,
                    "name": c.name,
                    "term": c.term,
                    "estimate": estimate[k, j],
                    "ci_low": low[k, j],
                    "ci_high": high[k, j],
                    "not_reached": int(np.isnan(values[:, j]).sum()),
                }
            )
    return pd.DataFrame(rows)


def reached_by_cell(trials: pd.DataFrame, factors: Sequence[str], targets: Sequence[float]) -> pd.DataFrame:
    """Per cell and target: finished trials, how many reached it, and their mean tokens to it."""
    used = _finished(trials)
    rows = []
    for levels, group in used.groupby(list(factors), sort=True, dropna=False):
        levels = levels if isinstance(levels, tuple) else (levels,)
        for target in targets:
            tokens = group[target_column(target)]
            rows.append(
                dict(zip(factors, levels, strict=True))
                | {
                    "target": target,
                    "trials": len(group),
                    "reached": int(tokens.notna().sum()),
                    "mean_tokens": tokens.mean(),
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- reading a curve


def trend(curve: pd.DataFrame, points: Sequence[float] = TREND_POINTS) -> list[dict]:
    """The statistic at fractions of training (nearest evaluation at or after each), whether its interval
    excludes zero there: rows of fraction, step, tokens, estimate, ci_low, ci_high, clear."""
    curve = curve.dropna(subset=["estimate"]).sort_values("step")
    if curve.empty:
        return []
    last = curve["tokens"].max()
    rows = []
    for fraction in points:
        at = curve[curve["tokens"] >= fraction * last].iloc[0]
        clear = bool(at["ci_low"] > 0 or at["ci_high"] < 0)
        rows.append(
            {
                "fraction": fraction,
                **{k: at[k] for k in ("step", "tokens", "estimate", "ci_low", "ci_high")},
                "clear": clear,
            }
        )
    return rows


def shape_of(rows: Sequence[dict]) -> str:
    """One word for how a statistic changes over training: fades, appears, flips, persists or none."""
    if not rows:
        return "none"
    early = [r for r in rows if r["fraction"] < 1.0]
    end = rows[-1]
    early_clear = [r for r in early if r["clear"]]
    if end["clear"]:
        if any(r["clear"] and np.sign(r["estimate"]) != np.sign(end["estimate"]) for r in early):
            return "flips"
        return "persists" if early_clear else "appears"
    return "fades" if early_clear else "none"
