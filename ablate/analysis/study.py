"""`analyze`: every attribution analysis of a study's trials table, gathered in a StudyAnalysis."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ablate.analysis.bootstrap import seed_weights
from ablate.analysis.cells import CellTable
from ablate.analysis.comparison import Comparison, parse_comparison
from ablate.analysis.design import Design, build_design
from ablate.analysis.diagnostics import residual_checks
from ablate.analysis.divergence import DivergenceResult, analyze_divergence
from ablate.analysis.effects import two_way_tables
from ablate.analysis.frames import Frame, build_frames
from ablate.analysis.multiplicity import adjust, check_method
from ablate.analysis.response import ResponseAnalysis, analyze_response, usable
from ablate.analysis.result import StudyAnalysis
from ablate.analysis.shapley import ComparisonResult, decompose
from ablate.analysis.simple_effects import simple_effects
from ablate.analysis.table import NOT_APPLICABLE, StudyDataError, prepare_trials
from ablate.analysis.threads import one_blas_thread

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
    n_boot: int = 2000,
    seed: int = 0,
) -> StudyAnalysis:
    """Attribute `response` (lower is better) to `factors` with the methods of DESIGN.md.

    `trials`: one row per trial (trial_id, factor columns, seed, status, responses). `conditions`:
    factor -> {other factor: levels where it applies}; inferred from empty values when None.
    `adjust`: "holm" or "bh" for every family of tests. Raises StudyDataError on bad input.
    """
    with one_blas_thread():
        method = check_method(adjust)
        secondary = [name for name in secondary if name != response]
        table, design, parsed = _prepare(trials, factors, response, secondary, comparisons, conditions)
        return _run(table, design, parsed, response, secondary, method, vocab_size, n_boot, seed)


def _prepare(trials, factors, response, secondary, comparisons, conditions):
    # the validated table (n/a filled in), the design with its reference levels, parsed comparisons
    table = prepare_trials(trials, factors, [response, *secondary])
    design = build_design(table, factors, conditions, reference={})
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


def _run(table, design, parsed, response, secondary, method, vocab_size, n_boot, seed) -> StudyAnalysis:
    frames = build_frames(table, design)
    seeds = np.sort(table["seed"].unique())
    weights = seed_weights(len(seeds), n_boot, np.random.default_rng(seed))
    primary = analyze_response(table, frames, design, response, weights, method, ALPHA)
    full = CellTable(usable(table, response), design.factors, response, design.cells(), seeds)
    return StudyAnalysis(
        response=response,
        factors=list(design.factors),
        design=design,
        adjust=method,
        alpha=ALPHA,
        n_boot=n_boot,
        seed=seed,
        vocab_size=vocab_size,
        trials=table,
        frames=_frames_table(table, frames, response),
        primary=primary,
        cell_means=_cell_means(full, weights),
        interactions=_interactions(primary, frames, weights),
        simple_effects=_simple_effects(primary, design, weights, method),
        comparisons=_comparisons(parsed, design, full, weights, method),
        divergence=_divergence(table, frames, design, response, vocab_size, method, seed),
        secondary={
            name: analyze_response(table, frames, design, name, weights, method, ALPHA) for name in secondary
        },
        diagnostics=residual_checks(primary, frames),
        notes=_notes(table, response, secondary, primary),
    )


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


def _cell_means(full: CellTable, weights: np.ndarray) -> pd.DataFrame:
    summary = full.summarise(np.eye(len(full.cells)), weights)
    cells = full.cells.copy()
    cells["n"] = full.n.astype(int)
    return pd.concat([cells, summary.rename(columns={"estimate": "mean"})], axis=1)


def _interactions(primary: ResponseAnalysis, frames: Sequence[Frame], weights: np.ndarray) -> pd.DataFrame:
    tables = []
    for frame in frames:
        cell_table = primary.cell_tables.get(frame.name)
        if cell_table is None:
            continue
        pairs = [pair for pair in itertools.combinations(cell_table.factors, 2) if frame.keeps_term(pair)]
        found = two_way_tables(cell_table, pairs, weights)
        if not found.empty:
            tables.append(found.assign(frame=frame.name))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _simple_effects(
    primary: ResponseAnalysis, design: Design, weights: np.ndarray, method: str
) -> pd.DataFrame:
    if primary.anova.empty:
        return pd.DataFrame()
    significant = primary.anova[(primary.anova["order"] > 1) & primary.anova["significant"]]
    tables = []
    for row in significant.itertuples():
        cell_table = primary.cell_tables.get(row.frame)
        if cell_table is not None:
            found = simple_effects(cell_table, row.term.split(":"), design.reference, weights, method)
            tables.append(found.assign(frame=row.frame))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _comparisons(
    parsed: Sequence[Comparison], design: Design, full: CellTable, weights: np.ndarray, method: str
) -> list[ComparisonResult]:
    results = [decompose(comparison, design, full, weights) for comparison in parsed]
    tested = [frame for result in results for frame in (result.total, result.shapley) if not frame.empty]
    if tested:
        adjusted = adjust(np.concatenate([frame["p"].to_numpy() for frame in tested]), method)
        start = 0
        for frame in tested:
            frame["p_adj"] = adjusted[start : start + len(frame)]
            start += len(frame)
    return results


def _divergence(table, frames, design, response, vocab_size, method, seed) -> DivergenceResult:
    return analyze_divergence(table, frames, design, response, vocab_size, method, ALPHA, seed)


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
        notes.append("one seed: no confidence intervals and no seed block; add seeds")
    elif n_seeds < FEW_SEEDS:
        notes.append(
            f"only {n_seeds} seeds: the 95% seed-bootstrap intervals cover less than nominal (in simulation "
            "about 77% with 3 seeds, 88% with 4, 93% with 5); add seeds"
        )
    for name in [response, *secondary]:
        missing = int(((table["status"] == "finished") & table[name].isna()).sum())
        if missing:
            notes.append(f"{name}: {missing} finished trial(s) have no value and are left out")
    return notes + primary.notes
