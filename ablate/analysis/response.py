"""One response across the frames: ANOVA terms (adjusted as one family), main effects with CIs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from ablate.analysis.anova import AnovaFit, fit_anova, term_statistics
from ablate.analysis.cells import CellTable
from ablate.analysis.effects import main_effects
from ablate.analysis.factors import FactorSpace
from ablate.analysis.frames import Frame
from ablate.analysis.multiplicity import adjust


@dataclass
class ResponseAnalysis:
    """ANOVA terms of every frame (with adjusted p, effect sizes, MDE) and main-effect contrasts."""

    response: str
    anova: pd.DataFrame
    effects: pd.DataFrame
    fits: dict[str, AnovaFit] = field(default_factory=dict)
    cell_tables: dict[str, CellTable] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def usable(data: pd.DataFrame, response: str) -> pd.DataFrame:
    """Finished trials with a value of `response`."""
    return data[(data["status"] == "finished") & data[response].notna()]


def frame_anova(frames: Sequence[Frame], frame_data: dict[str, pd.DataFrame], response: str, method: str):
    """Term statistics of every frame in one table, p adjusted across all of them; plus the fits."""
    tables, fits, notes = [], {}, []
    for frame in frames:
        data = frame_data[frame.name]
        try:
            fit = fit_anova(data, frame.factors, response)
        except ValueError as error:
            notes.append(f"{response}, {frame.name}: no ANOVA ({error})")
            continue
        fits[frame.name] = fit
        notes.extend(f"{response}, {frame.name}: {note}" for note in fit.notes)
        statistics = term_statistics(fit)
        keep = [frame.keeps_term(factors) for factors in fit.terms.values()]
        tables.append(statistics[keep].assign(frame=frame.name))
    anova = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if not anova.empty:
        anova["p_adj"] = adjust(anova["p"], method)
        anova = anova[["frame", *[c for c in anova.columns if c != "frame"]]]
    return anova, fits, notes


def analyze_response(
    table: pd.DataFrame,
    frames: Sequence[Frame],
    design: FactorSpace,
    response: str,
    method: str,
    alpha: float,
) -> ResponseAnalysis:
    """ANOVA of every frame and, from the same model, the main effects of each frame's factors."""
    if usable(table, response).empty:
        return ResponseAnalysis(
            response, pd.DataFrame(), pd.DataFrame(), notes=[f"{response}: no usable values"]
        )
    frame_data = {frame.name: usable(table[frame.mask], response) for frame in frames}
    anova, fits, notes = frame_anova(frames, frame_data, response, method)
    if not anova.empty:
        anova["significant"] = anova["p_adj"] < alpha
    effects, cell_tables = [], {}
    for frame in frames:
        fit = fits.get(frame.name)
        if fit is None or fit.cell_table is None:
            continue
        cell_tables[frame.name] = fit.cell_table
        shown = [name for name in fit.cell_table.factors if frame.keeps_term((name,))]
        effects.append(main_effects(fit.cell_table, shown, design.reference).assign(frame=frame.name))
    effects_table = pd.concat(effects, ignore_index=True) if effects else pd.DataFrame()
    return ResponseAnalysis(response, anova, effects_table, fits, cell_tables, notes)
