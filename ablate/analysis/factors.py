"""The factor space of a trials table: factors, their levels, `when` conditions of conditional factors, and
the cells they span."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from ablate.analysis.table import StudyDataError, ordered_levels
from ablate.levels import NOT_APPLICABLE

Conditions = dict[str, dict[str, tuple[str, ...]]]


@dataclass(frozen=True)
class FactorSpace:
    """Factors with their levels; a conditional factor applies only where its condition holds."""

    factors: tuple[str, ...]
    levels: dict[str, tuple[str, ...]]
    conditions: Conditions
    reference: dict[str, str]

    @property
    def unconditional(self) -> tuple[str, ...]:
        return tuple(name for name in self.factors if name not in self.conditions)

    def condition_holds(self, factor: str, assignment: Mapping[str, str]) -> bool | None:
        """True/False when decided by `assignment`, None when it names too few factors."""
        decided = True
        for other, allowed in self.conditions.get(factor, {}).items():
            if other not in assignment:
                decided = False
            elif assignment[other] not in allowed:
                return False
        return True if decided else None

    def describe_condition(self, factor: str) -> str:
        parts = [f"{other} in {{{', '.join(allowed)}}}" for other, allowed in self.conditions[factor].items()]
        return " and ".join(parts)

    def cells(self) -> pd.DataFrame:
        """Every cell of the design; a conditional factor is n/a where its condition fails."""
        order = [*self.unconditional, *(name for name in self.factors if name in self.conditions)]
        rows: list[dict[str, str]] = [{}]
        for factor in order:
            grown = []
            for row in rows:
                applies = self.condition_holds(factor, row) is not False
                for level in self.levels[factor] if applies else (NOT_APPLICABLE,):
                    grown.append({**row, factor: level})
            rows = grown
        return pd.DataFrame(rows, columns=list(self.factors))


def build_factor_space(
    table: pd.DataFrame,
    factors: Sequence[str],
    conditions: Mapping[str, Mapping[str, Sequence[str]]] | None,
    reference: Mapping[str, str],
) -> FactorSpace:
    """Levels from the table, conditions given or inferred, validated against the table."""
    levels = {name: ordered_levels(table[name]) for name in factors}
    for name, found in levels.items():
        if not found:
            raise StudyDataError(f"factor {name!r} has no values in the table")
    given = infer_conditions(table, factors) if conditions is None else _normalised(conditions, levels)
    reference_levels = {name: reference.get(name, levels[name][0]) for name in factors}
    design = FactorSpace(tuple(factors), levels, given, reference_levels)
    _check_table_matches(table, design)
    return design


def infer_conditions(table: pd.DataFrame, factors: Sequence[str]) -> Conditions:
    """For each factor with empty values, find one other factor whose levels explain when it applies."""
    inferred: Conditions = {}
    for name in factors:
        empty = table[name].isna()
        if not empty.any():
            continue
        for other in factors:
            if other == name or table[other].isna().any():
                continue
            applies = set(table.loc[~empty, other])
            if applies.isdisjoint(set(table.loc[empty, other])):
                inferred[name] = {
                    other: tuple(level for level in ordered_levels(table[other]) if level in applies)
                }
                break
        else:
            raise StudyDataError(
                f"factor {name!r} is empty in {int(empty.sum())} trials and no other factor explains when "
                "it applies; give its `when` condition (conditions={factor: {other: [levels]}})"
            )
    return inferred


def _normalised(conditions: Mapping[str, Mapping[str, Sequence[str]]], levels: Conditions) -> Conditions:
    result: Conditions = {}
    for name, clauses in conditions.items():
        if name not in levels:
            raise StudyDataError(f"condition on unknown factor {name!r}; factors: {list(levels)}")
        for other, allowed in clauses.items():
            if other not in levels or other == name:
                raise StudyDataError(f"condition of {name!r} names {other!r}; valid: {list(levels)}")
            unknown = [str(level) for level in allowed if str(level) not in levels[other]]
            if unknown:
                raise StudyDataError(
                    f"condition of {name!r}: unknown level(s) {unknown} of {other!r}; levels: {list(levels[other])}"
                )
        result[name] = {other: tuple(map(str, allowed)) for other, allowed in clauses.items()}
    return result


def _check_table_matches(table: pd.DataFrame, design: FactorSpace) -> None:
    for name in design.factors:
        if name not in design.conditions:
            if table[name].isna().any():
                raise StudyDataError(f"factor {name!r} is empty in some trials but has no `when` condition")
            continue
        holds = pd.Series(True, index=table.index)
        for other, allowed in design.conditions[name].items():
            holds &= table[other].isin(allowed)
        wrong = table.index[holds == table[name].isna()]
        if len(wrong):
            trial = table.loc[wrong[0], "trial_id"]
            raise StudyDataError(
                f"factor {name!r} must be set exactly where {design.describe_condition(name)}; "
                f"{len(wrong)} trial(s) disagree (e.g. {trial})"
            )
