"""The report's files: self-contained HTML, Markdown, figures, one CSV per table and one JSON file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ablate.analysis import StudyAnalysis
from ablate.report.curve_sections import training_sections
from ablate.report.document import Image, Section, to_html, to_markdown
from ablate.report.sections import build_sections
from ablate.report.verdicts import verdict_sections


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
            if isinstance(block, Image):
                path = out_dir / "figures" / f"{block.name}.png"
                path.write_bytes(block.png)
                written[f"figures/{block.name}.png"] = path
    return written
