"""Exact Shapley decomposition of a comparison (baseline -> target) from cell means, and ablation paths.

The players are the factors the comparison changes. A conditional factor that changes together with the
factor it depends on (registers 0 -> 1 with register_init n/a -> zeros) joins that factor's player, since
the cells that would separate them do not exist. v(S) is the mean response of the cell with the players in
S at their target levels and the rest at baseline; factors named on neither side are averaged over.
Shapley value of i: sum over S not containing i of |S|!(n-|S|-1)!/n! * (v(S + i) - v(S)); the values sum to
v(all) - v(none) exactly. Ablation paths change one player at a time, in the given order and reversed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ablate.analysis.cells import CellTable
from ablate.analysis.comparison import Comparison
from ablate.analysis.factors import FactorSpace
from ablate.analysis.table import StudyDataError
from ablate.levels import NOT_APPLICABLE, cell_label

Subset = frozenset[str]


@dataclass
class ComparisonResult:
    """Total difference, Shapley values, ablation paths, and any cells the decomposition lacked."""

    name: str
    baseline: dict[str, str]
    target: dict[str, str]
    players: list[str]
    averaged_over: list[str]
    total: pd.DataFrame
    baseline_value: float = math.nan
    shapley: pd.DataFrame = field(default_factory=pd.DataFrame)
    paths: pd.DataFrame = field(default_factory=pd.DataFrame)
    missing_cells: list[str] = field(default_factory=list)


def resolve_sides(comparison: Comparison, design: FactorSpace) -> tuple[dict[str, str], dict[str, str]]:
    """Complete both sides: one-sided factors are held fixed where they apply; n/a where they cannot."""
    sides = (dict(comparison.baseline), dict(comparison.target))
    for side, other in zip(sides, (comparison.target, comparison.baseline), strict=True):
        for factor in sorted(other, key=lambda name: name in design.conditions):
            if factor not in side and design.condition_holds(factor, side) is not False:
                side[factor] = other[factor]
    for side in sides:
        for factor in design.conditions:
            holds = design.condition_holds(factor, side)
            if factor in side and holds is False:
                raise StudyDataError(
                    f"comparison {comparison.name!r}: {factor} applies only where {design.describe_condition(factor)}"
                )
            if factor not in side and holds is False:
                side[factor] = NOT_APPLICABLE
    return sides


def players_of(
    baseline: dict[str, str], target: dict[str, str], design: FactorSpace
) -> dict[str, tuple[str, ...]]:
    """Changed factors grouped into players, in design order; name -> factors."""
    changed = [name for name in design.factors if baseline.get(name) != target.get(name)]
    groups: dict[str, list[str]] = {}
    for name in sorted(changed, key=lambda name: name in design.conditions):
        parents = [other for other in design.conditions.get(name, {}) if other in changed]
        owner = next((key for key, members in groups.items() if parents and parents[0] in members), None)
        groups.setdefault(owner or name, []).append(name)
    ordered = sorted(groups.values(), key=lambda members: design.factors.index(members[0]))
    return {"+".join(members): tuple(members) for members in ordered}


def decompose(
    comparison: Comparison, design: FactorSpace, table: CellTable, why: Mapping[str, str] | None = None
) -> ComparisonResult:
    """Total, Shapley values (when every needed cell has trials) and both ablation paths.

    `why`: cell label -> why the cell has no usable trials (e.g. 'all 5 trials diverged')."""
    baseline, target = resolve_sides(comparison, design)
    players = players_of(baseline, target, design)
    if not players:
        raise StudyDataError(f"comparison {comparison.name!r} changes no factor")
    cells, missing = _subset_cells(players, baseline, target, table, why or {})
    names = list(players)
    result = ComparisonResult(
        name=comparison.name,
        baseline=baseline,
        target=target,
        players=names,
        averaged_over=[name for name in design.factors if name not in baseline or name not in target],
        total=pd.DataFrame(),
        missing_cells=sorted(set(missing.values())),
    )
    everyone, nobody = frozenset(names), frozenset()
    if everyone in missing or nobody in missing:
        return result
    total = cells[everyone] - cells[nobody]
    result.baseline_value = float(table.estimate(cells[nobody]))
    result.total = _with_tests(table, np.array([total]), pd.DataFrame({"quantity": ["total"]}))
    if not missing:
        result.shapley = _shapley_table(names, cells, table, float(result.total["estimate"].iloc[0]))
    result.paths = _paths(names, cells, baseline, target, players, table)
    return result


def _subset_cells(
    players, baseline, target, table: CellTable, why: Mapping[str, str]
) -> tuple[dict[Subset, np.ndarray], dict[Subset, str]]:
    weights, missing = {}, {}
    for size in range(len(players) + 1):
        for subset in itertools.combinations(players, size):
            spec = _spec(frozenset(subset), players, baseline, target)
            try:
                w = table.weights(spec)
            except ValueError:
                missing[frozenset(subset)] = f"{cell_label(spec)} (not in the design)"
                continue
            for label in table.empty_cells(w):
                missing[frozenset(subset)] = f"{label} ({why.get(label, 'no usable trials')})"
            weights[frozenset(subset)] = w
    return weights, missing


def _spec(subset: Subset, players, baseline, target) -> dict[str, str]:
    spec = dict(baseline)
    for player in subset:
        for factor in players[player]:
            if factor in target:
                spec[factor] = target[factor]
            else:
                spec.pop(factor, None)
    return spec


def shapley_weights(names: list[str], cells: dict[Subset, np.ndarray]) -> np.ndarray:
    """(n_players, n_cells): each player's Shapley value as a linear contrast of cell means."""
    n = len(names)
    rows = np.zeros((n, len(next(iter(cells.values())))))
    for i, name in enumerate(names):
        others = [other for other in names if other != name]
        for size in range(n):
            coefficient = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                before = frozenset(subset)
                rows[i] += coefficient * (cells[before | {name}] - cells[before])
    return rows


def _shapley_table(names, cells, table: CellTable, total: float) -> pd.DataFrame:
    everyone, nobody = frozenset(names), frozenset()
    values = shapley_weights(names, cells)
    alone = np.array([cells[frozenset({name})] - cells[nobody] for name in names])
    last = np.array([cells[everyone] - cells[everyone - {name}] for name in names])
    result = _with_tests(table, values, pd.DataFrame({"player": names}))
    result.insert(4, "share", result["estimate"] / total if total != 0 else np.nan)
    for label, rows in (("alone", alone), ("last", last)):
        summary = table.summarise(rows)
        result[label] = summary["estimate"].to_numpy()
        result[f"{label}_ci_low"] = summary["ci_low"].to_numpy()
        result[f"{label}_ci_high"] = summary["ci_high"].to_numpy()
    # order matters when changing a player first and last differ: an interaction contrast, tested
    order = table.summarise(alone - last)
    result["order_difference"] = order["estimate"].to_numpy()
    result["order_p"] = order["p"].to_numpy() if len(names) > 1 else np.nan
    return result


def _paths(names, cells, baseline, target, players, table: CellTable) -> pd.DataFrame:
    frames = []
    for order, sequence in (("forward", names), ("reverse", names[::-1])):
        steps = [frozenset(sequence[:j]) for j in range(len(sequence) + 1)]
        if any(step not in cells or table.empty_cells(cells[step]) for step in steps):
            continue
        deltas = np.array([cells[steps[j]] - cells[steps[j - 1]] for j in range(1, len(steps))])
        keys = pd.DataFrame(
            {
                "order": order,
                "step": range(1, len(steps)),
                "player": sequence,
                "cell": [cell_label(_spec(step, players, baseline, target)) for step in steps[1:]],
                "value": [float(table.estimate(cells[step])) for step in steps[1:]],
            }
        )
        summary = table.summarise(deltas)[["estimate", "ci_low", "ci_high", "p"]]
        summary = summary.rename(columns={"estimate": "delta"})
        frames.append(pd.concat([keys, summary], axis=1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _with_tests(table: CellTable, rows: np.ndarray, keys: pd.DataFrame) -> pd.DataFrame:
    summary = table.summarise(rows)
    return pd.concat([keys, summary[["estimate", "ci_low", "ci_high", "se", "t", "df", "p"]]], axis=1)
