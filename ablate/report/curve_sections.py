"""Report sections of `curves`: effects over training, and tokens to a target loss (figures rendered).

`training_sections` is the report's hook: it returns the sections, to go before Methods, and their tables
(written as tables/<name>.csv)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from ablate.analysis import curves
from ablate.analysis.result import StudyAnalysis
from ablate.report import figures
from ablate.report.document import Image, Section, Table

SHAPES = {
    "fades": "clear early, gone by the end",
    "appears": "clear only by the end",
    "persists": "clear early and at the end",
    "flips": "changes sign over training",
    "none": "not clear at any checkpoint",
}
METHOD = (
    "Effects over training: at each evaluation, main effects (level vs reference, unweighted means of "
    "cell means) and each comparison's total and exact Shapley split of the validation loss of the "
    "finished trials, as contrasts of seed-adjusted cell means with 95% t intervals from the same "
    "split-plot model as every other estimate, fitted at each step. Tokens to a target: tokens trained at the first "
    "evaluation whose validation loss is at or below the target; trials that never reach it have no "
    "value and are counted as not reached."
)


def _number(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "tokens":
        return f"{value / 1e6:+.3g}M" if abs(value) >= 1e6 else f"{value:+,.0f}"
    return f"{value:+.4g}"


def _with_interval(row, unit: str) -> str:
    text = (
        f"{_number(row['estimate'], unit)} [{_number(row['ci_low'], unit)}, {_number(row['ci_high'], unit)}]"
    )
    return f"{text} {unit}" if unit else text


def comparison_sides(analysis: StudyAnalysis) -> list[curves.ComparisonSides]:
    """The study's comparisons with their resolved sides and players."""
    return [curves.ComparisonSides(c.name, c.baseline, c.target, c.players) for c in analysis.comparisons]


def _label(kind: str, name: str, term: str) -> str:
    return {"effect": f"{name} {term}", "total": f"{name}: total", "shapley": f"{name}: {term}"}[kind]


def _trend_bullets(table: pd.DataFrame) -> list[str]:
    bullets = []
    for (kind, name, term), curve in table.groupby(["kind", "name", "term"], sort=False):
        rows = curves.trend(curve)
        if not rows:
            continue
        readings = ", ".join(f"{_with_interval(r, 'nats')} at {r['fraction']:.0%}" for r in rows)
        shape = curves.shape_of(rows)
        bullets.append(f"{_label(kind, name, term)}: {shape} ({SHAPES[shape]}): {readings}")
    return bullets


def _checkpoint_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (kind, name, term), curve in table.groupby(["kind", "name", "term"], sort=False):
        for r in curves.trend(curve):
            rows.append({"statistic": _label(kind, name, term), "share of training": f"{r['fraction']:.0%}",
                         "tokens": int(r["tokens"]), "difference (nats)": _with_interval(r, "")})  # fmt: skip
    return pd.DataFrame(rows)


def training_effects_section(table: pd.DataFrame) -> Section:
    png = figures.png_bytes(figures.training_effects_figure(table))
    return Section(
        "Effects over training",
        [
            "Each factor's effect and each comparison's Shapley split of the validation loss at every "
            "evaluation (negative: lower loss), with 95% intervals. These intervals and the words "
            "'clear', 'fades' and 'persists' below are per statistic and per step, not adjusted for the "
            "many statistics read here: the verdicts above are the adjusted ones. Full table: "
            "tables/effects_over_training.csv.",
            _trend_bullets(table),
            Image(
                "effects_over_training",
                png,
                "Effects and Shapley splits of validation loss vs tokens, 95% bands",
            ),
            Table(_checkpoint_table(table), "At 10%, 25%, 50% and 100% of training"),
            f"Method. {METHOD}",
        ],
    )


def _final(table: pd.DataFrame, kind: str, name: str, term: str) -> dict | None:
    curve = table[(table["kind"] == kind) & (table["name"] == name) & (table["term"] == term)]
    rows = curves.trend(curve, points=(1.0,))
    return rows[0] if rows else None


def _speed_verdict(row, final: dict | None) -> str:
    clear = row["ci_low"] > 0 or row["ci_high"] < 0
    faster = "converges faster" if row["estimate"] < 0 else "converges slower"
    speed = faster if clear else "no clear difference in speed"
    if final is None:
        return speed
    lower = "ends lower" if final["estimate"] < 0 else "ends higher"
    end = lower if final["clear"] else "no clear difference at the end"
    return f"{speed}; {end} ({_with_interval(final, 'nats')})"


def target_section(effects: pd.DataFrame, reached: pd.DataFrame, training: pd.DataFrame) -> Section:
    bullets = []
    for target, part in effects.groupby("target", sort=True):
        missing = int(part["not_reached"].iloc[0])
        note = f" ({missing} finished trials never reached it and are left out)" if missing else ""
        bullets.append(f"validation loss {target:g}{note}:")
        for row in part.to_dict("records"):
            final = _final(training, row["kind"], row["name"], row["term"]) if not training.empty else None
            bullets.append(
                f"  {_label(row['kind'], row['name'], row['term'])}: {_with_interval(row, 'tokens')}: "
                f"{_speed_verdict(row, final)}"
            )
    return Section(
        "Tokens to a target loss",
        [
            "Tokens trained until the validation loss first reached each target (negative: sooner), "
            "next to the difference in final loss: converging faster and ending lower are separate verdicts. "
            "Each reads its own 95% interval, not adjusted for the many statistics here.",
            bullets,
            Table(reached, "Trials that reached each target, and their mean tokens to it, per cell"),
        ],
    )


def training_sections(
    analysis: StudyAnalysis, curve_table: pd.DataFrame | None, targets: Sequence[float] = ()
) -> tuple[list[Section], dict[str, pd.DataFrame]]:
    """The sections (effects over training; tokens to each target) and their tables, for a study with
    loss curves; nothing without them."""
    if curve_table is None or curve_table.empty:
        return [], {}
    reference, sides = analysis.factor_space.reference, comparison_sides(analysis)
    training = curves.effects_over_training(analysis.trials, curve_table, analysis.factors, reference, sides)
    sections, tables = [], {"effects_over_training": training}
    if not training.empty:
        sections.append(training_effects_section(training))
    if targets:
        trials = curves.with_tokens_to_targets(analysis.trials, curve_table, targets)
        effects = curves.target_effects(trials, analysis.factors, reference, targets, sides)
        reached = curves.reached_by_cell(trials, analysis.factors, targets)
        tables |= {"tokens_to_target": effects, "tokens_to_target_cells": reached}
        sections.append(target_section(effects, reached, training))
    return sections, tables
