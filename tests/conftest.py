"""Shared test set-up: `gpu` tests are skipped where CUDA is absent, the interpreted Triton runs start as
soon as collection ends (tests/beside.py), each gpu test's garbage is collected when it ends, each
module leaves the process's environment and thread count as it found them, and one end-to-end study and
one MLflow server serve the modules that use them."""

import contextlib
import gc
import os
import sys

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    import beside

    beside.skip_own_session_tests(items)
    missed = beside.missed_by_the_interpreted_run(items)
    if missed:
        raise pytest.UsageError(f"mark these with beside.interpreted_only, or they run nowhere: {missed}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the runs beside the session whose launcher tests were collected (tests/beside.py): each
    interpreted module's, and one over every own-session module."""
    import beside

    if beside.inside() or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    modules: dict[str, list] = {}
    for item in session.items:
        kind = beside.kind_of(item.name)
        if kind == "interpreted":
            beside.start([item.path], kind)
        elif kind is not None and item.path not in modules.setdefault(kind, []):
            modules[kind].append(item.path)
    for kind, paths in modules.items():
        beside.start(paths, kind)


def pytest_sessionfinish(session):
    if "beside" in sys.modules:
        sys.modules["beside"].stop_all()


@pytest.fixture(autouse=True)
def _collect_gpu_garbage(request):
    """After a `gpu` test, collect its reference cycles (compiled graphs, CUDA graphs, kernels) there.

    Left to the collector, they are freed whenever a later test allocates enough: once, an xdist worker
    died with a segmentation fault inside Triton's compiler, garbage-collecting, in an unrelated test. If
    freeing some test's objects crashes, it now crashes in that test's teardown, which names it.
    """
    yield
    if "gpu" in request.keywords and torch.cuda.is_available():
        torch.cuda.synchronize()
        gc.collect()


@contextlib.contextmanager
def process_state_kept():
    """The environment variables and torch's CPU thread count, restored as they were on leaving."""
    environment, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environment)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _process_state_restored():
    """Each test module leaves the test process's environment variables and torch's CPU thread count as it
    found them. Both reach what later modules start: the environment every Ray worker and subprocess (a
    bytecode prefix left set once made every later worker compile torch from source, doubling CI), the
    thread count dynamo's guards (a compiled step saved under one count is refused under another)."""
    with process_state_kept():
        yield


@pytest.fixture(scope="session")
def every_outcome(tmp_path_factory):
    """test_launch's study of every outcome, run and reported once for the session (tests/studies.py):
    test_launch checks its record and report, test_ui_browser browses it. Tests only read it. It keeps the
    process's state itself: set up before the module that first asks for it, it is outside that module's
    `_process_state_restored`."""
    from studies import run_every_outcome

    with process_state_kept():
        return run_every_outcome(tmp_path_factory.mktemp("every-outcome"))


@pytest.fixture(scope="session")
def mlflow_server():
    """One `mlflow server` for the modules that track over HTTP, each in an experiment of its own: on a
    throwaway PostgreSQL cluster, as a team runs it, where one can start here; on SQLite otherwise."""
    pytest.importorskip("mlflow.server", reason="mlflow server is not installed")
    from services import tracking_server

    with tracking_server() as server:
        yield server
