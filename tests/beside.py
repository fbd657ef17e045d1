"""Test runs started early and run beside the rest of the session, each in a pytest subprocess of its own.

Two kinds, each found by its launcher tests' name suffix (KINDS):

- **interpreted**: Triton reads TRITON_INTERPRET when it is imported, so the kernels' interpreted tests (the
  `-k interpreted` ones of a test module: named so, or marked by `interpreted_only` below) run in a
  subprocess with it set, launched by one test of that module (`..._under_the_interpreter`). They run
  single-threaded for about a minute and a half together on a 2-core machine.
- **own session**: the end-to-end modules that need the MLflow server and SIGKILL studies mid-run
  (test_multinode.py, test_tracking_server.py) run together in one subprocess (ABLATE_OWN_SESSION=1; its
  launchers `..._in_a_session_of_its_own`, one per module, skip themselves there and conftest.py skips the
  modules' other tests in the main session). They wait on their studies most of the time, so beside the
  rest of the session they take about three of its minutes less on a 2-core machine. Each Ray instance they
  start is their own: `ablate run` starts Ray with address "local", never joining another's.

conftest.py starts the runs as soon as collection has found their launchers (not in an xdist worker, which
collects every test, nor inside such a run), so they run beside the tests before those; each launcher then
waits for its run, started there if it was not, and checks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Kind:
    suffix: str  # of its launchers' names
    env: dict  # added to the subprocess's environment
    select: tuple  # pytest arguments after the modules


KINDS = {
    "interpreted": Kind("_under_the_interpreter", {"TRITON_INTERPRET": "1"}, ("-k", "interpreted")),
    # -rfEps: a summary line per passed, failed or erring test and per skip, so that each module's launcher
    # can tell its own tests' outcome
    "own session": Kind("_in_a_session_of_its_own", {"ABLATE_OWN_SESSION": "1"}, ("-rfEps",)),
}


def interpreted_only(test):
    """Mark a test that runs Triton kernels under the interpreter: skipped in an ordinary session, and
    selected by the interpreted run whatever its name (-k matches the mark `interpreted` too)."""
    skip = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (run by a subprocess test)")
    return pytest.mark.interpreted(skip(test))


def missed_by_the_interpreted_run(items) -> list[str]:
    """The tests that skip without TRITON_INTERPRET (a skipif whose reason names it) but that the
    interpreted run's `-k interpreted` would not select either (neither their names nor marks say
    `interpreted`): tests that would run nowhere."""
    return [
        item.nodeid
        for item in items
        if any(
            "TRITON_INTERPRET" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")
        )
        and not any("interpreted" in keyword.lower() for keyword in item.keywords)
    ]


@dataclass
class Run:
    process: subprocess.Popen
    output: IO[str]  # its stdout
    errors: IO[str]  # its stderr


_runs: dict[Path, Run] = {}  # each module's run (modules of one own-session run share it)


def inside(kind: str | None = None) -> bool:
    """Whether this session is a run of that kind (of any kind where None)."""
    kinds = KINDS.values() if kind is None else [KINDS[kind]]
    return any(all(os.environ.get(name) == value for name, value in spec.env.items()) for spec in kinds)


def kind_of(test_name: str) -> str | None:
    """The kind of run a test launches, by its name; None if it is no launcher."""
    return next((kind for kind, spec in KINDS.items() if test_name.endswith(spec.suffix)), None)


def skip_own_session_tests(items) -> None:
    """Outside the own-session run, skip the tests of the modules that run there (OWN_SESSION = True at
    their top), all but their launchers."""
    if inside("own session"):
        return
    skip = pytest.mark.skip(reason="runs in a session of its own beside this one (tests/beside.py); "
                            "ABLATE_OWN_SESSION=1 runs it here")  # fmt: skip
    for item in items:
        if (
            getattr(getattr(item, "module", None), "OWN_SESSION", False)
            and kind_of(item.name) != "own session"
        ):
            item.add_marker(skip)


def check_own_session(module: Path) -> None:
    """The own-session run that holds `module` ended well (every test there passed or skipped) and some of
    `module`'s own tests passed; where none did (all skipped, e.g. without PostgreSQL's binaries), the
    launcher skips with their skip lines."""
    module = Path(module).resolve()
    run = result(module, "own session")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]
    own = f"{module.parent.name}/{module.name}"
    lines = run.stdout.splitlines()
    if not any(line.startswith(f"PASSED {own}::") for line in lines):
        skips = [line for line in lines if line.startswith("SKIPPED") and own in line]
        assert skips, f"no test of {own} passed or skipped in its run:\n" + run.stdout[-8000:]
        pytest.skip(f"its tests skipped there: {skips}")


def start(modules: list[Path], kind: str) -> None:
    """Start one run of the given kind over `modules`, unless one of them runs already."""
    modules = [Path(module).resolve() for module in modules]
    if any(module in _runs for module in modules):
        return
    spec = KINDS[kind]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *map(str, modules),
        *spec.select,
    ]
    env = {**os.environ, **spec.env}
    # files, not pipes: nobody reads the output until the run has ended, and a full pipe would stall it;
    # they stay open for result(), and stop_all() closes them
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115
    errors = tempfile.TemporaryFile("w+")  # noqa: SIM115
    process = subprocess.Popen(
        command, env=env, stdout=output, stderr=errors, text=True, cwd=modules[0].parents[1]
    )
    for module in modules:
        _runs[module] = Run(process, output, errors)


def result(module: Path, kind: str = "interpreted") -> subprocess.CompletedProcess:
    """`module`'s run of that kind, started here (over it alone) if it was not yet, once it has ended."""
    module = Path(module).resolve()
    start([module], kind)
    run = _runs[module]
    run.process.wait()
    texts = []
    for file in (run.output, run.errors):
        file.seek(0)
        texts.append(file.read())
    return subprocess.CompletedProcess(run.process.args, run.process.returncode, *texts)


def stop_all() -> None:
    """End the runs still going (a session stopped early) and close their files."""
    for run in {id(run): run for run in _runs.values()}.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
        run.output.close()
        run.errors.close()
    _runs.clear()
