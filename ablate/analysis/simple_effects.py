"""Simple effects behind a significant interaction: each factor's effect within each level combination of
the other factors of the term, from the frame's model (t intervals, and an F test per slice)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ablate.analysis.cells import CellTable
from ablate.analysis.multiplicity import adjust
from ablate.levels import cell_label


def simple_effects(
    table: CellTable, term: Sequence[str], reference: Mapping[str, str], method: str
) -> pd.DataFrame:
    """Rows per (factor, slice, level): difference vs the reference level with CI, and the slice's F test."""
    frames = []
    for factor in term:
        others = [name for name in term if name != factor]
        level_sets = [pd.unique(table.cells[name]) for name in others]
        for combo in itertools.product(*level_sets):
            frames.append(_slice(table, factor, dict(zip(others, combo, strict=True)), reference))
    kept = [frame for frame in frames if not frame.empty]
    if not kept:
        return pd.DataFrame()
    result = pd.concat(kept, ignore_index=True)
    slice_p = result.drop_duplicates(["factor", "within"])[["factor", "within", "p"]]
    slice_p["p_adj"] = adjust(slice_p["p"], method)
    result = result.merge(slice_p[["factor", "within", "p_adj"]], on=["factor", "within"])
    result.insert(0, "term", ":".join(term))
    return result


def _slice(
    table: CellTable, factor: str, within: dict[str, str], reference: Mapping[str, str]
) -> pd.DataFrame:
    levels = list(pd.unique(table.cells[factor]))
    reference_level = reference[factor] if reference[factor] in levels else levels[0]
    try:
        base = table.weights({factor: reference_level, **within})
        others = [level for level in levels if level != reference_level]
        rows = np.array([table.weights({factor: level, **within}) - base for level in others])
    except ValueError:  # the slice does not exist in this design
        return pd.DataFrame()
    if table.empty_cells(rows):
        return pd.DataFrame()
    summary = table.summarise(rows)
    f_value, df_num, df_den, p = table.f_test(rows)
    return pd.DataFrame(
        {
            "factor": factor,
            "within": cell_label(within),
            "level": others,
            "reference": reference_level,
            "difference": summary["estimate"],
            "ci_low": summary["ci_low"],
            "ci_high": summary["ci_high"],
            "p_difference": summary["p"],
            "F": f_value,
            "df_num": df_num,
            "df_den": df_den,
            "p": p,
        }
    )
