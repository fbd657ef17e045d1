"""The report's sections, in order: verdict, trials used, ANOVA with power, effects, interactions,
comparisons, loss curves, divergence, secondary responses, diagnostics, methods."""

from __future__ import annotations

import re

import pandas as pd

from ablate.analysis.result import StudyAnalysis
from ablate.analysis.shapley import ComparisonResult
from ablate.levels import cell_label
from ablate.report import figures
from ablate.report.document import Image, Section, Table
from ablate.report.verdicts import amount, verdict_sections

METHODS = [
    "Model: the cell x seed table of the response (finished trials; the mean when a cell holds several "
    "trials of one seed). Cell means are seed-adjusted (additive fit cell + seed); every reported "
    "quantity is a linear contrast of them, and its estimate, 95% t interval and p-value come from "
    "this one model.",
    "Error (two or more seeds): split-plot. The contrasts of the cells are split into terms (main "
    "effects and interactions; where conditional factors break the crossing, each term keeps what lower "
    "orders do not explain). Each term's error is its own seed interaction (term x seed), so seeds that "
    "differ in how much a factor helps, and levels with unequal variance, do not inflate the error rate. "
    "A contrast's variance sums over the terms it touches, with Satterthwaite degrees of freedom.",
    "Error (one seed): the highest-order interaction is the error term of every other term and contrast; "
    "this assumes it is absent. With one factor and one seed nothing is tested.",
    "ANOVA: each term's F test is MS_term / MS_term x seed; with complete data the sums of squares are "
    "the classic ones. A cell without usable trials is predicted from the model without the "
    "highest-order interaction, which is then not tested; a missing (cell, seed) value is filled from "
    "the additive fit and costs degrees of freedom in proportion (Yates).",
    "Effect sizes: partial eta^2 = SS / (SS + SS_error); partial omega^2 = (SS - df MS_error) / "
    "(SS + (N - df) MS_error), set to 0 when negative; share = SS / SS_total.",
    "Effects: marginal means are unweighted means of cell means. Each level is given as a deviation "
    "from the grand mean (the sum-to-zero effect) and as a difference from the reference level (the "
    "baseline of the first comparison, else the first level).",
    "Multiplicity: the p-values behind every claim of the verdict (ANOVA terms of the primary "
    "response, comparison totals, Shapley values, order tests, divergence tests per factor and per cell) "
    "are adjusted as one family; simple effects (reported only under a significant interaction) and "
    "secondary responses are adjusted within their own families. Intervals are unadjusted 95%.",
    "Power: the minimum detectable effect solves P(F'(df1, df2, lambda) > F_crit) = 0.80 at alpha = 0.05 "
    "(scipy noncentral F) with lambda = N mean(tau^2) / MS_error; for a main effect with L levels it is "
    "the difference between two levels (others midway), delta = sqrt(2 L lambda MS_error / N); for an "
    "interaction of two-level factors of order m, the difference of differences 2^m sqrt(lambda MS_error / N); "
    "otherwise the root mean square of the interaction effects.",
    "Shapley: players are the changed factors (a conditional factor joins the factor it depends on); "
    "phi_i = sum over S of |S|!(n-|S|-1)!/n! (v(S+i) - v(S)) with v(S) a cell mean; values sum to the "
    "total exactly. Ablation paths change one player at a time in the listed order and in reverse. "
    "'Order matters' is a t test of (changed first - changed last), an interaction contrast.",
    "Divergence: per cell, the rate with a Clopper-Pearson 95% interval and an exact permutation test "
    "of whether it diverges more often than the rest (hypergeometric tail, adjusted over cells by the "
    "min-p method; one member of the verdict's family); per factor, logistic regression with likelihood-ratio tests, or Fisher's "
    "exact test when separation makes the logistic estimates meaningless. Nothing is tested when no run "
    "diverged. Loss verdicts use finished trials only; when runs diverged, an ANOVA with them capped at "
    "ln(vocab_size) is shown for reference and not used for verdicts.",
    "Conditional factors: the crossed frame holds each conditional factor at its reference level; each "
    "conditional factor is tested in a nested frame of the trials where it applies.",
]


def build_sections(analysis: StudyAnalysis, curves: pd.DataFrame | None) -> list[Section]:
    """Every section of the report, figures rendered."""
    sections = [Section("Verdict")]
    sections += [Section(heading, [bullets], level=3) for heading, bullets in verdict_sections(analysis)]
    sections += [_trials_section(analysis), _anova_section(analysis), _effects_section(analysis)]
    sections += _interaction_sections(analysis) + _comparison_sections(analysis)
    if curves is not None and not curves.empty:
        sections.append(_curves_section(analysis, curves))
    sections += [
        _divergence_section(analysis),
        *_secondary_sections(analysis),
        _diagnostics_section(analysis),
    ]
    sections.append(Section("Methods", [list(METHODS)]))
    return sections


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def _interval(frame: pd.DataFrame, value: str, low: str, high: str, *, signed: bool = True) -> list[str]:
    rows = zip(frame[value], frame[low], frame[high], strict=True)
    return [amount(v, lo, hi, signed=signed) for v, lo, hi in rows]


def _trials_section(analysis: StudyAnalysis) -> Section:
    shown = analysis.frames.drop(columns="trial_ids")
    return Section(
        "Trials used by each test",
        [Table(shown), "The trial ids of each frame are listed in tables/frames.csv and results.json."],
    )


def anova_display(anova: pd.DataFrame) -> pd.DataFrame:
    columns = [
        "frame",
        "term",
        "df",
        "df_resid",
        "error",
        "F",
        "p",
        "p_adj",
        "partial_eta2",
        "partial_omega2",
        "share",
        "significant",
    ]
    shown = anova[columns].rename(columns={"df_resid": "df error", "error": "error term"})
    shown["MDE (80% power)"] = [
        "" if row.significant else f"{row.mde:.3g} ({row.mde_measures})" for row in anova.itertuples()
    ]
    return shown


def _anova_section(analysis: StudyAnalysis) -> Section:
    anova = analysis.primary.anova
    if anova.empty:
        return Section("ANOVA", ["No ANOVA could be fitted; see the notes."])
    text = (
        "Each term is tested against its error term (its seed interaction with two or more seeds). p_adj "
        "is adjusted across every claim of the verdict. Terms that are not significant show the smallest "
        "effect the study would detect with 80% power."
    )
    return Section(f"ANOVA of {analysis.response}", [Table(anova_display(anova)), text])


def effects_display(effects: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "frame": effects["frame"],
            "factor": effects["factor"],
            "level": effects["level"],
            "n": effects["n_trials"],
            "mean [95% CI]": _interval(effects, "mean", "mean_ci_low", "mean_ci_high", signed=False),
            "vs grand mean": _interval(effects, "effect", "effect_ci_low", "effect_ci_high"),
            "vs reference": _interval(
                effects, "diff_vs_reference", "diff_vs_reference_ci_low", "diff_vs_reference_ci_high"
            ),
            "reference": effects["reference"],
        }
    )


def _effects_section(analysis: StudyAnalysis) -> Section:
    effects = analysis.primary.effects
    if effects.empty:
        return Section("Main effects", ["No main effects could be estimated."])
    figure = Image(
        "main_effects",
        figures.png_bytes(figures.main_effects_figure(effects, analysis.response)),
        "Marginal means per level with 95% t intervals",
    )
    return Section("Main effects", [figure, Table(effects_display(effects))])


def _interaction_sections(analysis: StudyAnalysis) -> list[Section]:
    if analysis.interactions.empty:
        return []
    blocks: list = [
        "Two-way marginal means with 95% intervals; simple effects follow for significant interactions."
    ]
    for (frame, term), table in analysis.interactions.groupby(["frame", "term"], sort=False):
        labels = table.assign(text=_interval(table, "mean", "ci_low", "ci_high", signed=False))
        pivot = labels.pivot(index="level_a", columns="level_b", values="text").reindex(
            pd.unique(table["level_a"])
        )
        pivot = pivot[list(pd.unique(table["level_b"]))].rename_axis(None, axis=1).reset_index()
        pivot = pivot.rename(
            columns={"level_a": f"{table['factor_a'].iloc[0]} \\ {table['factor_b'].iloc[0]}"}
        )
        caption = f"{term.replace(':', ' x ')} ({frame})"
        png = figures.png_bytes(figures.interaction_figure(table, analysis.response))
        blocks += [Table(pivot, caption), Image(f"interaction_{_slug(frame)}_{_slug(term)}", png, caption)]
    if not analysis.simple_effects.empty:
        blocks += [
            "Simple effects (difference from the reference level within each slice):",
            Table(analysis.simple_effects),
        ]
    return [Section("Interactions", blocks)]


def _comparison_sections(analysis: StudyAnalysis) -> list[Section]:
    return [_comparison_section(analysis, result, index) for index, result in enumerate(analysis.comparisons)]


def _comparison_section(analysis: StudyAnalysis, result: ComparisonResult, index: int) -> Section:
    blocks: list = [
        f"Baseline: {cell_label(result.baseline)}. Target: {cell_label(result.target)}. "
        f"Players: {', '.join(result.players)}."
        + (f" Averaged over: {', '.join(result.averaged_over)}." if result.averaged_over else "")
    ]
    if result.missing_cells:
        blocks.append("Cells without usable trials (not invented): " + "; ".join(result.missing_cells) + ".")
    if not result.total.empty:
        blocks.append(Table(result.total, "Total difference, target - baseline"))
    if not result.shapley.empty:
        png = figures.png_bytes(figures.shapley_waterfall(result, result.baseline_value, analysis.response))
        blocks += [
            Table(_shapley_display(result.shapley), "Exact Shapley values"),
            Image(f"shapley_{index + 1}", png, f"Shapley waterfall: {result.name}"),
        ]
    if not result.paths.empty:
        blocks.append(Table(result.paths, "Ablation paths, one player at a time (forward and reverse order)"))
    return Section(f"Comparison: {result.name}", blocks)


def _shapley_display(shapley: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "player": shapley["player"],
            "Shapley value [95% CI]": _interval(shapley, "estimate", "ci_low", "ci_high"),
            "share of total": [share_text(row) for row in shapley.itertuples()],
            "p_adj": shapley["p_adj"],
            "changed first": _interval(shapley, "alone", "alone_ci_low", "alone_ci_high"),
            "changed last": _interval(shapley, "last", "last_ci_low", "last_ci_high"),
        }
    )


def share_text(row) -> str:
    """A share as a percentage only when the value and the total agree in sign and it is at most 100%."""
    if not (0.0 <= row.share <= 1.0):
        return "against the total" if row.share < 0 else "more than the total"
    return f"{100 * row.share:.0f}%"


def _curves_section(analysis: StudyAnalysis, curves: pd.DataFrame) -> Section:
    png = figures.png_bytes(figures.loss_curves_figure(curves, analysis.trials, analysis.factors))
    return Section(
        "Loss curves",
        [
            Image(
                "loss_curves",
                png,
                "Validation loss per cell (log scale): mean over seeds, 95% t band clipped to the seeds' range",
            )
        ],
    )


def _divergence_section(analysis: StudyAnalysis) -> Section:
    result = analysis.divergence
    png = figures.png_bytes(figures.divergence_heatmap(result.per_cell, analysis.factors))
    blocks: list = [Image("divergence", png, "Divergence rate per cell (diverged/trials)")]
    diverged = result.per_cell[result.per_cell["diverged"] > 0]
    if not diverged.empty:
        blocks.append(
            Table(
                diverged,
                "Cells with diverged runs: rate, exact 95% interval, permutation test against the other cells",
            )
        )
    if not result.tests.empty:
        blocks.append(Table(result.tests, "Does a factor change the divergence rate?"))
    if not result.sensitivity.empty:
        blocks.append(
            Table(
                result.sensitivity,
                "For reference, not used in verdicts: adjusted p of each term with diverged runs excluded "
                "and capped at ln(vocab)",
            )
        )
    return Section("Divergence", blocks)


def _secondary_sections(analysis: StudyAnalysis) -> list[Section]:
    sections = []
    for name, result in analysis.secondary.items():
        blocks: list = (
            [Table(anova_display(result.anova))] if not result.anova.empty else ["No ANOVA could be fitted."]
        )
        if not result.effects.empty:
            png = figures.png_bytes(figures.main_effects_figure(result.effects, name))
            blocks += [
                Image(f"main_effects_{_slug(name)}", png, f"Marginal means of {name}"),
                Table(effects_display(result.effects)),
            ]
        blocks += list(result.notes)
        sections.append(Section(f"Secondary response: {name}", blocks))
    return sections


def _diagnostics_section(analysis: StudyAnalysis) -> Section:
    blocks: list = []
    for frame, fit in analysis.primary.fits.items():
        png = figures.png_bytes(figures.residuals_figure(fit, frame))
        blocks.append(Image(f"residuals_{_slug(frame)}", png, f"Residuals of the ANOVA ({frame})"))
    if not analysis.diagnostics.empty:
        blocks.append(
            Table(analysis.diagnostics, "Residual checks (a small p questions the ANOVA's assumptions)")
        )
    return Section("Residual diagnostics", blocks)
