"""The plain-words first section of the report: per factor, per comparison, divergence and notes.

Sections are (heading, bullets); a bullet that starts with two spaces is a sub-bullet.
"""

from __future__ import annotations

import math

import pandas as pd

from ablate.analysis.result import StudyAnalysis
from ablate.analysis.shapley import ComparisonResult

Section = tuple[str, list[str]]
ADJUST_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg"}


def p_text(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.2g}" if p < 0.01 else f"= {p:.2f}"


def amount(
    value: float, low: float = math.nan, high: float = math.nan, unit: str = "", *, signed: bool = True
) -> str:
    """'-0.0312 nats [-0.0350, -0.0270]' with enough decimals for the interval's width."""
    width = abs(high - low) if math.isfinite(low) and math.isfinite(high) else abs(value)
    decimals = min(6, max(3, 1 - math.floor(math.log10(width))) if width > 0 else 3)
    sign = "+" if signed else ""
    text = f"{value:{sign}.{decimals}f}" + (f" {unit}" if unit else "")
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low:{sign}.{decimals}f}, {high:{sign}.{decimals}f}]"
    return text


def unit_of(response: str) -> str:
    return "nats" if "loss" in response else ""


def verdict_sections(analysis: StudyAnalysis) -> list[Section]:
    """Every section of the plain-words summary, in report order."""
    sections = [("Study", _study_lines(analysis)), ("Factors", _factor_lines(analysis))]
    interactions = _interaction_lines(analysis)
    if interactions:
        sections.append(("Interactions", interactions))
    if analysis.comparisons:
        sections.append(
            ("Comparisons", [line for c in analysis.comparisons for line in _comparison_lines(analysis, c)])
        )
    sections.append(("Divergence", _divergence_lines(analysis)))
    notes = analysis.notes[1:] + analysis.divergence.notes
    if notes:
        sections.append(("Notes", notes))
    return sections


def _study_lines(analysis: StudyAnalysis) -> list[str]:
    types = sorted(set(analysis.primary.anova.get("anova_type", pd.Series(dtype=str))))
    return [
        f"{analysis.response} ({unit_of(analysis.response) or 'response units'}; lower is better) "
        f"over {', '.join(analysis.factors)}.",
        analysis.notes[0] + f"; {analysis.n_seeds} seed{'s' if analysis.n_seeds != 1 else ''}.",
        f"ANOVA Type {'/'.join(types) or 'n/a'}{' with seed as a block' if analysis.n_seeds > 1 else ''}; "
        f"p-values {ADJUST_NAMES[analysis.adjust]}-adjusted "
        "per family; intervals are 95% cluster-bootstrap intervals over seeds.",
    ]


def _factor_lines(analysis: StudyAnalysis) -> list[str]:
    anova, effects = analysis.primary.anova, analysis.primary.effects
    if anova.empty:
        return ["No ANOVA could be fitted (see notes)."]
    lines = []
    for row in anova[anova["order"] == 1].itertuples():
        name = (
            row.term if row.frame == "crossed" else f"{row.term} ({row.frame.removeprefix(row.term).strip()})"
        )
        levels = effects[(effects["factor"] == row.term) & (effects["frame"] == row.frame)]
        contrasts = "; ".join(
            f"{level.level} vs {level.reference} "
            + amount(
                level.diff_vs_reference,
                level.diff_vs_reference_ci_low,
                level.diff_vs_reference_ci_high,
                unit_of(analysis.response),
            )
            for level in levels.itertuples()
            if level.level != level.reference
        )
        lines.append(f"{name}: {_term_verdict(row, analysis)}. {contrasts}.")
    return lines


def _term_verdict(row, analysis: StudyAnalysis) -> str:
    if row.significant:
        return f"matters (adjusted p {p_text(row.p_adj)}, partial ω² = {row.partial_omega2:.2f})"
    return (
        f"no detectable effect (adjusted p {p_text(row.p_adj)}; with 80% power the study detects a "
        f"{row.mde_measures} of {amount(row.mde, signed=False)} {unit_of(analysis.response)})"
    ).replace("  ", " ")


def _interaction_lines(analysis: StudyAnalysis) -> list[str]:
    anova = analysis.primary.anova
    if anova.empty:
        return []
    higher = anova[anova["order"] > 1]
    lines = []
    for row in higher[higher["significant"]].itertuples():
        name = row.term.replace(":", " x ")
        lines.append(
            f"{name} matters (adjusted p {p_text(row.p_adj)}): the effect of one factor depends on the other; see simple effects."
        )
    quiet = higher[~higher["significant"]]
    if not quiet.empty:
        lines.append(
            f"No other interaction is detectable ({len(quiet)} terms, smallest adjusted p {p_text(quiet['p_adj'].min())}; "
            f"MDE up to {amount(quiet['mde'].max(), signed=False)} {unit_of(analysis.response)})."
        )
    return lines


def _comparison_lines(analysis: StudyAnalysis, result: ComparisonResult) -> list[str]:
    unit = unit_of(analysis.response)
    if result.total.empty:
        return [f"{result.name}: not estimable; missing cells: {'; '.join(result.missing_cells)}."]
    total = result.total.iloc[0]
    direction = "lower" if total["estimate"] < 0 else "higher"
    verdict = (
        f"the target's {analysis.response} is {direction}"
        if total["p_adj"] < analysis.alpha
        else "no detectable difference"
    )
    lines = [
        f"{result.name}: {verdict}; difference {amount(total['estimate'], total['ci_low'], total['ci_high'], unit)} "
        f"(adjusted p {p_text(total['p_adj'])})."
    ]
    if result.averaged_over:
        lines.append(f"  averaged over {', '.join(result.averaged_over)} where not fixed by the comparison.")
    if result.shapley.empty:
        lines.append(
            f"  Shapley values not computed: cells without trials: {'; '.join(result.missing_cells)}."
        )
        return lines
    for row in result.shapley.itertuples():
        lines.append("  " + _share_line(row, total, analysis.alpha, unit))
    lines.extend("  " + line for line in _order_lines(result, unit))
    return lines


def _share_line(row, total: pd.Series, alpha: float, unit: str) -> str:
    figures = f"{amount(row.estimate, row.ci_low, row.ci_high, unit)} (adjusted p {p_text(row.p_adj)})"
    if row.p_adj < alpha and total["p_adj"] < alpha and row.share > 0:
        return f"{row.player} explains {100 * row.share:.0f}% of the difference: {figures}: contributes."
    if row.p_adj < alpha:
        return f"{row.player} works against the difference: {figures}: contributes."
    return f"{row.player}'s share is {figures}: no detectable contribution."


def _order_lines(result: ComparisonResult, unit: str) -> list[str]:
    lines = []
    for row in result.shapley.itertuples():
        apart = abs(row.alone - row.last)
        if (
            apart
            > max(abs(row.alone_ci_high - row.alone_ci_low), abs(row.last_ci_high - row.last_ci_low)) / 2
        ):
            lines.append(
                f"order matters for {row.player}: {amount(row.alone, unit=unit)} when changed first, "
                f"{amount(row.last, unit=unit)} when changed last."
            )
    return lines


def _divergence_lines(analysis: StudyAnalysis) -> list[str]:
    result, trials = analysis.divergence, analysis.trials
    outcome = trials[trials["status"] != "failed"]
    diverged = int((outcome["status"] == "diverged").sum())
    lines = [f"{diverged} of {len(outcome)} trials diverged ({100 * diverged / max(1, len(outcome)):.1f}%)."]
    if not result.tests.empty:
        for row in result.tests.itertuples():
            verdict = (
                "changes the divergence rate" if row.significant else "no detectable effect on divergence"
            )
            lines.append(f"{row.factor}: {verdict} ({row.method}, adjusted p {p_text(row.p_adj)}).")
    if not result.sensitivity.empty:
        lines.append(_sensitivity_line(analysis))
    return lines


def _sensitivity_line(analysis: StudyAnalysis) -> str:
    table = analysis.divergence.sensitivity
    treatments = [column.removeprefix("p_adj_") for column in table.columns if column.startswith("p_adj_")]
    if not analysis.divergence.conclusions_differ:
        return f"The factor verdicts are the same under every treatment of diverged runs ({', '.join(treatments)})."
    changed = table[~table["agree"]]
    parts = []
    for row in changed.itertuples():
        verdicts = ", ".join(
            f"{name}: {'significant' if getattr(row, f'p_adj_{name}') < analysis.alpha else 'not'}"
            for name in treatments
            if math.isfinite(getattr(row, f"p_adj_{name}"))
        )
        parts.append(f"{row.term} ({verdicts})")
    return (
        "The verdicts change between the treatments of diverged runs (excluded, capped at ln(vocab)) "
        "and the rank-transformed analysis: " + "; ".join(parts) + "."
    )
