"""End to end on CPU with real Ray Tune, real MLflow (SQLite) and the real training loop.

One study of tiny trials runs up to four trials at once: every (cell, seed) has exactly one finished
child run with every declared param and metric and no lost metric; an injected NaN is a diverged result
(never retried); a raising trial is retried and recorded as failed. A second study is killed with
SIGKILL mid-run and run again: nothing finished is rerun and nothing is duplicated.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from ablate import tracking
from ablate.config import RunConfig, from_dict, to_flat_dict
from ablate.design import load_design
from ablate.launch import LaunchOptions
from ablate.logger import RecordingLogger
from ablate.train import train
from studies import RESPONSES, tiny_fixed, trial_runs, write_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def concurrent(every_outcome):
    """12 trials, up to 4 at once (8 normal, 2 NaN, 2 raising), run by the in-process driver once for the
    test session (tests/studies.py): (design, summary, client, trial runs)."""
    return every_outcome.design, every_outcome.summary, every_outcome.client, every_outcome.runs


def by_trial(runs: list) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags["ablate.trial_id"], []).append(run)
    return grouped


def normal_trials(design) -> list:
    return [t for t in design.trials if t.cell.levels.get("fault", "none") == "none"]


def test_summary_counts_every_outcome(concurrent):
    _, summary, client, runs = concurrent
    assert summary.counts == {"finished": 8, "diverged": 2, "failed": 2}
    assert not summary.ok
    exp = client.get_experiment_by_name("concurrent")
    parents = tracking.search(client, exp.experiment_id, "tags.`ablate.kind` = 'parent'")
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")}
    assert {"study/study.yaml", "study/design.csv", "study/spec.json"} <= artifacts
    assert parents[0].data.params["trials"] == "12" and "version.torch" in parents[0].data.params
    assert parents[0].data.tags["mlflow.note.content"] == "every outcome at once"  # the UI's description


def test_closing_table_gives_each_failed_trial_its_error_in_one_line(concurrent):
    from rich.console import Console

    from ablate.launch import print_summary, read_study_store

    design, summary, _, _ = concurrent
    raising = sorted(
        f"{t.cell.label} seed={t.seed}" for t in design.trials if t.cell.levels.get("fault") == "raise"
    )
    error = "RuntimeError: injected failure at step 1 (train.fault=raise@1)"
    assert sorted(summary.failures) == [f"{label}: {error}" for label in raising]
    console = Console(record=True, width=200)
    store, _, _ = read_study_store(design, LaunchOptions())
    print_summary(design, store, summary, console)
    lines = [line for line in console.export_text().splitlines() if line.startswith("failed: ")]
    assert lines == [f"failed: {label}: {error}" for label in raising]


def test_one_finished_child_per_trial_with_every_param_metric_and_tag(concurrent):
    design, _, _, runs = concurrent
    grouped = by_trial(runs)
    for trial in normal_trials(design):
        (run,) = grouped[trial.trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["ablate.status"] == "finished"
        cfg = from_dict(RunConfig, trial.tree)
        params = run.data.params
        for key, value in to_flat_dict(cfg).items():
            if key != "data.cache_dir":  # made absolute for the workers
                assert params[key] == str(value), key
        assert params["seed"] == str(trial.seed)
        assert {k: v for k, v in params.items() if k.startswith("factor.")} == {
            f"factor.{f}": level for f, level in trial.cell.levels.items()
        }
        for response in RESPONSES:
            assert math.isfinite(run.data.metrics[f"final/{response}"]), response
        assert ("final/sink_registers" in run.data.metrics) == (trial.cell.levels["registers"] == "1")
        tags = run.data.tags
        assert (tags["ablate.cell_id"], tags["ablate.config_hash"]) == (trial.cell.cell_id, trial.config_hash)
        assert tags["ablate.device"] == "cpu"
    assert any("system/cpu_percent" in r.data.metrics for r in runs)


def test_study_time_breakdown_reads_every_trials_phases(concurrent):
    from ablate.bench.study import summarize

    design, _, client, runs = concurrent
    done = [r for r in runs if r.data.tags["ablate.status"] in ("finished", "diverged")]
    finished = [r for r in done if r.data.tags["ablate.status"] == "finished"]
    assert all(r.data.metrics["final/time/train_s"] > 0 for r in finished)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    started, ended = parent.info.start_time / 1e3 - 1.0, parent.info.end_time / 1e3 + 1.0
    result = summarize(design.source, started, ended)
    assert result["completed"] == len(done) == 10 and result["slots"] >= 2
    assert result["tokens"] == sum(r.data.metrics["tokens"] for r in done)
    seconds = result["slot_seconds"]
    train_s = sum(r.data.metrics["final/time/train_s"] for r in finished)
    assert seconds["training (steady)"] + seconds["first_window (compilation, warm-up)"] == pytest.approx(
        train_s, abs=0.2
    )
    assert seconds["trial_setup (data load, model, optimiser)"] > 0 and seconds["evaluation"] > 0
    assert 1 <= result["processes"] <= len(done)
    # the steady rate counts only tokens trained after each finished trial's first window (2 steps)
    first_windows = len(finished) * 2 * 8 * 32  # log_every x batch_size x context
    steady = seconds["training (steady)"] / result["slots"]
    expected = (result["tokens"] - first_windows) / steady
    assert result["steady_packed_tokens_per_s"] == pytest.approx(expected)
    # the trials' own token lines, by how many trained at once: at least one did, and not more than ran
    at_once = result["training_at_once"]
    assert at_once and max(at_once) <= result["slots"] and all(v["seconds"] > 0 for v in at_once.values())
    assert all(v["tokens_per_s"] > 0 for k, v in at_once.items() if k > 0)
    # with a baseline per metric, the efficiency charges each finished trial at its metric's alone rate
    rates = {"sdpa": 4000.0, "rbf": 2000.0, "penalty": 1000.0}
    baseline = {
        "alone_tokens_per_s": 2000.0,
        "factors": ["metric"],
        "by_class": {f"metric={m}": {"tokens_per_s": r} for m, r in rates.items()},
    }
    ideal = sum(r.data.metrics["tokens"] / rates[r.data.params["factor.metric"]] for r in done)
    measured = summarize(design.source, started, ended, baseline)
    assert measured["efficiency"] == pytest.approx(ideal / (ended - started))
    # the launch's phases, recorded on the parent run, cover the wait before the first trial
    phases = {k for k in parent.data.metrics if k.startswith("study/time/")}
    names = ("store", "ray_start", "parent", "data", "tune", "ray_shutdown")
    assert phases == {f"study/time/{name}_s" for name in names}
    assert parent.data.metrics["study/time/tune_s"] > 0
    first = min(r.info.start_time for r in done) / 1e3  # the first trial with a result, as summarize counts
    split = result["before_first_trial_s"]
    assert len(split) == 10 and sum(split.values()) == pytest.approx(first - started, abs=0.06)  # rounding
    assert split["between phases"] >= -0.05
    # the store and parent run were written while the study's own Ray started
    assert "store, parent run, beyond what ran beside it" in split and "Ray start" in split
    # the wait in Tune, split by the first trial's worker process (its start/* marks)
    worker = [key for key in split if key.startswith(("Tune to the worker", "worker: "))]
    assert len(worker) == 4 and all(split[key] >= 0 for key in worker)
    assert split["worker: imports of the training code (torch, model, kernels)"] > 0


def test_trials_ran_concurrently(concurrent):
    _, _, _, runs = concurrent
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    open_runs, most = 0, 0
    for _, change in events:
        open_runs += change
        most = max(most, open_runs)
    assert most >= 2  # how many overlap depends on load; test_many_writers_at_once pins down eight or more


def test_no_metric_is_lost_under_concurrent_writes(concurrent):
    design, _, client, runs = concurrent
    grouped = by_trial(runs)
    for trial in [t for t in normal_trials(design) if t.seed == 0]:
        reference = RecordingLogger()
        train(from_dict(RunConfig, trial.tree), reference)
        expected: dict[str, list] = {}
        for step, metrics in reference.history:
            for key, value in metrics.items():
                expected.setdefault(key, []).append((step, value))
        (run,) = grouped[trial.trial_id]
        for key, points in expected.items():
            stored = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert [s for s, _ in stored] == sorted(s for s, _ in points), key
            if key in ("train/loss", "val/loss"):
                for (_, got), (_, want) in zip(stored, sorted(points), strict=True):
                    assert math.isclose(got, want, rel_tol=1e-6), key


def test_nan_is_a_diverged_result_with_its_step_and_never_retried(concurrent):
    design, _, _, runs = concurrent
    grouped = by_trial(runs)
    diverging = [t for t in design.trials if t.cell.levels.get("fault") == "nan"]
    assert len(diverging) == 2
    for trial in diverging:
        (run,) = grouped[trial.trial_id]
        assert run.data.tags["ablate.status"] == "diverged" and run.info.status == "FINISHED"
        assert run.data.tags["ablate.diverged_step"] == "3"
        assert run.data.metrics["final/diverged_step"] == 3


def test_raising_trial_is_retried_then_recorded_as_failed(concurrent):
    design, _, _, runs = concurrent
    grouped = by_trial(runs)
    raising = [t for t in design.trials if t.cell.levels.get("fault") == "raise"]
    for trial in raising:
        attempts = grouped[trial.trial_id]
        assert len(attempts) == 2  # the first try and one retry (retries: 1)
        assert [run.data.tags["ablate.attempt"] for run in attempts] == ["1", "2"]
        assert all(int(run.data.tags["ablate.process_trial"]) >= 1 for run in attempts)
        for run in attempts:
            assert run.data.tags["ablate.status"] == "failed" and run.info.status == "FAILED"
            assert "injected failure at step 1" in run.data.tags["ablate.error"]


def test_results_table_and_curves(concurrent):
    design, _, _, _ = concurrent
    record = tracking.StudyRecord.open(design.tracking_uri(), "concurrent", "concurrent")
    trials, curves = record.tables(["metric", "registers", "fault"], RESPONSES)
    assert len(trials) == 12 and trials["trial_id"].is_unique
    assert trials["status"].value_counts().to_dict() == {"finished": 8, "diverged": 2, "failed": 2}
    applies = (trials["metric"] == "sdpa") & (trials["registers"] == "0")
    assert trials.loc[~applies, "fault"].isna().all() and trials.loc[applies, "fault"].notna().all()
    diverged = trials[trials["status"] == "diverged"]
    assert (diverged["diverged_step"] == 3).all() and diverged["val_loss"].isna().all()
    finished = trials[trials["status"] == "finished"]
    assert finished["val_loss"].between(0, math.log(300) * 2).all() and (finished["vocab_size"] == 300).all()
    one = curves[curves["trial_id"] == finished["trial_id"].iloc[0]]
    assert one["val_loss"].notna().sum() == 5  # steps 10, 20, 30, 40 and the final evaluation at 48
    assert (one["tokens"] == one["step"] * 8 * 32).all()
    assert one["train_loss"].notna().sum() == 24  # one point per log_every=2 of 48 steps


def test_status_command_reads_the_store(concurrent):
    from ablate.cli import app

    design, _, _, _ = concurrent
    result = CliRunner().invoke(app, ["status", str(design.source)])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
             if line.count("│") == 3}  # fmt: skip
    assert (lines["finished"], lines["diverged"], lines["failed"], lines["pending"]) == ("8", "2", "2", "0")
    assert "injected failure at step 1" in result.output


def _finished(uri: str) -> dict[str, str]:
    try:
        runs = trial_runs(MlflowClient(uri), "killed")
    except Exception:  # the store is still being created
        return {}
    return {
        r.data.tags["ablate.trial_id"]: r.info.run_id
        for r in runs
        if r.data.tags["ablate.status"] == "finished"
    }


# The driver, run as `ablate run` does, except that it stops scheduling at the first finished trial: the
# Tune callback that reports it touches a flag file and then blocks the driver's loop. The test kills the
# driver once the flag exists, so the kill lands mid-study however fast or slow the machine is.
PAUSED_DRIVER = """
import pathlib, sys, time
from ablate import cli, launch
flag = pathlib.Path(sys.argv.pop())
report = launch.Progress.result
def result(self, trial, result):
    report(self, trial, result)
    if result.get("status") == "finished":
        flag.touch()
        time.sleep(3600)
launch.Progress.result = result
cli.main()
"""


def test_sigkill_of_the_driver_then_rerun_completes_without_duplicates(tmp_path):
    spec = {
        "name": "killed",
        "factors": {"metric": {"levels": ["sdpa", "rbf", "penalty"]}, "registers": {"levels": [0, 1]}},
        "seeds": 1,
        "fixed": tiny_fixed(tmp_path / "cache", tokens=24576),
        "resources": {"cpu": 1},
        "max_concurrent": 2,  # at most two trials run on when the driver stops scheduling
    }
    path = write_study(tmp_path, spec)
    design = load_design(path)
    uri, command = design.tracking_uri(), [sys.executable, "-m", "ablate.cli", "run", str(path)]
    flag = tmp_path / "first-trial-finished"
    driver = subprocess.Popen(
        [sys.executable, "-c", PAUSED_DRIVER, "run", str(path), str(flag)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while not flag.exists():
            assert driver.poll() is None, "the driver exited before its first trial finished"
            time.sleep(0.2)
    finally:
        driver.kill()  # SIGKILL
        driver.wait()
    time.sleep(3)  # a trial of the killed driver may still be finishing: it counts as done if it does
    before = _finished(uri)
    assert 1 <= len(before) <= 3, "the driver must be killed mid-study"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    skipped = int(re.search(r"(\d+) already done", rerun.stdout).group(1))
    assert len(before) <= skipped < 6
    runs = trial_runs(MlflowClient(uri), "killed")
    grouped = by_trial(runs)
    assert set(grouped) == {t.trial_id for t in design.trials}
    for trial_id, attempts in grouped.items():
        finished = [r for r in attempts if r.data.tags["ablate.status"] == "finished"]
        assert len(finished) == 1, trial_id
        if trial_id in before:  # finished before the rerun: kept, not run again
            assert [r.info.run_id for r in attempts] == [before[trial_id]]
        others = {r.data.tags["ablate.status"] for r in attempts} - {"finished"}
        assert others <= {"interrupted", "duplicate"}  # a run the kill cut short, or one that lost a race


def _write_trial(uri: str, experiment_id: str, parent: str, index: int, steps: int, barrier) -> None:
    client = MlflowClient(uri)
    logger = tracking.TrialLogger.create(
        client, experiment_id, parent, f"writer {index}", {"ablate.trial_id": str(index)}
    )
    logger.flush_seconds = 0  # every call is one write to the store
    barrier.wait()
    logger.log_params({"index": index, "model.metric": "rbf"})
    for step in range(steps):
        logger.log_metrics(
            {"train/loss": index + step / steps, "lr": 1e-3, "grad_norm": 1.0, "tokens": step}, step
        )
    logger.finish("finished", {"val_loss": float(index)}, step=steps)


def test_many_writers_at_once_lose_no_metric(tmp_path):
    """Ten trial loggers released together by a barrier all write to one SQLite store."""
    import multiprocessing

    uri, writers, steps = f"sqlite:///{tmp_path / 'mlflow.db'}", 10, 40
    client = tracking.open_store(uri)
    experiment_id = tracking.ensure_experiment(client, "writers", tmp_path / "artifacts")
    parent = tracking.create_parent(client, experiment_id, "writers", {"trials": writers})
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers)
    processes = [
        context.Process(target=_write_trial, args=(uri, experiment_id, parent, i, steps, barrier))
        for i in range(writers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * writers
    runs = tracking.child_runs(client, experiment_id, parent)
    assert len(runs) == writers
    for run in runs:
        index = int(run.data.tags["ablate.trial_id"])
        assert run.data.tags["ablate.status"] == "finished" and run.data.metrics["final/val_loss"] == index
        for key in ("train/loss", "lr", "grad_norm", "tokens"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(steps)), key
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # all ten were open at once


def test_report_writes_files_and_logs_them_to_the_parent_run(concurrent, every_outcome):
    _, summary, client, _ = concurrent
    out, result = every_outcome.report, every_outcome.report_result  # `ablate report --out`, run once
    assert result.exit_code == 0, result.output
    assert (out / "report.html").exists() and (out / "report.md").exists() and (out / "results.json").exists()
    assert "metric" in result.output  # the plain-words summary names the factors
    logged = {a.path for a in client.list_artifacts(summary.parent_run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/results.json"} <= logged


def test_ui_serves_the_study_store_on_localhost(concurrent, monkeypatch):
    import ablate.cli

    design, _, _, _ = concurrent
    calls = []
    monkeypatch.setattr(ablate.cli.os, "execve", lambda path, command, env: calls.append((command, env)))
    result = CliRunner().invoke(ablate.cli.app, ["ui", str(design.source), "--port", "5123"])
    assert result.exit_code == 0, result.output
    ((command, env),) = calls
    uri = design.tracking_uri()
    assert command[command.index("--backend-store-uri") + 1] == uri and env["MLFLOW_TRACKING_URI"] == uri
    assert (
        command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "5123"
    )
    assert command[command.index("--workers") + 1] == "1"
    assert "http://127.0.0.1:5123" in result.output


def test_ui_refuses_a_busy_port(concurrent):
    import socket

    from ablate.cli import app

    design, _, _, _ = concurrent
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", str(design.source), "--port", str(port)])
    assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in result.stderr


def test_ray_errors_reach_the_terminal_as_one_short_line(monkeypatch, capsys):
    from ray._private import worker

    from ablate.launch import RAY_ERROR_CHARS, _brief_ray_errors

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored afterwards
    _brief_ray_errors()
    _brief_ray_errors()  # once is enough: a second call does not wrap it again
    death = "Raylet is terminated. Termination is unexpected. " + "x" * 900 + "\n" + "[state-dump] ...\n" * 40
    worker.print_to_stdstream({"lines": [death], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    (line,) = capsys.readouterr().out.splitlines()
    assert "Raylet is terminated. Termination is unexpected." in line
    assert len(line) < RAY_ERROR_CHARS + 80 and "/tmp/ray/session_latest/logs" in line


def test_a_local_ray_starts_no_idle_workers_and_a_joined_cluster_keeps_its_settings(monkeypatch):
    """Ray's idle workers for the first driver are off where a study starts its own Ray, in a fresh copy of
    the setting each time (Ray adds the session's spill folder to the dict it is given); a cluster joined
    with --ray-address is passed no system settings, which Ray refuses for a running cluster."""
    import ray

    from ablate import launch

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(launch, "share_compile_caches", lambda: None)  # no Ray here: nothing to point
    monkeypatch.setattr(launch, "_brief_ray_errors", lambda: None)
    assert launch.init_ray(None) and launch.init_ray(None) and launch.init_ray("auto")
    first, second, joined = calls
    assert first["address"] == "local" and first["_system_config"] == {"prestart_worker_first_driver": False}
    first["_system_config"]["object_spilling_config"] = "a session's folder"  # what ray.init does
    assert second["_system_config"] == {"prestart_worker_first_driver": False}
    assert joined["address"] == "auto" and "_system_config" not in joined


def test_worker_processes_are_reused_unless_the_user_says_not_to(monkeypatch):
    """Tune's reuse_actors: on by default, compiled trials included; ABLATE_REUSE_WORKERS=0 turns it off."""
    from ablate.launch import reuse_workers

    monkeypatch.delenv("ABLATE_REUSE_WORKERS", raising=False)
    assert reuse_workers()
    monkeypatch.setenv("ABLATE_REUSE_WORKERS", "1")
    assert reuse_workers()
    monkeypatch.setenv("ABLATE_REUSE_WORKERS", "0")
    assert not reuse_workers()


def test_eager_trials_run_one_after_another_in_a_reused_worker_process(concurrent):
    """Tune hands the next trial to a worker process whose trial has ended (TrialTrainable.reset_config):
    each process numbers its trials 1, 2, ... and runs them one after another. That each trial runs once
    (a class trainable is checkpointed at its end unless told not to be) is checked on the same study by
    test_one_finished_child_per_trial_with_every_param_metric_and_tag and the NaN and retry tests."""
    _, _, _, runs = concurrent
    by_process: dict[str, list] = {}
    for run in runs:
        by_process.setdefault(run.data.tags["ablate.pid"], []).append(run)
    for attempts in by_process.values():
        attempts.sort(key=lambda run: int(run.data.tags["ablate.process_trial"]))
        numbers = [int(run.data.tags["ablate.process_trial"]) for run in attempts]
        assert numbers == list(range(1, len(attempts) + 1))
        assert all(
            done.info.end_time <= after.info.start_time for done, after in itertools.pairwise(attempts)
        )
    # 14 attempts, at most 4 at once, and 4 raising ones whose processes Ray replaces: some process ran more
    assert max(len(attempts) for attempts in by_process.values()) >= 2


def test_a_run_left_open_is_closed_on_the_next_launch_whatever_its_tag_says(tmp_path):
    """A process killed while it closed its run leaves the status tag written and the run RUNNING."""
    client = tracking.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.ensure_experiment(client, "stale", tmp_path / "artifacts")

    def child(tag: str | None, closed: bool):
        tags = {tracking.TAG + "status": tag} if tag else {}
        run = client.create_run(experiment, tags=tags)
        if closed:
            client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    cases = {
        child(None, False): ("interrupted", "KILLED"),  # no tag: running, then gone
        child("running", False): ("interrupted", "KILLED"),
        child("interrupted", False): ("interrupted", "KILLED"),  # killed between tag and close
        child("failed", False): ("failed", "FAILED"),
        child("finished", False): ("finished", "FINISHED"),  # a result stays a result
        child("finished", True): ("finished", "FINISHED"),  # closed already: left alone
    }
    runs = [client.get_run(run_id) for run_id in cases]
    assert tracking.close_stale(client, runs) == 5
    for run_id, (tag, status) in cases.items():
        run = client.get_run(run_id)
        assert (tracking.status_of(run), run.info.status) == (tag, status)
