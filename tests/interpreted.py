"""The interpreted Triton runs, started early and run beside the rest of the session.

Triton reads TRITON_INTERPRET when it is imported, so the kernels' interpreted tests (the `-k interpreted`
ones of a test module) run as a pytest of their own in a subprocess, launched by one test of that module
(`..._under_the_interpreter`). They run single-threaded for about a minute and a half together on a 2-core
machine. conftest.py starts them as soon as collection has found their launchers (not in an xdist worker,
which collects every test), so they run beside the tests before those; each launcher then waits for its own
run, started there if it was not, and checks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LAUNCHER_SUFFIX = "_under_the_interpreter"


@dataclass
class Run:
    process: subprocess.Popen
    output: IO[str]  # its stdout
    errors: IO[str]  # its stderr


_runs: dict[Path, Run] = {}


def start(module: Path) -> None:
    """Start `module`'s interpreted tests in a subprocess, unless they run already."""
    module = Path(module).resolve()
    if module in _runs:
        return
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(module),
        "-k",
        "interpreted",
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # files, not pipes: nobody reads the output until the run has ended, and a full pipe would stall it;
    # they stay open for result(), and stop_all() closes them
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115
    errors = tempfile.TemporaryFile("w+")  # noqa: SIM115
    process = subprocess.Popen(
        command, env=env, stdout=output, stderr=errors, text=True, cwd=module.parents[1]
    )
    _runs[module] = Run(process, output, errors)


def result(module: Path) -> subprocess.CompletedProcess:
    """`module`'s interpreted run, started here if it was not yet, once it has ended."""
    module = Path(module).resolve()
    start(module)
    run = _runs[module]
    run.process.wait()
    texts = []
    for file in (run.output, run.errors):
        file.seek(0)
        texts.append(file.read())
    return subprocess.CompletedProcess(run.process.args, run.process.returncode, *texts)


def stop_all() -> None:
    """End the runs still going (a session stopped early) and close their files."""
    for run in _runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
        run.output.close()
        run.errors.close()
    _runs.clear()
