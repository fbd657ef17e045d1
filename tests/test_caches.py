"""Where a study's processes keep what they compile: the compile caches and Python's bytecode, for the
workers `ablate run` starts and for the `ablate` command itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ablate.caches import cache_bytecode

REPO = Path(__file__).resolve().parents[1]


def _unset(monkeypatch, name: str) -> None:
    """Unset `name` for this test, and have it unset again afterwards even if the code under test sets it.

    `cache_bytecode` sets the prefix itself, and pytest's delenv of an unset variable records nothing to
    undo: left set, it sent every Ray worker that later tests started to compile torch, Ray and MLflow
    from source into an empty folder (the 12-trial study of tests/test_launch.py took 140 s instead of 50).
    Setting it first makes monkeypatch record its absence."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


def _probe_package(root: Path, with_bytecode: bool) -> Path:
    """A package `probe_pkg` under root, with or without its bytecode beside the source."""
    import importlib.util
    import py_compile

    source = root / "probe_pkg" / "__init__.py"
    source.parent.mkdir(parents=True)
    source.write_text("VALUE = 1\n")
    if with_bytecode:  # where this interpreter looks for it
        py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True)
    return source


def test_workers_keep_bytecode_in_the_compile_cache_where_the_install_keeps_none(tmp_path, monkeypatch):
    _probe_package(tmp_path / "site", with_bytecode=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as a container image may set it
    _unset(monkeypatch, "PYTHONPYCACHEPREFIX")
    cache_bytecode(str(tmp_path / "bytecode"), probe="probe_pkg")
    assert os.environ["PYTHONPYCACHEPREFIX"] == str(tmp_path / "bytecode")
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ

    # a process started with that environment (as Ray's workers are) writes the bytecode there and only there
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", "import probe_pkg"], env=env, check=True)
    written = [p.relative_to(tmp_path / "bytecode") for p in (tmp_path / "bytecode").rglob("*.pyc")]
    tail = ("probe_pkg", f"__init__.{sys.implementation.cache_tag}.pyc")
    assert [p for p in written if p.parts[-2:] == tail], written  # under the source's own path
    assert not (tmp_path / "site" / "probe_pkg" / "__pycache__").exists()


def test_bytecode_settings_are_left_alone_where_the_install_has_bytecode(tmp_path, monkeypatch):
    _probe_package(tmp_path / "site", with_bytecode=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    _unset(monkeypatch, "PYTHONPYCACHEPREFIX")
    assert not cache_bytecode(str(tmp_path / "bytecode"), probe="probe_pkg")
    assert "PYTHONPYCACHEPREFIX" not in os.environ
    assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1"


def test_a_prefix_the_user_set_is_kept_and_written(tmp_path, monkeypatch):
    """PYTHONDONTWRITEBYTECODE (an image's) beside the user's own prefix would leave that folder empty and
    every worker compiling its imports from source: the prefix stays, the ban on writing goes."""
    _probe_package(tmp_path / "site", with_bytecode=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path / "theirs"))
    assert cache_bytecode(str(tmp_path / "bytecode"), probe="probe_pkg")
    assert os.environ["PYTHONPYCACHEPREFIX"] == str(tmp_path / "theirs")
    assert "PYTHONDONTWRITEBYTECODE" not in os.environ
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", "import probe_pkg"], env=env, check=True)
    assert list((tmp_path / "theirs").rglob("*.pyc")) and not (tmp_path / "bytecode").exists()
    assert not cache_bytecode(str(tmp_path / "bytecode"), probe="probe_pkg")  # nothing left to change


@pytest.mark.parametrize("install", ["without bytecode", "with bytecode", "their prefix"])
def test_the_command_starts_again_with_its_bytecode_cached_where_the_install_keeps_none(tmp_path, install):
    """The command's own imports read cached bytecode too: where the install keeps none, it replaces itself
    by the same command line with the prefix set (once); elsewhere it runs on unchanged."""
    _probe_package(tmp_path / "site", with_bytecode=install == "with bytecode")
    script = tmp_path / "command.py"
    script.write_text(
        "import sys\n"
        "from ablate.caches import relaunch_with_cached_bytecode\n"
        "print('started', sys.pycache_prefix, sys.argv[1:], flush=True)\n"
        "relaunch_with_cached_bytecode(probe='probe_pkg')\n"
        "print('running', sys.pycache_prefix, flush=True)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPYCACHEPREFIX"}
    if install == "their prefix":  # the install keeps none; the user named a folder for it
        env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "theirs")
    env |= {
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "ABLATE_COMPILE_CACHE": str(tmp_path / "cc"),
    }
    out = subprocess.run(
        [sys.executable, str(script), "run", "study.yaml"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    prefix = str(tmp_path / "cc" / "bytecode")
    if install == "without bytecode":
        assert out == [
            "started None ['run', 'study.yaml']",
            f"started {prefix} ['run', 'study.yaml']",
            f"running {prefix}",
        ]
    elif install == "their prefix":  # started again once, to write there; the folder stays theirs
        theirs = str(tmp_path / "theirs")
        assert out == [
            f"started {theirs} ['run', 'study.yaml']",
            f"started {theirs} ['run', 'study.yaml']",
            f"running {theirs}",
        ]
    else:
        assert out == ["started None ['run', 'study.yaml']", "running None"]


@pytest.mark.parametrize("asked, expected", [(None, "1"), ("0", "0")])
def test_triton_keeps_its_autotuning_in_the_shared_cache_unless_told_not_to(
    tmp_path, monkeypatch, asked, expected
):
    """A worker reads a kernel's autotuning choice from the cache instead of timing its configs again;
    a user's TRITON_CACHE_AUTOTUNING stands."""
    pytest.importorskip("triton")
    from triton import knobs

    from ablate.caches import share_compile_caches

    monkeypatch.setenv("ABLATE_COMPILE_CACHE", str(tmp_path))
    for name in (
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "TRITON_CACHE_AUTOTUNING",
        "PYTHONPYCACHEPREFIX",
    ):
        _unset(monkeypatch, name)
    if asked is not None:
        monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", asked)
    share_compile_caches()
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == expected
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
    assert knobs.autotuning.cache is (expected == "1")  # what Triton's autotuner reads when it is made
