"""StudyAnalysis: the result of `analyze`, with every table by name and a JSON-ready dict."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from ablate.analysis.divergence import DivergenceResult
from ablate.analysis.factors import FactorSpace
from ablate.analysis.response import ResponseAnalysis
from ablate.analysis.shapley import ComparisonResult

POWER_COLUMNS = ["frame", "term", "df", "df_resid", "n_trials", "p_adj", "significant", "mde", "mde_measures"]


@dataclass
class StudyAnalysis:
    """Everything `analyze` found; `tables()` names each table, `to_dict()` is the JSON document."""

    response: str
    factors: list[str]
    factor_space: FactorSpace
    adjust: str
    alpha: float
    seed: int
    vocab_size: int | None
    trials: pd.DataFrame
    frames: pd.DataFrame
    primary: ResponseAnalysis
    cell_means: pd.DataFrame
    interactions: pd.DataFrame
    simple_effects: pd.DataFrame
    comparisons: list[ComparisonResult]
    divergence: DivergenceResult
    secondary: dict[str, ResponseAnalysis]
    diagnostics: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def n_seeds(self) -> int:
        return int(self.trials["seed"].nunique())

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every result table by file-friendly name (empty tables included)."""
        anova = self.primary.anova
        return {
            "anova": anova,
            "effects": self.primary.effects,
            "power": anova[POWER_COLUMNS] if not anova.empty else anova,
            "cell_means": self.cell_means,
            "interactions": self.interactions,
            "simple_effects": self.simple_effects,
            "comparisons": _stacked([(c.name, c.total) for c in self.comparisons]),
            "shapley": _stacked([(c.name, c.shapley) for c in self.comparisons]),
            "ablation_paths": _stacked([(c.name, c.paths) for c in self.comparisons]),
            "divergence_by_cell": self.divergence.per_cell,
            "divergence_tests": self.divergence.tests,
            "divergence_sensitivity": self.divergence.sensitivity,
            "secondary_anova": _stacked([(name, r.anova) for name, r in self.secondary.items()], "response"),
            "secondary_effects": _stacked(
                [(name, r.effects) for name, r in self.secondary.items()], "response"
            ),
            "frames": self.frames,
            "diagnostics": self.diagnostics,
        }

    def to_dict(self) -> dict:
        """Settings, notes, comparison set-up and every table as a list of records (NaN -> null)."""
        return {
            "response": self.response,
            "factors": self.factors,
            "levels": {name: list(levels) for name, levels in self.factor_space.levels.items()},
            "conditions": {
                name: {k: list(v) for k, v in c.items()} for name, c in self.factor_space.conditions.items()
            },
            "reference_levels": self.factor_space.reference,
            "adjust": self.adjust,
            "alpha": self.alpha,
            "seed": self.seed,
            "n_seeds": self.n_seeds,
            "vocab_size": self.vocab_size,
            "notes": self.notes
            + self.divergence.notes
            + [n for r in self.secondary.values() for n in r.notes],
            "comparisons": [_comparison_setup(c) for c in self.comparisons],
            "divergence_conclusions_differ": self.divergence.conclusions_differ,
            "tables": {name: records(table) for name, table in self.tables().items()},
        }


def records(table: pd.DataFrame) -> list[dict]:
    """A table as JSON-safe records."""
    return json.loads(table.to_json(orient="records")) if not table.empty else []


def _stacked(named: list[tuple[str, pd.DataFrame]], column: str = "comparison") -> pd.DataFrame:
    frames = [table.assign(**{column: name}) for name, table in named if not table.empty]
    if not frames:
        return pd.DataFrame()
    stacked = pd.concat(frames, ignore_index=True)
    return stacked[[column, *[c for c in stacked.columns if c != column]]]


def _comparison_setup(result: ComparisonResult) -> dict:
    return {
        "name": result.name,
        "baseline": result.baseline,
        "target": result.target,
        "players": result.players,
        "averaged_over": result.averaged_over,
        "missing_cells": result.missing_cells,
    }
