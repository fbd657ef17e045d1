"""The attribution report: self-contained HTML, Markdown, figures, one CSV per table and one JSON file.

Two entries, one path (analyse, then `write_report`): `from_study` reads a study's MLflow record
(`ablate report`), `from_table` a plain trials table (`ablate analyze`). The statistics are
`ablate.analysis`, which never imports this package.
"""

from ablate.report.from_study import from_study
from ablate.report.from_table import from_table
from ablate.report.write import summary_text, write_report

__all__ = ["from_study", "from_table", "summary_text", "write_report"]
