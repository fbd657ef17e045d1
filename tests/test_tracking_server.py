"""`ablate run` and `ablate report` against a shared tracking server, end to end on loopback.

The set-up a team uses: PostgreSQL holds the MLflow store, `mlflow server --serve-artifacts` stores the
artifacts, and every process (driver, Ray trials, report) talks to the server over HTTP only. The test
session's server (conftest's `mlflow_server`) runs on a throwaway PostgreSQL cluster on free loopback
ports; the test runs a tiny study through the real CLI, kills the driver mid-study, resumes it, and
writes the report. Without PostgreSQL's binaries it is skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import beside
import pytest
from services import Postgres, ablate_command, postgres_missing, stop

pytestmark = pytest.mark.slow


OWN_SESSION = True  # its tests run in a session of their own, beside the rest (tests/beside.py)


@pytest.mark.skipif(beside.inside("own session"), reason="this is the launcher of the own-session run")
def test_tracking_server_in_a_session_of_its_own():
    beside.check_own_session(Path(__file__))


STUDY = """\
name: server_smoke
description: metric x 2 seeds on a tiny CPU model, tracked on an MLflow server
factors:
  metric: {levels: [sdpa, rbf]}
seeds: 2
fixed:
  model: {n_layers: 1, d_model: 32, n_heads: 2, context: 32}
  data: {source: stories, tokenizer: bytes, corpus_docs: 300, val_tokens: 2048}
  optim: {lr: 3.0e-3, warmup_steps: 5}
  train: {tokens: 131072, batch_size: 8, eval_every: 128, log_every: 16, device: cpu, threads: 1}
comparisons:
  - {name: geometry, baseline: {metric: sdpa}, target: {metric: rbf}}
resources: {cpu: 1}
retries: 0
tracking: {experiment: server_smoke, system_metrics: false, flush_seconds: 0}
"""
# A trial takes ~5 s here (512 steps, each 16th logged to the server): usually longer than a Ray worker
# outlives a killed driver (about a second), so the trial training at the kill is mostly cut short (and
# rerun on resume); on a busy machine its worker may finish it first, which the test accepts (the trial is
# then kept, as any finished one).
TRIALS = 4  # 2 levels x 2 seeds


@pytest.fixture(scope="module")
def services(mlflow_server):
    """The session's MLflow server, which runs on PostgreSQL wherever a throwaway cluster can start."""
    if mlflow_server.postgres is None:
        pytest.skip(postgres_missing())
    return mlflow_server


@dataclass
class StudyRun:
    study: Path
    env: dict[str, str]
    # trial id -> run id of the trials finished once the killed tree was gone
    finished_at_kill: dict[str, str]
    training_at_kill: dict[str, str]  # trial id -> run id of the trials seen training just before the kill
    logs: str

    def __str__(self) -> str:
        return f"at the kill: finished {self.finished_at_kill}, training {self.training_at_kill}\n{self.logs}"


def child_runs(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)


def trial_runs(client, status: str) -> dict[str, str]:
    """trial id -> run id of the trial runs with this ablate.status (fails if a trial has two)."""
    experiment = client.get_experiment_by_name("server_smoke")
    if experiment is None:
        return {}
    query = f"tags.`ablate.kind` = 'trial' and tags.`ablate.status` = '{status}'"
    runs = client.search_runs([experiment.experiment_id], query, max_results=1000)
    ids = [r.data.tags["ablate.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), f"a trial has two {status} runs: {sorted(ids)}"
    return {r.data.tags["ablate.trial_id"]: r.info.run_id for r in runs}


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...] (empty if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid` (Ray puts its workers in groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else []
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += [(child, _stat(child)[19]) for child in below if len(_stat(child)) > 19]
        todo += below
    return found


def alive(process: tuple[int, str]) -> bool:
    """The same process (pid and start time: pids are reused) still runs and is not a zombie."""
    fields = _stat(process[0])
    return len(fields) > 19 and fields[19] == process[1] and fields[0] != "Z"


@pytest.fixture(scope="module")
def study_run(services, tmp_path_factory) -> StudyRun:
    """The study on the server: SIGKILLed while its second trial trains, then resumed to the end."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("study")
    study = folder / "server_smoke.yaml"
    study.write_text(STUDY)
    env = {**os.environ, "ABLATE_CACHE": str(folder / "cache"), "MLFLOW_TRACKING_URI": ""}
    command = [*ablate_command(), "run", str(study), "--tracking-uri", services.url, "--max-concurrent", "1"]
    client = MlflowClient(services.url)
    first_log = folder / "first-run.log"
    with first_log.open("w") as out:
        driver = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        training = _wait_until_mid_study(client, driver, first_log)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        # Ray's head processes share the driver's fate; end its stragglers (dashboard and runtime-env
        # agents) now. Trial workers sit in process groups of their own: they must stop by themselves.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        _wait_for_exit(started, timeout=30)
    finally:
        stop(driver)  # the test's own clean-up: nothing of the first run may race the resume
    finished = trial_runs(client, "finished")
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    logs = f"first run:\n{first_log.read_text()}\nresumed run:\n{second.stdout}\n{second.stderr}"
    assert second.returncode == 0, logs
    return StudyRun(study, env, finished, training, logs)


def _wait_until_mid_study(client, driver: subprocess.Popen, log: Path) -> dict[str, str]:
    """Until one trial has finished and the next one is training (it has logged a metric); those."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if trial_runs(client, "finished"):
            running = trial_runs(client, "running")
            training = {t: run_id for t, run_id in running.items() if client.get_run(run_id).data.metrics}
            if training:
                return training
        if driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) before the kill:\n{log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"the study did not reach its second trial within 10 minutes:\n{log.read_text()}")


def _wait_for_exit(processes: list[tuple[int, str]], timeout: float) -> None:
    """Every process of the killed driver's tree ends on its own; a trial outliving it would race the resume."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(map(alive, processes)):
        time.sleep(0.5)
    survivors = [pid for pid, started in processes if alive((pid, started))]
    for pid in survivors:  # ours to end, by id, before failing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes of the killed driver still ran after {timeout:.0f}s: {survivors}"


def test_run_on_server_records_one_finished_child_per_trial_after_a_kill(services, study_run):
    from mlflow import MlflowClient

    client = MlflowClient(services.url)
    experiment = client.get_experiment_by_name("server_smoke")
    parents = client.search_runs([experiment.experiment_id], "tags.`ablate.kind` = 'parent'")
    assert len(parents) == 1, study_run.logs
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info.artifact_uri
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "study")}
    assert "study/server_smoke.yaml" in logged, logged

    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    table = "\n".join(
        f"{r.info.run_name}: {r.data.tags.get('ablate.status')} ({r.info.status}) {r.info.run_id}"
        for r in children
    )
    record = f"child runs:\n{table}\n{study_run}"
    finished = [r for r in children if r.data.tags.get("ablate.status") == "finished"]
    keys = sorted((r.data.params["factor.metric"], r.data.params["seed"]) for r in finished)
    assert keys == [("rbf", "0"), ("rbf", "1"), ("sdpa", "0"), ("sdpa", "1")], record
    assert not [r for r in children if r.info.status == "RUNNING"], f"a child run was left running; {record}"

    # the kill came between the first result and the last; the resume ran only what was not finished
    assert 1 <= len(study_run.finished_at_kill) < TRIALS and study_run.training_at_kill, record
    now = trial_runs(client, "finished")
    for trial_id, run_id in study_run.finished_at_kill.items():
        assert now[trial_id] == run_id, f"trial {trial_id} finished before the resume but was run again"
    # a trial training at the kill is cut short, unless its worker, orphaned by the driver, finished it
    # before it noticed (how long that takes depends on the machine's load): then it is kept
    for trial_id, run_id in study_run.training_at_kill.items():
        if trial_id in study_run.finished_at_kill:
            assert study_run.finished_at_kill[trial_id] == run_id, record
            continue
        assert client.get_run(run_id).data.tags["ablate.status"] == "interrupted", record
        assert now[trial_id] != run_id, f"trial {trial_id} was not run again after the kill"

    for run in finished:
        assert run.data.params["cell_id"] == run.data.tags["ablate.cell_id"]
        assert run.data.params["model.metric"] == run.data.params["factor.metric"]
        assert run.data.metrics["final/val_loss"] > 0
        curve = client.get_metric_history(run.info.run_id, "val/loss")
        assert len(curve) >= 2 and curve[-1].value < curve[0].value, "val/loss should fall while training"
    _check_rows_in_postgres(services.postgres, experiment.experiment_id, 1 + len(children))


def _check_rows_in_postgres(postgres: Postgres, experiment_id: str, expected: int) -> None:
    """The runs are really stored in PostgreSQL (not in a local file store the client fell back to)."""
    import psycopg2

    db = psycopg2.connect(postgres.uri().replace("postgresql+psycopg2", "postgresql"))
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment_id),))
            assert cursor.fetchone()[0] == expected
    finally:
        db.close()


def test_report_on_server_is_logged_to_the_parent_run(services, study_run, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "report"
    command = [*ablate_command(), "report", str(study_run.study), "--tracking-uri", services.url]
    done = subprocess.run([*command, "--out", str(out)], env=study_run.env, capture_output=True, text=True)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"

    client = MlflowClient(services.url)
    experiment = client.get_experiment_by_name("server_smoke")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`ablate.kind` = 'parent'")
    logged = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.html", "report.md"} <= logged, logged
    # served by the server: the bytes went to its artifact store and come back unchanged over HTTP
    fetched = client.download_artifacts(parent.info.run_id, "report/report.html", str(tmp_path / "fetched"))
    assert Path(fetched).read_bytes() == (out / "report.html").read_bytes()
    stored = list(services.artifacts.rglob("report/report.html"))
    assert len(stored) == 1 and parent.info.run_id in str(stored[0]), stored
