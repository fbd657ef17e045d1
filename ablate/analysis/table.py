"""The trials table: loading from CSV/Parquet, validation and normalisation of factor levels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ablate.levels import NOT_APPLICABLE, level_name

STATUSES = ("finished", "diverged", "failed")
REQUIRED_COLUMNS = ("seed", "status")


class StudyDataError(ValueError):
    """A mistake in the user's table or arguments; the message says how to fix it."""


def load_trials(path: Path, factors: Sequence[str] = ()) -> pd.DataFrame:
    """Read a trials table from .csv or .parquet; factor columns are read as text."""
    path = Path(path)
    if not path.exists():
        raise StudyDataError(f"table not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype={name: str for name in factors})
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise StudyDataError(f"cannot read {path}: {error}") from error
    raise StudyDataError(f"unknown table format {suffix!r} for {path}; use .csv or .parquet")


def level_strings(column: pd.Series) -> pd.Series:
    """Factor values as strings; integer-valued numbers lose the '.0'; missing stays NaN."""
    values = column.astype("object")
    missing = values.isna() | values.map(lambda value: isinstance(value, str) and value.strip() == "")

    text = [np.nan if gone else level_name(value) for value, gone in zip(values, missing, strict=True)]
    return pd.Series(text, index=column.index, dtype="object")


def ordered_levels(values: pd.Series) -> tuple[str, ...]:
    """Levels in numeric order when all are numbers, else in order of first appearance."""
    present = [level for level in pd.unique(values.dropna()) if level != NOT_APPLICABLE]
    try:
        return tuple(sorted(present, key=float))
    except ValueError:
        return tuple(present)


def prepare_trials(trials: pd.DataFrame, factors: Sequence[str], responses: Sequence[str]) -> pd.DataFrame:
    """Validate the table and return a normalised copy (levels as text, missing as NaN)."""
    if len(factors) == 0:
        raise StudyDataError("give at least one factor")
    if len(set(factors)) != len(factors):
        raise StudyDataError(f"factors are listed twice: {list(factors)}")
    _check_columns(trials, [*REQUIRED_COLUMNS, *factors, *responses])
    table = trials.copy()
    if "trial_id" not in table.columns:
        table["trial_id"] = [f"row{i}" for i in range(len(table))]
    table["trial_id"] = table["trial_id"].astype(str)
    table["status"] = _checked_status(table["status"])
    table["seed"] = _checked_seed(table["seed"])
    for name in factors:
        table[name] = level_strings(table[name])
        if (table[name] == NOT_APPLICABLE).any():
            raise StudyDataError(f"factor {name!r} uses the reserved level {NOT_APPLICABLE!r}; rename it")
    for name in responses:
        table[name] = _checked_numeric(table[name], name)
    return table.reset_index(drop=True)


def _check_columns(trials: pd.DataFrame, needed: Sequence[str]) -> None:
    missing = [name for name in dict.fromkeys(needed) if name not in trials.columns]
    if missing:
        raise StudyDataError(
            f"column(s) {missing} not in the table; its columns are {list(map(str, trials.columns))}"
        )


def _checked_status(status: pd.Series) -> pd.Series:
    text = status.astype("object").map(lambda value: str(value).strip().lower())
    unknown = sorted(set(text) - set(STATUSES))
    if unknown:
        raise StudyDataError(f"unknown status value(s) {unknown}; valid: {list(STATUSES)}")
    return text


def _checked_seed(seed: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(seed, errors="coerce")
    if numbers.isna().any() or not np.all(np.mod(numbers, 1) == 0):
        raise StudyDataError("column 'seed' must hold integers in every row")
    return numbers.astype("int64")


def _checked_numeric(values: pd.Series, name: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & values.notna()
    if bad.any():
        example = values[bad].iloc[0]
        raise StudyDataError(f"response {name!r} must be numeric; found {example!r}")
    return numbers.astype("float64")


CURVE_COLUMNS = ("trial_id", "step", "tokens", "val_loss")


def load_curves(path: Path) -> pd.DataFrame:
    """Read a long-format curves table (trial_id, step, tokens, val_loss[, train_loss])."""
    curves = load_trials(path)
    _check_columns(curves, CURVE_COLUMNS)
    return curves.assign(trial_id=curves["trial_id"].astype(str))
