"""`analyze`: every attribution analysis of a study's trials table, gathered in a StudyAnalysis."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ablate.analysis.cells import POOLED, CellTable
from ablate.analysis.comparison import Comparison, parse_comparison
from ablate.analysis.diagnostics import residual_checks
from ablate.analysis.divergence import DivergenceResult, analyze_divergence
from ablate.analysis.effects import two_way_tables
from ablate.analysis.factors import FactorSpace, build_factor_space
from ablate.analysis.frames import CROSSED, Frame, build_frames
from ablate.analysis.multiplicity import adjust_members, check_method
from ablate.analysis.response import ResponseAnalysis, analyze_response, usable
from ablate.analysis.result import StudyAnalysis
from ablate.analysis.shapley import ComparisonResult, decompose
from ablate.analysis.simple_effects import simple_effects
from ablate.analysis.table import StudyDataError, prepare_trials
from ablate.analysis.threads import one_blas_thread
from ablate.levels import NOT_APPLICABLE, cell_label

ALPHA = 0.05
FEW_SEEDS = 5


def analyze(
    trials: pd.DataFrame,
    factors: list[str],
    response: str,
    *,
    comparisons: Sequence[Comparison | str] = (),
    secondary: Sequence[str] = (),
    conditions: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    adjust: str = "holm",
    vocab_size: int | None = None,
    seed: int = 0,
) -> StudyAnalysis:
    """Attribute `response` (lower is better) to `factors` with the methods README describes (Attribution).

    `trials`: one row per trial (trial_id, factor columns, seed, status, responses). `conditions`:
    factor -> {other factor: levels where it applies}; inferred from empty values when None.
    `adjust`: "holm" or "bh", applied once across every claim the verdict can make (ANOVA terms of
    the primary response, comparisons, Shapley values, order tests, divergence tests), and within
    each family that only describes (simple effects, secondary responses). `seed`: Monte Carlo tests.
    Raises StudyDataError on bad input.
    """
    with one_blas_thread():
        method = check_method(adjust)
        secondary = [name for name in secondary if name != response]
        table, design, parsed = _prepare(trials, factors, response, secondary, comparisons, conditions)
        return _run(table, design, parsed, response, secondary, method, vocab_size, seed)


def _prepare(trials, factors, response, secondary, comparisons, conditions):
    # the validated table (n/a filled in), the design with its reference levels, parsed comparisons
    table = prepare_trials(trials, factors, [response, *secondary])
    design = build_factor_space(table, factors, conditions, reference={})
    parsed = [parse_comparison(item) if isinstance(item, str) else item for item in comparisons]
    for comparison in parsed:
        comparison.validate(design.levels)
    reference = {**design.reference, **(parsed[0].baseline if parsed else {})}
    design = dataclasses.replace(design, reference=reference)
    for name in design.conditions:
        table[name] = table[name].fillna(NOT_APPLICABLE)
    if usable(table, response).empty:
        raise StudyDataError(f"no finished trial has a value of {response!r}")
    return table, design, parsed


def _run(table, design, parsed, response, secondary, method, vocab_size, seed) -> StudyAnalysis:
    frames = build_frames(table, design)
    seeds = np.sort(table["seed"].unique())
    primary = analyze_response(table, frames, design, response, method, ALPHA)
    full = CellTable(usable(table, response), design.factors, response, design.cells(), seeds)
    _share_pooled_error(full, primary)
    reasons = cell_reasons(table, design)
    comparisons = [decompose(c, design, full, reasons) for c in parsed]
    divergence = analyze_divergence(table, frames, design, response, vocab_size, method, ALPHA, seed)
    adjust_claims(primary.anova, comparisons, divergence, method, ALPHA)
    return StudyAnalysis(
        response=response,
        factors=list(design.factors),
        factor_space=design,
        adjust=method,
        alpha=ALPHA,
        seed=seed,
        vocab_size=vocab_size,
        trials=table,
        frames=_frames_table(table, frames, response),
        primary=primary,
        cell_means=_cell_means(full, reasons),
        interactions=_interactions(primary, frames),
        simple_effects=_simple_effects(primary, design, method),
        comparisons=comparisons,
        divergence=divergence,
        secondary={name: analyze_response(table, frames, design, name, method, ALPHA) for name in secondary},
        diagnostics=residual_checks(primary, frames),
        notes=_notes(table, response, secondary, primary),
    )


def _share_pooled_error(full: CellTable, primary: ResponseAnalysis) -> None:
    # with one seed the comparisons borrow the crossed frame's pooled error (the only one there is)
    crossed = primary.cell_tables.get(CROSSED)
    if full.error.kind == POOLED:
        if crossed is not None and crossed.error.kind == POOLED:
            full.use_pooled(crossed.error.mse, crossed.error.df)
        else:
            full.use_pooled(np.nan, 0.0)


def cell_reasons(table: pd.DataFrame, design: FactorSpace) -> dict[str, str]:
    """Cell label -> why it has no usable trials ('all 5 trials diverged', 'no trials', ...)."""
    reasons = {}
    keys = zip(*(table[name] for name in design.factors), table["status"], strict=True)
    counts: dict[tuple, dict[str, int]] = {}
    for *cell_key, status in keys:
        tally = counts.setdefault(tuple(cell_key), {})
        tally[status] = tally.get(status, 0) + 1
    for cell in design.cells().to_dict("records"):
        row = counts.get(tuple(cell[name] for name in design.factors), {})
        finished = row.get("finished", 0)
        diverged, failed = row.get("diverged", 0), row.get("failed", 0)
        total = finished + diverged + failed
        if total == 0:
            reasons[cell_label(cell)] = "no trials"
        elif diverged == total:
            reasons[cell_label(cell)] = f"all {total} trials diverged"
        elif failed == total:
            reasons[cell_label(cell)] = f"all {total} trials failed"
        else:
            parts = [f"{n} {word}" for n, word in ((diverged, "diverged"), (failed, "failed")) if n]
            others = total - diverged - failed
            if others:
                parts.append(f"{others} without a value")
            reasons[cell_label(cell)] = ", ".join(parts)
    return reasons


def adjust_claims(
    anova: pd.DataFrame,
    comparisons: Sequence[ComparisonResult],
    divergence: DivergenceResult,
    method: str,
    alpha: float,
) -> None:
    """Adjust, as one family, the p-values behind every claim the verdict can make; set p_adj in place.

    Members: ANOVA terms of the primary response, each comparison's total and Shapley values, the
    order tests (changed first vs last), divergence tests per factor, and the per-cell divergence tests
    (already adjusted over cells) as one member."""
    members = [(anova, "p", "p_adj", False)]
    for result in comparisons:
        members += [(result.total, "p", "p_adj", False), (result.shapley, "p", "p_adj", False)]
        members.append((result.shapley, "order_p", "order_p_adj", False))
    members += [(divergence.tests, "p", "p_adj", False), (divergence.per_cell, "p", "p_adj", True)]
    members = [member for member in members if member[1] in member[0].columns]
    adjusted = adjust_members(
        [frame[column].to_numpy(dtype=float) for frame, column, _, _ in members],
        [grouped for *_, grouped in members],
        method,
    )
    for (frame, _, out, _), values in zip(members, adjusted, strict=True):
        frame[out] = values
    for frame in (anova, divergence.tests, divergence.per_cell):
        if "p_adj" in frame.columns:
            frame["significant"] = frame["p_adj"] < alpha


def _frames_table(table: pd.DataFrame, frames: Sequence[Frame], response: str) -> pd.DataFrame:
    rows = []
    for frame in frames:
        data = table[frame.mask]
        used = usable(data, response)
        rows.append(
            {
                "frame": frame.name,
                "factors": ", ".join(frame.factors),
                "trials": frame.description,
                "n_trials": len(data),
                "n_used": len(used),
                "n_diverged": int((data["status"] == "diverged").sum()),
                "n_failed": int((data["status"] == "failed").sum()),
                "trial_ids": " ".join(used["trial_id"]),
            }
        )
    return pd.DataFrame(rows)


def _cell_means(full: CellTable, reasons: Mapping[str, str]) -> pd.DataFrame:
    summary = full.summarise(np.eye(len(full.cells)))[["estimate", "ci_low", "ci_high"]]
    cells = full.cells.copy()
    cells["n"] = full.n.astype(int)
    cells["note"] = [
        "" if n else f"not estimable: {reasons.get(label, 'no usable trials')}"
        for n, label in zip(cells["n"], full.labels(), strict=True)
    ]
    return pd.concat([cells, summary.rename(columns={"estimate": "mean"})], axis=1)


def _interactions(primary: ResponseAnalysis, frames: Sequence[Frame]) -> pd.DataFrame:
    tables = []
    for frame in frames:
        cell_table = primary.cell_tables.get(frame.name)
        if cell_table is None:
            continue
        pairs = [pair for pair in itertools.combinations(cell_table.factors, 2) if frame.keeps_term(pair)]
        found = two_way_tables(cell_table, pairs)
        if not found.empty:
            tables.append(found.assign(frame=frame.name))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _simple_effects(primary: ResponseAnalysis, design: FactorSpace, method: str) -> pd.DataFrame:
    if primary.anova.empty:
        return pd.DataFrame()
    significant = primary.anova[(primary.anova["order"] > 1) & primary.anova["significant"]]
    tables = []
    for row in significant.itertuples():
        cell_table = primary.cell_tables.get(row.frame)
        if cell_table is not None:
            found = simple_effects(cell_table, row.term.split(":"), design.reference, method)
            tables.append(found.assign(frame=row.frame))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _notes(
    table: pd.DataFrame, response: str, secondary: Sequence[str], primary: ResponseAnalysis
) -> list[str]:
    counts = table["status"].value_counts()
    notes = [
        f"{len(table)} trials: {int(counts.get('finished', 0))} finished, "
        f"{int(counts.get('diverged', 0))} diverged, {int(counts.get('failed', 0))} failed "
        "(failed trials are infrastructure errors and are left out of every analysis)"
    ]
    n_seeds = table["seed"].nunique()
    if n_seeds < 2:
        notes.append(
            "one seed: no seed-based tests or intervals; tests and intervals use the highest-order "
            "interaction as error (valid only if it is absent); add seeds"
        )
    elif n_seeds < FEW_SEEDS:
        notes.append(
            f"only {n_seeds} seeds: each term's error (its seed interaction) has {n_seeds - 1} "
            f"degree{'s' if n_seeds > 2 else ''} of freedom per contrast, so intervals are wide and small "
            "effects go undetected; add seeds for power"
        )
    for name in [response, *secondary]:
        missing = int(((table["status"] == "finished") & table[name].isna()).sum())
        if missing:
            notes.append(f"{name}: {missing} finished trial(s) have no value and are left out")
    return notes + primary.notes
