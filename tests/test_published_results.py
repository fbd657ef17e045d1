"""The committed answer (studies/results/*/) is what its documented `ablate analyze` command computes.

Each results folder's README gives the command that rebuilds its tables, report.md and results.json from
its trials.csv and curves.csv alone; this runs that command and compares every file byte for byte, so a
change to the statistics that would change a published number fails here until the results are rebuilt.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = sorted(p.parent for p in (ROOT / "studies" / "results").glob("*/README.md"))


def documented_command(readme: Path) -> str:
    """The README's bash block that sets D and calls `ablate analyze`."""
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "ablate analyze" in b]
    return block


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_documented_analyze_reproduces_the_committed_results(folder, tmp_path):
    command = documented_command(folder / "README.md")
    out = re.search(r"--out (\S+)", command).group(1)
    command = command.replace(f"--out {out}", f"--out {tmp_path}")
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    committed = sorted(p.relative_to(folder) for p in folder.glob("tables/*.csv"))
    assert committed, f"{folder} has no tables"
    for name in [*committed, Path("report.md"), Path("results.json")]:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), f"{name} differs"
