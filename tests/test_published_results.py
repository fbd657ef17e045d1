"""The committed answer (studies/results/*/) is what its documented `ablate analyze` command computes.

Each results folder's README gives the command that rebuilds its tables, report.md and results.json from
its trials.csv and curves.csv alone; this runs that command and compares every file, text for text and
number for number, so a change to the statistics that would change a published number fails here until
the results are rebuilt. Numbers agree to 1e-9 (relative) or 1e-12 (absolute): numpy and scipy builds
differ in the last bits of a sum, which shows in the 16th digit of a CSV and in statistics that are zero
up to rounding (an omega^2 of 1e-16 against 6e-17).
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = sorted(p.parent for p in (ROOT / "studies" / "results").glob("*/README.md"))


NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def same_text_and_numbers(got: str, committed: str) -> bool:
    """The same text between the numbers, and each number equal to 1e-9 relative or 1e-12 absolute."""
    if NUMBER.split(got) != NUMBER.split(committed):
        return False
    pairs = zip(NUMBER.findall(got), NUMBER.findall(committed), strict=True)
    return all(a == b or math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12) for a, b in pairs)


def test_numbers_compare_to_rounding_and_text_exactly():
    assert same_text_and_numbers("F,1.4259e-16,0.011382000000001", "F,5.8563e-17,0.011382")
    assert not same_text_and_numbers("F,0.01097", "F,0.011814")
    assert not same_text_and_numbers("yes,1.0", "no,1.0")
    assert not same_text_and_numbers("1,2", "1,2,3")


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
        got, committed = (tmp_path / name).read_text(), (folder / name).read_text()
        assert same_text_and_numbers(got, committed), f"{name} differs"
