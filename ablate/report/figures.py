"""Report figures with seaborn: main effects, interactions, loss curves, Shapley waterfalls, residuals,
divergence. Each function returns a matplotlib Figure; `png_bytes` renders and closes it."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.figure import Figure
from scipy import stats

from ablate.analysis.anova import AnovaFit
from ablate.analysis.shapley import ComparisonResult

sns.set_theme(style="whitegrid", context="notebook")
GAIN, LOSS = sns.color_palette("deep")[2], sns.color_palette("deep")[3]


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _interval_bars(ax, x: Sequence[float], mean, low, high, **style) -> None:
    mean, low, high = (np.asarray(values, dtype=float) for values in (mean, low, high))
    errors = np.vstack([mean - low, high - mean])
    ax.errorbar(x, mean, yerr=np.where(np.isfinite(errors), errors, 0.0), capsize=3, **style)


def _joined(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    text = [frame[column].astype(str) for column in columns]
    return text[0].str.cat(text[1:], sep=", ") if len(text) > 1 else text[0]


def main_effects_figure(effects: pd.DataFrame, response: str) -> Figure:
    """Marginal mean of each level with its 95% t interval, one panel per factor."""
    data = effects.assign(panel=[_panel(row) for row in effects.itertuples()])
    grid = sns.FacetGrid(data, col="panel", col_wrap=min(4, data["panel"].nunique()), sharex=False, height=3)

    def draw(data: pd.DataFrame, **_: object) -> None:
        ax = plt.gca()
        _interval_bars(
            ax, range(len(data)), data["mean"], data["mean_ci_low"], data["mean_ci_high"], fmt="o-"
        )
        ax.set_xticks(range(len(data)), data["level"])
        ax.margins(x=0.15)

    grid.map_dataframe(draw)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("", response)
    return grid.figure


def _panel(row) -> str:
    return (
        row.factor
        if row.frame == "crossed"
        else f"{row.factor} ({row.frame.removeprefix(row.factor).strip()})"
    )


def interaction_figure(table: pd.DataFrame, response: str) -> Figure:
    """Two-way marginal means: level_a on x, one line per level_b, 95% intervals."""
    figure, ax = plt.subplots(figsize=(5, 3.5))
    levels_a = list(pd.unique(table["level_a"]))
    palette = sns.color_palette("deep", table["level_b"].nunique())
    for offset, (level_b, rows) in enumerate(table.groupby("level_b", sort=False)):
        x = np.array([levels_a.index(level) for level in rows["level_a"]]) + 0.04 * offset
        _interval_bars(
            ax,
            x,
            rows["mean"],
            rows["ci_low"],
            rows["ci_high"],
            fmt="o-",
            color=palette[offset],
            label=level_b,
        )
    ax.set_xticks(range(len(levels_a)), levels_a)
    ax.set_xlabel(table["factor_a"].iloc[0])
    ax.set_ylabel(response)
    ax.margins(x=0.1)
    ax.legend(title=table["factor_b"].iloc[0], loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return figure


def loss_curves_figure(curves: pd.DataFrame, trials: pd.DataFrame, factors: Sequence[str]) -> Figure:
    """Validation loss vs tokens per cell: mean over seeds with a 95% t band clipped to the seeds' range;
    log y axis over the whole range, so early and late parts of every curve are shown."""
    panels, hue = (
        list(factors[:2]) if len(factors) > 2 else list(factors[:1]),
        list(factors[2:] or factors[1:]),
    )
    legend = ", ".join(hue) if hue else "cell"
    labelled = trials[["trial_id", *panels]].assign(**{legend: _joined(trials, hue) if hue else "all"})
    data = curves.merge(labelled, on="trial_id")
    grid = sns.relplot(
        data=data,
        x="tokens",
        y="val_loss",
        hue=legend,
        col=panels[0],
        row=panels[1] if len(panels) > 1 else None,
        kind="line",
        errorbar=_t_interval,
        height=2.6,
        aspect=1.3,
    )
    finite = data["val_loss"][np.isfinite(data["val_loss"])]
    if len(finite) and finite.min() > 0:
        low, high = finite.min(), finite.max()
        grid.set(yscale="log", ylim=(low / 1.02, high * 1.02))
        for ax in grid.axes.flat:  # plain numbers at evenly spaced losses, not powers of ten
            ax.yaxis.set_major_locator(ticker.MaxNLocator(5))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2f"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    grid.set_axis_labels("tokens", "validation loss")
    return grid.figure


def _t_interval(values: np.ndarray) -> tuple[float, float]:
    # 95% t interval of a mean over seeds, clipped to the seeds' own range (with two seeds the t
    # quantile is 12.7, a band far outside any observed value); no bootstrap per point and cell
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    low, high = values.mean() - half, values.mean() + half
    return float(max(low, values.min())), float(min(high, values.max()))


def shapley_waterfall(result: ComparisonResult, baseline_value: float, response: str) -> Figure:
    """Baseline -> each player's Shapley value (95% interval) -> target."""
    table = result.shapley
    starts = baseline_value + np.concatenate([[0.0], np.cumsum(table["estimate"].to_numpy())[:-1]])
    figure, ax = plt.subplots(figsize=(1.6 + 1.2 * len(table), 3.5))
    colors = [GAIN if value < 0 else LOSS for value in table["estimate"]]
    ax.bar(range(len(table)), table["estimate"], bottom=starts, color=colors, width=0.6)
    ends = starts + table["estimate"].to_numpy()
    _interval_bars(
        ax,
        range(len(table)),
        ends,
        ends + table["ci_low"] - table["estimate"],
        ends + table["ci_high"] - table["estimate"],
        fmt="none",
        color="black",
    )
    ax.axhline(baseline_value, color="grey", linestyle=":", label="baseline")
    ax.axhline(ends[-1], color="black", linestyle="--", label="target")
    reach = np.concatenate(
        [
            [baseline_value],
            ends + table["ci_low"] - table["estimate"],
            ends + table["ci_high"] - table["estimate"],
        ]
    )
    span = np.nanmax(reach) - np.nanmin(reach) or abs(baseline_value) * 0.01 or 1.0
    ax.set_ylim(np.nanmin(reach) - 0.1 * span, np.nanmax(reach) + 0.1 * span)
    ax.set_xticks(range(len(table)), table["player"], rotation=20)
    ax.set_ylabel(response)
    ax.set_title(result.name, fontsize=9)
    ax.legend(fontsize=8)
    return figure


def residuals_figure(fit: AnovaFit, title: str) -> Figure:
    """Residuals vs fitted values, and a normal Q-Q plot of the residuals."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    sns.scatterplot(x=fit.fitted, y=fit.resid, ax=left, s=12)
    left.axhline(0.0, color="grey")
    left.set(xlabel="fitted", ylabel="residual", title=title)
    (theoretical, ordered), (slope, intercept, _) = stats.probplot(fit.resid)
    sns.scatterplot(x=theoretical, y=ordered, ax=right, s=12)
    right.plot(theoretical, slope * theoretical + intercept, color="grey")
    right.set(xlabel="normal quantile", ylabel="residual quantile", title="normal Q-Q")
    figure.tight_layout()
    return figure


def divergence_heatmap(per_cell: pd.DataFrame, factors: Sequence[str]) -> Figure:
    """Divergence rate per cell, annotated diverged/trials."""
    rows, columns = list(factors[: max(1, len(factors) // 2)]), list(factors[max(1, len(factors) // 2) :])
    data = per_cell.assign(
        row=_joined(per_cell, rows),
        column=_joined(per_cell, columns) if columns else "",
        label=per_cell["diverged"].astype(str) + "/" + per_cell["trials"].astype(str),
    )
    order = {"index": pd.unique(data["row"]), "columns": pd.unique(data["column"])}
    rate = data.pivot(index="row", columns="column", values="rate").reindex(**order)
    labels = data.pivot(index="row", columns="column", values="label").reindex(**order).fillna("")
    figure, ax = plt.subplots(figsize=(1.5 + 0.9 * rate.shape[1], 1.2 + 0.45 * rate.shape[0]))
    sns.heatmap(
        rate, annot=labels, fmt="", cmap="Reds", vmin=0.0, vmax=1.0, ax=ax, cbar_kws={"label": "rate"}
    )
    ax.set(xlabel=", ".join(columns), ylabel=", ".join(rows))
    return figure


def training_effects_figure(table: pd.DataFrame, unit: str = "nats") -> Figure:
    """Each factor's effects and each comparison's Shapley split against tokens trained, 95% bands.

    One panel per factor (a line per level against the reference) and per comparison (the total and a
    line per player); `table` is `analysis.curves.effects_over_training`."""
    panels = list(dict.fromkeys(zip(table["kind"].replace({"shapley": "total"}), table["name"], strict=True)))
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, (kind, name) in zip(axes.flat, panels, strict=False):
        kinds = ("effect",) if kind == "effect" else ("total", "shapley")
        part = table[(table["name"] == name) & table["kind"].isin(kinds)]
        for (line_kind, term), curve in part.groupby(["kind", "term"], sort=False):
            label = "total" if line_kind == "total" else term
            style = {"color": "black", "linewidth": 2} if line_kind == "total" else {}
            ax.plot(curve["tokens"], curve["estimate"], label=label, **style)
            ax.fill_between(
                curve["tokens"], curve["ci_low"], curve["ci_high"], alpha=0.2, color=style.get("color")
            )
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"{name} ({'effect' if kind == 'effect' else 'Shapley split'})", fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel(f"difference ({unit})")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure
