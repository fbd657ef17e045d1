"""The report from a plain trials table: the body of `ablate analyze`."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from ablate.analysis import StudyDataError, analyze, load_trials
from ablate.analysis.curves import target_column, with_tokens_to_targets
from ablate.analysis.table import load_curves
from ablate.report.verdicts import verdict_sections
from ablate.report.write import write_report


def from_table(
    table: Path,
    factors: list[str],
    response: str,
    compare: list[str],
    out_dir: Path,
    adjust: str = "holm",
    secondary: Sequence[str] = (),
    *,
    vocab_size: int | None = None,
    curves: Path | None = None,
    title: str | None = None,
    targets: Sequence[float] = (),
) -> int:
    """The `ablate analyze` command: 0 on success, 2 (one line on stderr) on a user mistake."""
    try:
        trials = load_trials(Path(table), factors)
        curve_table = load_curves(Path(curves)) if curves is not None else None
        timed = []  # tokens to each target: a secondary response, as in `ablate report`
        if targets and curve_table is not None:
            trials = with_tokens_to_targets(trials, curve_table, targets)
            timed = [c for c in map(target_column, targets) if c not in secondary]
        analysis = analyze(
            trials,
            list(factors),
            response,
            comparisons=list(compare),
            secondary=[*secondary, *timed],
            adjust=adjust,
            vocab_size=vocab_size,
        )
    except StudyDataError as error:
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    written = write_report(
        analysis,
        Path(out_dir),
        curves=curve_table,
        title=title or f"Attribution of {response}",
        targets=targets,
    )
    console = Console()
    for heading, bullets in verdict_sections(analysis):
        console.print(Text(heading, style="bold"))
        for item in bullets:
            console.print(Text(("    - " if item.startswith("  ") else "  - ") + item.strip()))
    console.print(Text("\nwritten:", style="bold"))
    for name in ("report.html", "report.md", "results.json"):
        console.print(Text(f"  {written[name]}"))
    console.print(
        Text(f"  {Path(out_dir) / 'tables'}/ ({sum(n.startswith('tables/') for n in written)} CSV files)")
    )
    return 0


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
