"""The attribution report: self-contained HTML, Markdown, one CSV per table and one JSON file.

`analyze_main` is the body of `ablate analyze`; `write_report` serves `ablate report` too.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.text import Text

from ablate.analysis import StudyAnalysis, StudyDataError, analyze, load_trials
from ablate.analysis.curve_sections import training_sections
from ablate.analysis.document import Figure as FigureBlock
from ablate.analysis.document import Section, to_html, to_markdown
from ablate.analysis.sections import build_sections
from ablate.analysis.table import load_curves
from ablate.analysis.verdicts import verdict_sections


def summary_text(analysis: StudyAnalysis) -> str:
    """The plain-words first section: per factor, per comparison, divergence, notes."""
    lines = []
    for heading, bullets in verdict_sections(analysis):
        lines.append(heading)
        lines.extend(
            ("    - " + item.strip()) if item.startswith("  ") else f"  - {item}" for item in bullets
        )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    analysis: StudyAnalysis,
    out_dir: Path,
    *,
    curves: pd.DataFrame | None = None,
    title: str,
    targets: Sequence[float] = (),
) -> dict[str, Path]:
    """Write report.html, report.md, figures/*.png, tables/*.csv and results.json; return them by name.

    With `curves`, effects over training (and tokens to each of `targets`) come before Methods."""
    out_dir = Path(out_dir)
    for folder in ("figures", "tables"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    sections = build_sections(analysis, curves)
    over_training, training_tables = training_sections(analysis, curves, targets)
    sections[-1:-1] = over_training  # the last section is Methods
    written = _write_figures(sections, out_dir)
    for name, table in (analysis.tables() | training_tables).items():
        if not table.empty:
            path = out_dir / "tables" / f"{name}.csv"
            table.to_csv(path, index=False)
            written[f"tables/{name}.csv"] = path
    document = analysis.to_dict() | {"title": title, "summary": summary_text(analysis)}
    texts = {
        "report.html": to_html(title, sections),
        "report.md": to_markdown(title, sections, "figures"),
        "results.json": json.dumps(document, indent=1, allow_nan=False),
    }
    for name, text in texts.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        written[name] = out_dir / name
    return written


def _write_figures(sections: list[Section], out_dir: Path) -> dict[str, Path]:
    written = {}
    for section in sections:
        for block in section.blocks:
            if isinstance(block, FigureBlock):
                path = out_dir / "figures" / f"{block.name}.png"
                path.write_bytes(block.png)
                written[f"figures/{block.name}.png"] = path
    return written


def analyze_main(
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
        analysis = analyze(
            trials,
            list(factors),
            response,
            comparisons=list(compare),
            secondary=list(secondary),
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
