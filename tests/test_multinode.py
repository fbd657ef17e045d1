"""A study on a Ray cluster of two nodes on this machine, tracked by an `mlflow server` over HTTP (the
test session's: conftest's `mlflow_server`).

Ray's own multi-node test cluster starts node A (the head) and node B, one CPU each, each with its own
data cache (`ABLATE_CACHE` in the node's environment), so the study's one-CPU trials run on both. The
real CLI runs the study against the cluster and the server. When node B has finished a trial and is
training its next one, the test SIGKILLs that trial's worker and node B's raylet: the trial is retried
on node A. Once the retry has started there, the test SIGKILLs the driver, with trials still to run.
Rerunning the same command resumes: it runs only what has no result, and every (cell, seed) ends with
exactly one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import beside
import pytest
from services import ablate_command, stop

pytestmark = pytest.mark.slow


OWN_SESSION = True  # its tests run in a session of their own, beside the rest (tests/beside.py)


@pytest.mark.skipif(beside.inside("own session"), reason="this is the launcher of the own-session run")
def test_multinode_in_a_session_of_its_own():
    beside.check_own_session(Path(__file__))


STUDY = """\
name: two_nodes
description: metric x 2 seeds on a tiny CPU model, on two Ray nodes
factors:
  metric: {levels: [sdpa, rbf]}
seeds: 2
fixed:
  model: {n_layers: 1, d_model: 32, n_heads: 2, context: 32}
  data: {source: stories, tokenizer: bytes, corpus_docs: 300, val_tokens: 2048}
  optim: {lr: 3.0e-3, warmup_steps: 5}
  train: {tokens: 131072, batch_size: 8, eval_every: 256, log_every: 16, device: cpu, threads: 1}
resources: {cpu: 1}
max_concurrent: 2
retries: 2
tracking: {experiment: two_nodes, system_metrics: false, flush_seconds: 0}
"""
# 4 trials, one per node at a time. A trial trains 512 steps (about 10 s here, two at once) and logs every
# 16: the test sees node B's trial training long before it ends. Node B gets a second trial unless node A
# runs two while node B runs its first (the nodes share this machine's cores, so neither runs that far
# ahead); the retry on node A then leaves a trial without a result for the rerun.
KEYS = sorted((metric, str(seed)) for metric in ("sdpa", "rbf") for seed in range(2))
WAIT_S = 900  # for any one event: generous, for a slow and busy machine


@dataclass
class Node:
    name: str
    node: object  # ray._private.node.Node
    cache: Path
    cluster: object  # the ray.cluster_utils.Cluster it belongs to

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def raylet_pid(self) -> int:
        from ray._private import ray_constants

        return self.node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


@dataclass
class StudyRun:
    url: str
    a: Node
    b: Node
    driver_cache: Path
    killed: object  # the MLflow run of the trial that was training on node B at the kill
    killed_at_ms: int
    retry: object  # that trial's next attempt, started on node A before the driver was killed
    rerun: subprocess.CompletedProcess
    runs_before_rerun: dict[str, str]  # run id -> ablate.status, after the first launch
    logs: str


def _needs() -> None:
    if not sys.platform.startswith("linux") or not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux /proc to find and SIGKILL one node's processes")
    pytest.importorskip("mlflow.server", reason="mlflow server is not installed")
    pytest.importorskip("ray.cluster_utils", reason="Ray's multi-node test cluster is not installed")


def _parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _runs_below(pid: int, ancestor: int) -> bool:
    """`pid` is a descendant of `ancestor` (a trial's worker is a child of its node's raylet)."""
    while pid and pid > 1:
        pid = _parent_pid(pid) or 0
        if pid == ancestor:
            return True
    return False


def trial_runs(client) -> list:
    experiment = client.get_experiment_by_name("two_nodes")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=1000)


def _status(run) -> str:
    return run.data.tags.get("ablate.status", "running")


def _wait_for_second_trial_on(client, node: Node, driver: subprocess.Popen, log: Path):
    """Until `node` has finished a trial and is training another (it has logged a metric); that run."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        on_node = [r for r in trial_runs(client) if r.data.tags.get("ablate.node_id") == node.node_id]
        if any(_status(r) == "finished" for r in on_node):
            training = [r for r in on_node if _status(r) == "running" and r.data.metrics]
            if training:
                return training[0]
        if driver.poll() is not None:
            pytest.fail(
                f"the study ended ({driver.returncode}) before node {node.name} ran a second trial:\n"
                f"{log.read_text()}"
            )
        time.sleep(0.2)
    pytest.fail(f"node {node.name} did not start a second trial within {WAIT_S}s:\n{log.read_text()}")


def _wait_for_retry_on(client, node: Node, killed, driver: subprocess.Popen, log: Path):
    """Until the killed trial's next attempt has started on `node`; that run (in whatever state it is)."""
    trial_id, deadline = killed.data.tags["ablate.trial_id"], time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for run in trial_runs(client):
            tags = run.data.tags
            if tags.get("ablate.trial_id") == trial_id and tags.get("ablate.node_id") == node.node_id:
                return run
        if driver.poll() is not None:
            pytest.fail(f"the study ended ({driver.returncode}) before the retry ran:\n{log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"no retry of {trial_id} on node {node.name} within {WAIT_S}s:\n{log.read_text()}")


def _wait_until_gone(pid: int) -> None:
    """Until process `pid` has exited, so that the store no longer changes under the test."""
    deadline = time.monotonic() + WAIT_S
    while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"the killed driver's trial worker (pid {pid}) still runs after {WAIT_S}s")
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "gone"


def _kill_node_mid_trial(run, node: Node) -> None:
    """SIGKILL the trial's worker (its pid is on the run) and the node's raylet: the node is gone."""
    worker = int(run.data.tags["ablate.pid"])
    assert _runs_below(worker, node.raylet_pid), f"pid {worker} is not a worker of node {node.name}"
    os.kill(worker, signal.SIGKILL)
    os.kill(node.raylet_pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, mlflow_server) -> StudyRun:
    """The study, run once with node B killed mid-trial, then rerun; every process it starts is ended.
    It is tracked by the session's MLflow server, in an experiment of its own."""
    _needs()
    folder = tmp_path_factory.mktemp("two_nodes")
    with contextlib.ExitStack() as cleanup:  # each clean-up runs even if an earlier one fails
        yield _run_study(folder, mlflow_server.url, _two_nodes(folder, cleanup))


def _two_nodes(folder: Path, cleanup: contextlib.ExitStack) -> tuple[Node, Node]:
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    cleanup.callback(cluster.shutdown)
    nodes = []
    for name in ("A", "B"):
        cache = folder / f"cache-{name}"
        # include_dashboard=False: the dashboard only slows a node's start on a small machine
        node = cluster.add_node(num_cpus=1, include_dashboard=False, env_vars={"ABLATE_CACHE": str(cache)})
        nodes.append(Node(name, node, cache, cluster))
    return nodes[0], nodes[1]


def _run_study(folder: Path, url: str, nodes: tuple[Node, Node]) -> StudyRun:
    from mlflow import MlflowClient

    a, b = nodes
    study = folder / "two_nodes.yaml"
    study.write_text(STUDY)
    driver_cache = folder / "cache-driver"
    env = {**os.environ, "ABLATE_CACHE": str(driver_cache), "MLFLOW_TRACKING_URI": ""}
    env.pop("RAY_ADDRESS", None)
    command = [
        *ablate_command(),
        "run",
        str(study),
        "--ray-address",
        a.cluster.address,
        "--tracking-uri",
        url,
    ]
    client, first_log = MlflowClient(url), folder / "first-run.log"
    with first_log.open("w") as out:
        driver = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        killed = _wait_for_second_trial_on(client, b, driver, first_log)
        killed_at_ms = int(time.time() * 1000)
        _kill_node_mid_trial(killed, b)
        b.cluster.remove_node(b.node, allow_graceful=False)  # the rest of node B's processes
        retry = _wait_for_retry_on(client, a, killed, driver, first_log)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its process group, mid-study
        driver.wait(WAIT_S)
        _wait_until_gone(int(retry.data.tags["ablate.pid"]))  # Ray ends the dead driver's trials
    finally:
        stop(driver)
    runs_before = {r.info.run_id: _status(r) for r in trial_runs(client)}
    (folder / "runs-after-first-launch.txt").write_text(_table(trial_runs(client), nodes))
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WAIT_S)
    logs = (
        f"first run ({driver.returncode}):\n{first_log.read_text()}\nrerun:\n{rerun.stdout}\n{rerun.stderr}"
    )
    logs += "\n" + _table(trial_runs(client), nodes)
    assert driver.returncode == -signal.SIGKILL, logs
    return StudyRun(url, a, b, driver_cache, killed, killed_at_ms, retry, rerun, runs_before, logs)


def _table(runs, nodes: tuple[Node, Node]) -> str:
    """One line per trial run: when it started, its trial, node and status."""
    names = {node.node_id: node.name for node in nodes}
    lines = [
        f"{r.info.start_time} {r.data.tags.get('ablate.trial_id')} "
        f"node {names.get(r.data.tags.get('ablate.node_id'), '?')} {_status(r)} {r.info.run_id}"
        for r in sorted(runs, key=lambda r: r.info.start_time)
    ]
    return "trial runs:\n" + "\n".join(lines)


def _finished(runs) -> list:
    return [r for r in runs if _status(r) == "finished"]


def _key(run) -> tuple[str, str]:
    return run.data.params["factor.metric"], run.data.params["seed"]


def test_trials_ran_on_both_nodes(study_run):
    from mlflow import MlflowClient

    runs = trial_runs(MlflowClient(study_run.url))
    finished_on = {r.data.tags["ablate.node_id"] for r in _finished(runs)}
    assert finished_on == {study_run.a.node_id, study_run.b.node_id}, study_run.logs


def test_each_node_prepared_its_own_data_once_and_reused_it(study_run):
    from mlflow import MlflowClient

    runs = [r for r in trial_runs(MlflowClient(study_run.url)) if "derived.data_fingerprint" in r.data.params]
    (fingerprint,) = {r.data.params["derived.data_fingerprint"] for r in runs}
    prepared = study_run.driver_cache / fingerprint / "train.npy"  # by the driver, before any trial
    assert prepared.exists(), list(study_run.driver_cache.iterdir())
    for node in (study_run.a, study_run.b):
        on_node = sorted(
            (r for r in runs if r.data.tags["ablate.node_id"] == node.node_id),
            key=lambda r: r.info.start_time,
        )
        assert len(on_node) >= 2, f"node {node.name} ran {len(on_node)} trial(s)"
        assert {r.data.params["data.cache_dir"] for r in on_node} == {str(node.cache.resolve())}
        entries = [p.name for p in node.cache.iterdir() if (p / "meta.json").exists()]
        assert entries == [fingerprint], f"node {node.name}'s cache holds {entries}"
        data = node.cache / fingerprint / "train.npy"
        digest = hashlib.sha256
        assert digest(data.read_bytes()).digest() == digest(prepared.read_bytes()).digest()
        # built by the node's first trial; every later trial on the node reused it
        built_ms = data.stat().st_mtime * 1000
        assert on_node[0].info.start_time <= built_ms < on_node[1].info.start_time, node.name


def test_a_trial_killed_with_its_node_is_retried_on_the_other_node(study_run):
    from mlflow import MlflowClient

    killed = study_run.killed
    runs = trial_runs(MlflowClient(study_run.url))
    attempt = next(r for r in runs if r.info.run_id == killed.info.run_id)
    # no result was reported ("finished": the kill came too late, lengthen the trials); closed as
    # interrupted by the rerun, since the driver that saw the node die was killed too
    assert _status(attempt) == "interrupted", study_run.logs
    retry = study_run.retry  # Tune's retry, in the first launch, on the node that was left
    assert retry.data.tags["ablate.node_id"] == study_run.a.node_id
    assert retry.info.start_time > study_run.killed_at_ms
    assert retry.info.run_id in study_run.runs_before_rerun
    trial_id = killed.data.tags["ablate.trial_id"]
    (result,) = [r for r in _finished(runs) if r.data.tags["ablate.trial_id"] == trial_id]
    assert result.data.tags["ablate.node_id"] == study_run.a.node_id


def test_rerun_resumes_without_duplicates(study_run):
    from mlflow import MlflowClient

    assert study_run.rerun.returncode == 0, study_run.logs
    before = study_run.runs_before_rerun
    done = sum(status == "finished" for status in before.values())
    assert 0 < done < len(KEYS), study_run.logs  # the driver was killed mid-study, with work left
    assert f"{done} already done, {len(KEYS) - done} to run" in study_run.rerun.stdout, study_run.logs
    runs = trial_runs(MlflowClient(study_run.url))
    finished_before = {run_id for run_id, status in before.items() if status == "finished"}
    assert finished_before <= {r.info.run_id for r in _finished(runs)}  # no result is replaced
    new = [r for r in runs if r.info.run_id not in before]
    assert len(new) == len(KEYS) - done, study_run.logs  # each trial without a result ran once more
    assert sorted(_key(r) for r in _finished(runs)) == KEYS, study_run.logs
    assert not [r for r in runs if r.info.status == "RUNNING"], "a child run was left running"


@pytest.mark.parametrize("study_cache", [False, True])
def test_a_node_keeps_trial_data_in_its_own_cache_unless_the_study_names_one(
    tmp_path, monkeypatch, study_cache
):
    from ablate.design import load_design
    from ablate.launch import StudyStore, trial_payload
    from ablate.trial import _on_this_node

    text = STUDY if not study_cache else STUDY.replace("val_tokens: 2048}", "val_tokens: 2048, cache_dir: c}")
    (tmp_path / "two_nodes.yaml").write_text(text)
    design = load_design(tmp_path / "two_nodes.yaml")
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "driver"))
    payload = trial_payload(design.trials[0], design, StudyStore(None, "http://mlflow", "1", "2"))
    sent = payload["tree"]["data"]["cache_dir"]  # the driver's path, absolute
    assert sent == str(tmp_path / ("c" if study_cache else "driver"))

    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "node"))  # the trial, on a node of its own
    used = _on_this_node(payload)["data"]["cache_dir"]
    assert used == (sent if study_cache else str(tmp_path / "node"))
    monkeypatch.setenv("ABLATE_CACHE", "relative/cache")  # names no place on the node: the driver's path
    assert _on_this_node(payload)["data"]["cache_dir"] == sent
