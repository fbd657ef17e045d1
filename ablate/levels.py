"""The one spelling of a factor level and of a cell, for every layer: the study file, its trials, their
MLflow records, the analysis tables and the report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NOT_APPLICABLE = "n/a"  # the level of a conditional factor where its `when` condition fails


def level_name(value: Any) -> str:
    """A level as text: True -> 'true' and None -> 'null' (their YAML spelling), 4.0 -> '4' (a number read
    back from a table is the level it was written as), strings stripped."""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # a numpy scalar
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def cell_label(levels: Mapping[str, str]) -> str:
    """'metric=rbf, position=rope': a cell's levels in factor order (factors that do not apply left out)."""
    return ", ".join(f"{name}={level}" for name, level in levels.items() if level != NOT_APPLICABLE)
