"""The plain-words first section of the report: per factor, per interaction, per comparison, divergence
and notes.

Sections are (heading, bullets); a bullet that starts with two spaces is a sub-bullet. Every sentence
that claims an effect contains one of CLAIM_WORDS and rests on a p-value adjusted across every claim
the verdict can make (see `study.adjust_claims`); everything else describes without claiming.
`ablate.bench.calibrate` counts claims with `claim_lines`.
"""

from __future__ import annotations

import math

import pandas as pd

from ablate.analysis.result import StudyAnalysis
from ablate.analysis.shapley import ComparisonResult

Bullets = tuple[str, list[str]]  # a heading and its bullets
ADJUST_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
CLAIM_WORDS = (
    " matters",
    "depends on",
    "is lower",
    "is higher",
    "explains",
    "works against",
    "more than the whole difference",
    "lowers the",
    "raises the",
    "order matters",
    "diverges more often",
    "changes the divergence rate",
)


def p_text(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.2g}" if p < 0.1 else f"= {p:.2f}"


def amount(
    value: float, low: float = math.nan, high: float = math.nan, unit: str = "", *, signed: bool = True
) -> str:
    """'-0.0312 nats [-0.0350, -0.0270]' with enough decimals for the interval's width;
    'not estimable' for NaN."""
    if not math.isfinite(value):
        return "not estimable"
    width = abs(high - low) if math.isfinite(low) and math.isfinite(high) else abs(value)
    decimals = min(6, max(3, 1 - math.floor(math.log10(width))) if width > 0 else 3)
    sign = "+" if signed else ""
    text = f"{value:{sign}.{decimals}f}" + (f" {unit}" if unit else "")
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{low:{sign}.{decimals}f}, {high:{sign}.{decimals}f}]"
    return text


def unit_of(response: str) -> str:
    return "nats" if "loss" in response else ""


def claim_lines(sections: list[Bullets]) -> list[str]:
    """The bullets of the verdict that claim an effect (the Study and Notes sections claim nothing)."""
    return [
        line
        for heading, bullets in sections
        if heading not in ("Study", "Notes")
        for line in bullets
        if any(word in line for word in CLAIM_WORDS)
    ]


def verdict_sections(analysis: StudyAnalysis) -> list[Bullets]:
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


def n_claims(analysis: StudyAnalysis) -> int:
    """How many p-values share the one adjustment of the verdict's claims."""
    count = int(analysis.primary.anova.get("p", pd.Series(dtype=float)).notna().sum())
    for result in analysis.comparisons:
        for frame, column in ((result.total, "p"), (result.shapley, "p"), (result.shapley, "order_p")):
            count += int(frame.get(column, pd.Series(dtype=float)).notna().sum())
    count += int(analysis.divergence.tests.get("p", pd.Series(dtype=float)).notna().sum())
    count += int(analysis.divergence.per_cell["p"].notna().any())  # the cells enter as one member
    return count


def _study_lines(analysis: StudyAnalysis) -> list[str]:
    kinds = sorted(set(analysis.primary.anova.get("anova_type", pd.Series(dtype=str))))
    model = (
        "each term tested against its own seed interaction (split-plot), so seeds that differ in how much "
        "a factor helps, and levels with unequal variance, do not inflate the error rate"
        if kinds == ["split-plot"]
        else "one seed: the highest-order interaction is the error term"
        if kinds == ["pooled"]
        else "see the notes"
    )
    return [
        f"{analysis.response} ({unit_of(analysis.response) or 'response units'}; lower is better) "
        f"over {', '.join(analysis.factors)}.",
        analysis.notes[0] + f"; {analysis.n_seeds} seed{'s' if analysis.n_seeds != 1 else ''}.",
        f"Model: seed-adjusted cell means, {model}. Every estimate, its 95% t interval and its p-value "
        f"come from this one model; p-values are {ADJUST_NAMES[analysis.adjust]}-adjusted once across "
        f"all {n_claims(analysis)} claims this verdict can make.",
    ]


def _frame_name(term: str, frame: str) -> str:
    return term if frame == "crossed" else f"{term} ({frame.removeprefix(term).strip()})"


def _factor_lines(analysis: StudyAnalysis) -> list[str]:
    anova, effects = analysis.primary.anova, analysis.primary.effects
    if anova.empty:
        return ["No ANOVA could be fitted (see notes)."]
    unit = unit_of(analysis.response)
    lines = []
    for row in anova[anova["order"] == 1].itertuples():
        levels = effects[(effects["factor"] == row.term) & (effects["frame"] == row.frame)]
        contrasts = "; ".join(
            f"{level.level} vs {level.reference} "
            + amount(
                level.diff_vs_reference, level.diff_vs_reference_ci_low, level.diff_vs_reference_ci_high, unit
            )
            for level in levels.itertuples()
            if level.level != level.reference
        )
        partners = _interacting(anova, row.term, row.frame)
        name = _frame_name(row.term, row.frame)
        if partners:
            lines.append(f"{name}: {_depends_line(analysis, row, partners)}")
            lines.extend("  " + line for line in _simple_effect_lines(analysis, row.term, row.frame))
            lines.append(f"  averaged over the other factors: {_term_verdict(row, analysis)}; {contrasts}.")
        else:
            lines.append(f"{name}: {_term_verdict(row, analysis)}. {contrasts}.")
    return lines


def _interacting(anova: pd.DataFrame, factor: str, frame: str) -> list[pd.Series]:
    rows = anova[(anova["frame"] == frame) & (anova["order"] > 1) & anova["significant"]]
    return [row for _, row in rows.iterrows() if factor in row["term"].split(":")]


def _depends_line(analysis: StudyAnalysis, row, partners: list[pd.Series]) -> str:
    parts = []
    for partner in partners:
        others = [name for name in partner["term"].split(":") if name != row.term]
        parts.append(
            f"{' and '.join(others)} ({partner['term'].replace(':', ' x ')}, adjusted p {p_text(partner['p_adj'])})"
        )
    return "its effect depends on " + "; ".join(parts) + "; its simple effects:"


def _simple_effect_lines(analysis: StudyAnalysis, factor: str, frame: str) -> list[str]:
    table = analysis.simple_effects
    if table.empty:
        return []
    rows = table[(table["factor"] == factor) & (table["frame"] == frame)]
    unit = unit_of(analysis.response)
    lines = []
    for (_term, within), group in rows.groupby(["term", "within"], sort=False):
        effects = "; ".join(
            f"{r.level} vs {r.reference} {amount(r.difference, r.ci_low, r.ci_high, unit)}"
            for r in group.itertuples()
        )
        lines.append(f"within {within}: {effects} (slice p {p_text(group['p'].iloc[0])})")
    return lines


def _term_verdict(row, analysis: StudyAnalysis) -> str:
    if row.significant:
        return f"matters (adjusted p {p_text(row.p_adj)}, partial ω² = {row.partial_omega2:.2f})"
    if not math.isfinite(row.p):
        return "not tested (see notes)"
    if row.p < analysis.alpha:
        return (
            f"not significant once adjusted for every claim (unadjusted p {p_text(row.p)}, adjusted p "
            f"{p_text(row.p_adj)})"
        )
    return (
        (
            f"no detectable effect (adjusted p {p_text(row.p_adj)}; with 80% power the study detects a "
            f"{row.mde_measures} of {amount(row.mde, signed=False)} {unit_of(analysis.response)})"
        )
        .replace("  ", " ")
        .replace(" )", ")")
    )


def _interaction_lines(analysis: StudyAnalysis) -> list[str]:
    anova = analysis.primary.anova
    if anova.empty:
        return []
    higher = anova[anova["order"] > 1]
    lines = []
    for row in higher[higher["significant"]].itertuples():
        name = row.term.replace(":", " x ")
        kind = " It is a crossover: the sign of an effect flips." if _is_crossover(analysis, row) else ""
        lines.append(
            f"{name} matters (adjusted p {p_text(row.p_adj)}): the effect of one factor depends on the "
            f"other; simple effects are under Factors.{kind}"
        )
    quiet = higher[~higher["significant"]]
    if not quiet.empty:
        other = "other " if lines else ""
        lines.append(
            f"No {other}interaction is detectable ({len(quiet)} term{'s' if len(quiet) != 1 else ''}, smallest adjusted p "
            f"{p_text(quiet['p_adj'].min())}; MDE up to {amount(quiet['mde'].max(), signed=False)} "
            f"{unit_of(analysis.response)})."
        )
    return lines


def _is_crossover(analysis: StudyAnalysis, row) -> bool:
    table = analysis.simple_effects
    if table.empty:
        return False
    rows = table[(table["term"] == row.term) & (table["frame"] == row.frame)]
    for _, group in rows.groupby(["factor", "level"]):
        low_sig = (group["ci_high"] < 0).any()
        high_sig = (group["ci_low"] > 0).any()
        if low_sig and high_sig:
            return True
    return False


def _comparison_lines(analysis: StudyAnalysis, result: ComparisonResult) -> list[str]:
    unit = unit_of(analysis.response)
    if result.total.empty or not math.isfinite(result.total["estimate"].iloc[0]):
        return [f"{result.name}: not estimable; missing cells: {'; '.join(result.missing_cells)}."]
    total = result.total.iloc[0]
    significant = total["p_adj"] < analysis.alpha
    excludes_zero = total["ci_low"] > 0 or total["ci_high"] < 0
    verdict = (
        f"the target's {analysis.response} is {'lower' if total['estimate'] < 0 else 'higher'}"
        if significant
        else f"not significant once adjusted for every claim (unadjusted p {p_text(total['p'])})"
        if excludes_zero
        else "no detectable difference"
    )
    lines = [
        f"{result.name}: {verdict}; difference {amount(total['estimate'], total['ci_low'], total['ci_high'], unit)} "
        f"(adjusted p {p_text(total['p_adj'])})."
    ]
    if result.averaged_over:
        lines.append(f"  averaged over {', '.join(result.averaged_over)} where not fixed by the comparison.")
    if result.shapley.empty:
        lines.append(f"  Shapley values not estimable: they need {'; '.join(result.missing_cells)}.")
        return lines
    for row in result.shapley.itertuples():
        lines.append("  " + share_line(row, total, analysis.alpha, unit, analysis.response))
    lines.extend("  " + line for line in _order_lines(result, analysis.alpha, unit))
    return lines


def share_line(row, total: pd.Series, alpha: float, unit: str, response: str = "response") -> str:
    """One player's Shapley value in words: a share only when it and the total agree in sign."""
    figures = f"{amount(row.estimate, row.ci_low, row.ci_high, unit)} (adjusted p {p_text(row.p_adj)})"
    player = f"Shapley value of {row.player}"
    if not row.p_adj < alpha:
        if row.ci_low > 0 or row.ci_high < 0:
            return (
                f"{player}: {amount(row.estimate, row.ci_low, row.ci_high, unit)} (unadjusted p {p_text(row.p)}, "
                f"adjusted p {p_text(row.p_adj)}): not significant once adjusted for every claim."
            )
        return f"{player}: {figures}: no detectable contribution."
    total_significant = total["p_adj"] < alpha
    same_sign = math.copysign(1.0, row.estimate) == math.copysign(1.0, total["estimate"])
    if total_significant and same_sign and row.share <= 1.0:
        return f"{row.player} explains {100 * row.share:.0f}% of the difference: {figures}."
    if total_significant and same_sign:
        return f"{row.player} accounts for more than the whole difference (other players work against it): {figures}."
    if total_significant:
        return f"{row.player} works against the difference: {figures}."
    direction = "lowers the" if row.estimate < 0 else "raises the"
    return f"{row.player} {direction} {response} along this comparison: {figures}."


def _order_lines(result: ComparisonResult, alpha: float, unit: str) -> list[str]:
    if "order_p_adj" not in result.shapley.columns:
        return []
    lines = []
    for row in result.shapley.itertuples():
        if row.order_p_adj < alpha:
            lines.append(
                f"order matters for {row.player}: {amount(row.alone, unit=unit)} when changed first, "
                f"{amount(row.last, unit=unit)} when changed last (difference adjusted p {p_text(row.order_p_adj)})."
            )
    return lines


def _divergence_lines(analysis: StudyAnalysis) -> list[str]:
    result, trials = analysis.divergence, analysis.trials
    outcome = trials[trials["status"] != "failed"]
    diverged = int((outcome["status"] == "diverged").sum())
    lines = [f"{diverged} of {len(outcome)} trials diverged ({100 * diverged / max(1, len(outcome)):.1f}%)."]
    if diverged == 0:
        return lines
    cells = result.per_cell
    rate = diverged / max(1, len(outcome))
    for row in cells[cells["significant"].fillna(False).astype(bool)].itertuples():
        label = ", ".join(
            f"{name}={getattr(row, name)}" for name in analysis.factors if getattr(row, name) != "n/a"
        )
        lines.append(
            f"{label} diverges more often: {row.diverged} of {row.trials} trials "
            f"(95% exact interval {row.rate_ci_low:.2f} to {row.rate_ci_high:.2f}; study-wide rate {rate:.2f}; "
            f"adjusted p {p_text(row.p_adj)})."
        )
    tests = result.tests
    if not tests.empty:
        for row in tests[tests["significant"]].itertuples():
            lines.append(
                f"{row.factor} changes the divergence rate ({row.method}, adjusted p {p_text(row.p_adj)})."
            )
    quiet = [
        p for p in (*tests.get("p_adj", []), *cells["p_adj"]) if math.isfinite(p) and p >= analysis.alpha
    ]
    if len(lines) == 1:
        smallest = f"; smallest adjusted p {p_text(min(quiet))}" if quiet else ""
        lines.append(f"No factor or cell shows a detectable difference in divergence rate{smallest}.")
    lines.append(
        "Loss verdicts use finished trials only; a reanalysis with diverged runs capped at ln(vocab) is "
        "shown under Divergence for reference."
        if not result.sensitivity.empty
        else "Loss verdicts use finished trials only."
    )
    return lines
