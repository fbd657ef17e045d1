"""Fully crossed subsets of the trials: the one every unconditional test uses, and one per conditional factor.

A conditional factor (e.g. register_init, only when registers > 0) breaks the crossing. The crossed frame
holds each conditional factor at its reference level (or n/a); each conditional factor gets a nested
frame of the trials where it applies, crossed with the other factors there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ablate.analysis.factors import FactorSpace
from ablate.levels import NOT_APPLICABLE

CROSSED = "crossed"


@dataclass(frozen=True)
class Frame:
    """A subset of trials on which `factors` are fully crossed; `focus` is the nested factor, if any."""

    name: str
    factors: tuple[str, ...]
    focus: str | None
    mask: np.ndarray
    description: str

    def keeps_term(self, term_factors: tuple[str, ...]) -> bool:
        """A nested frame reports only the terms that involve its conditional factor."""
        return self.focus is None or self.focus in term_factors


def build_frames(table: pd.DataFrame, design: FactorSpace) -> list[Frame]:
    """The crossed frame first, then one nested frame per conditional factor with two or more levels."""
    frames = [_crossed_frame(table, design)]
    for focus in design.conditions:
        if len(design.levels[focus]) > 1:
            frames.append(_nested_frame(table, design, focus))
    return frames


def _held_at_reference(
    table: pd.DataFrame, design: FactorSpace, skip: str | None
) -> tuple[np.ndarray, list[str]]:
    mask = np.ones(len(table), dtype=bool)
    words = []
    for name in design.conditions:
        if name == skip:
            continue
        mask &= table[name].isin([NOT_APPLICABLE, design.reference[name]]).to_numpy()
        words.append(f"{name} is {design.reference[name]} or n/a")
    return mask, words


def _varying(table: pd.DataFrame, mask: np.ndarray, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name in names if table.loc[mask, name].nunique() > 1)


def _crossed_frame(table: pd.DataFrame, design: FactorSpace) -> Frame:
    mask, words = _held_at_reference(table, design, skip=None)
    description = "trials where " + " and ".join(words) if words else "all trials"
    return Frame(CROSSED, _varying(table, mask, design.unconditional), None, mask, description)


def _nested_frame(table: pd.DataFrame, design: FactorSpace, focus: str) -> Frame:
    mask, words = _held_at_reference(table, design, skip=focus)
    mask &= (table[focus] != NOT_APPLICABLE).to_numpy()
    condition = design.describe_condition(focus)
    description = "trials where " + " and ".join([condition, *words])
    factors = (*_varying(table, mask, design.unconditional), focus)
    return Frame(f"{focus} within {condition}", factors, focus, mask, description)
