"""MLflow tracking of a study: one parent run per study, one child run per trial attempt.

The parent run holds the study file, the design table, the code version and package versions. Each trial
attempt opens a child run (tag `mlflow.parentRunId`) and logs through `TrialLogger`, which implements
`ablate.logger.MetricLogger`: params (factor levels, seed, resolved config), tags (cell, trial, status,
device), metric curves in batches, system metrics, and a final status: finished, diverged or failed.

The trial's status tag is written in the same batch as its final metrics, so a run counts as done
exactly when its results are complete. Writes are retried with backoff on transient store errors
(a busy SQLite file), so many trials can share one `sqlite:///.../mlflow.db`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import closing
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ablate.responses import TRAIN_LOSS_CURVE, VAL_LOSS_CURVE

T = TypeVar("T")
TAG = "ablate."
FINAL = "final/"  # a response's metric in a trial's run: final/<response name>
START = "start/"  # a worker process's first trial: epoch seconds at which its start reached each step
DESCRIPTION = "mlflow.note.content"  # the tag MLflow shows as a run's description
DONE = ("finished", "diverged")  # results: never rerun
# MLflow's end status of a run by its ablate status; any other status ends FINISHED
END = {"failed": "FAILED", "interrupted": "KILLED", "duplicate": "KILLED"}
MAX_PARAM_CHARS, MAX_TAG_CHARS = 6000, 5000
TRANSIENT = ("database is locked", "database table is locked", "busy", "OperationalError", "disk I/O error")


def retrying(call: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call `call`, retrying transient store errors (a locked SQLite file) with jittered backoff."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if attempt == attempts - 1 or not any(word in str(err) for word in TRANSIENT):
                raise
            time.sleep(min(0.1 * 2**attempt, 5.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def open_store(uri: str) -> MlflowClient:
    """A client for `uri`; a SQLite store is created (and switched to WAL journaling) on first use."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(uri)
        retrying(client.search_experiments, max_results=1)  # creates the tables
        with sqlite3.connect(path, timeout=30) as db:  # WAL: readers never block the writer
            db.execute("PRAGMA journal_mode=WAL")
        return client
    return MlflowClient(uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None = None) -> str:
    """The id of experiment `name`, created (artifacts under `artifact_root`, if local) when missing.

    A SQLite store whose study folder was moved has its recorded artifact locations moved along
    (`relocate_artifacts`), so new artifacts land in the folder the store is in now."""
    if artifact_root is not None:
        relocate_artifacts(client.tracking_uri, name, artifact_root)
    found = retrying(client.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    return retrying(client.create_experiment, name, artifact_location=location)


# (table, column) pairs of a SQLite store that hold absolute artifact URIs
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
)


def relocate_artifacts(uri: str, experiment: str, artifact_root: Path) -> str | None:
    """Point a moved study's SQLite store at the artifacts where they are now; returns the old root.

    MLflow records absolute artifact URIs (file:///old/folder/artifacts/<run>/artifacts). When the study
    folder is moved or copied, `experiment`'s recorded root differs from `artifact_root`: every location
    under the old root, of every run and experiment that shares it, is rewritten to the new root in one
    transaction. Nothing happens (None) for a store that is not local SQLite, a new store, an experiment
    already in place, or a store this process may not write (a read-only copy is read as it is).
    """
    path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if path is None or not path.exists():
        return None
    new = Path(artifact_root).resolve().as_uri()
    with closing(sqlite3.connect(path, timeout=30)) as db:
        found = db.execute(
            "SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)
        ).fetchone()
        if found is None or found[0] == new or not found[0].startswith("file:"):
            return None
        old, tables = (
            found[0],
            {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")},
        )
        try:
            with db:  # one transaction: all locations move, or none
                for table, column in ARTIFACT_COLUMNS:
                    if table in tables:
                        _move_prefix(db, table, column, old, new)
        except sqlite3.OperationalError as err:
            if "readonly" not in str(err):
                raise
            return None
    _forget_artifact_repositories()
    return old


def _forget_artifact_repositories() -> None:
    # MLflow keeps each run's artifact repository, keyed by run id, for the life of the process: one made
    # before the move would go on writing into the old folder.
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", None)
    if cache is not None:
        cache.clear()


def _move_prefix(db: sqlite3.Connection, table: str, column: str, old: str, new: str) -> None:
    db.execute(
        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
        f"WHERE {column} = ? OR (substr({column}, 1, ?) = ? AND substr({column}, ?, 1) = '/')",
        (new, len(old) + 1, old, len(old), old, len(old) + 1),
    )


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def param_text(value: Any) -> str:
    """How a param value is stored: strings as they are, everything else as its Python str."""
    return _text(value if isinstance(value, str) else str(value), MAX_PARAM_CHARS)


def _now_ms() -> int:
    return int(time.time() * 1000)


class TrialLogger:
    """A MetricLogger that writes one MLflow child run; metrics are buffered and sent with log_batch."""

    def __init__(
        self, client: MlflowClient, run_id: str, *, flush_seconds: float = 5.0, max_buffer: int = 500
    ):
        self.client, self.run_id = client, run_id
        self.flush_seconds, self.max_buffer = flush_seconds, max_buffer
        self._params: dict[str, str] = {}
        self._buffer: list[Metric] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._sampler: SystemSampler | None = None

    @classmethod
    def create(
        cls, client: MlflowClient, experiment_id: str, parent_run_id: str, name: str, tags: dict[str, str]
    ) -> TrialLogger:
        """Open a child run of `parent_run_id` with status 'running'."""
        tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, TAG + "kind": "trial", TAG + "status": "running", **tags}
        run = retrying(client.create_run, experiment_id, run_name=name, tags=tags)
        return cls(client, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        fresh = []
        for key, value in params.items():
            text = param_text(value)
            if self._params.get(key, text) != text:  # params are immutable: keep both values visible
                key = f"{key}:2"
            if key not in self._params:
                self._params[key] = text
                fresh.append(Param(key, text))
        for start in range(0, len(fresh), 100):  # the store's limit per batch
            retrying(self.client.log_batch, self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = _now_ms()
        with self._lock:
            self._buffer += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
            due = (
                len(self._buffer) >= self.max_buffer
                or time.monotonic() - self._last_flush > self.flush_seconds
            )
        if due:
            self.flush()

    def flush(self) -> None:
        """Send everything buffered (in chunks the store accepts)."""
        with self._lock:
            pending, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        for start in range(0, len(pending), 1000):
            retrying(self.client.log_batch, self.run_id, metrics=pending[start : start + 1000])

    def start_system_metrics(self, interval: float) -> None:
        """Sample this process's CPU, memory and GPU memory every `interval` seconds into `system/...`."""
        self._sampler = SystemSampler(self.log_metrics, interval)
        self._sampler.start()

    def finish(
        self, status: str, summary: dict[str, float], *, step: int = 0, tags: dict | None = None
    ) -> None:
        """Write the final metrics and the status tag in one batch, then close the run."""
        if self._sampler is not None:
            self._sampler.stop()
        self.flush()
        now = _now_ms()
        metrics = [Metric(FINAL + k, float(v), now, step) for k, v in summary.items() if v is not None]
        batch = [
            RunTag(k, _text(v, MAX_TAG_CHARS)) for k, v in {**(tags or {}), TAG + "status": status}.items()
        ]
        retrying(self.client.log_batch, self.run_id, metrics=metrics, tags=batch)
        retrying(self.client.set_terminated, self.run_id, END.get(status, "FINISHED"))


class SystemSampler(threading.Thread):
    """A daemon thread reporting process CPU %, resident memory and (if in use) CUDA memory."""

    def __init__(self, sink: Callable[[dict[str, float], int], None], interval: float):
        super().__init__(daemon=True, name="ablate-system-metrics")
        self.sink, self.interval = sink, interval
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        step, last_cpu, last_wall = 0, _cpu_seconds(), time.monotonic()
        while not self._stop_event.wait(self.interval):
            cpu, wall = _cpu_seconds(), time.monotonic()
            sample = {"system/cpu_percent": 100.0 * (cpu - last_cpu) / max(wall - last_wall, 1e-9)}
            sample.update(_memory_sample())
            try:
                self.sink(sample, step)
            except Exception:  # monitoring never takes a trial down
                return
            step, last_cpu, last_wall = step + 1, cpu, wall


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _memory_sample() -> dict[str, float]:
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, where /proc is missing
    sample = {"system/rss_gb": rss / 2**30}
    torch = __import__("sys").modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # never initialises CUDA itself
        sample["system/gpu_mem_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
        sample["system/gpu_mem_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
    return sample


def final_metrics(summary: dict[str, float]) -> dict[str, float]:
    """The numbers of a trial summary (already under their response names) as floats; non-finite as NaN."""
    return {
        key: float(value) if math.isfinite(value) else float("nan")
        for key, value in summary.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def search(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    """Every run matching `filter_string` (all pages), oldest first."""
    runs, token = [], None
    while True:
        page = retrying(
            client.search_runs,
            [experiment_id],
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_parent(client: MlflowClient, experiment_id: str, study: str):
    """The newest parent run of `study` in the experiment, or None."""
    found = search(client, experiment_id, f"tags.`{TAG}kind` = 'parent' and tags.`{TAG}study` = '{study}'")
    return found[-1] if found else None


def create_parent(client: MlflowClient, experiment_id: str, study: str, params: dict[str, Any]) -> str:
    """Open a new parent run for `study` and log its params; returns the run id."""
    tags = {TAG + "kind": "parent", TAG + "study": study}
    run = retrying(client.create_run, experiment_id, run_name=study, tags=tags)
    batch = [Param(k, param_text(v)) for k, v in params.items()]
    for start in range(0, len(batch), 100):
        retrying(client.log_batch, run.info.run_id, params=batch[start : start + 100])
    return run.info.run_id


def log_artifacts(client: MlflowClient, run_id: str, files: dict[str, str | Path]) -> None:
    """Log text (str values) or files (Path values) as artifacts at the given relative paths."""
    for name, content in files.items():
        if isinstance(content, Path):
            folder = str(Path(name).parent) if str(Path(name).parent) != "." else None
            retrying(client.log_artifact, run_id, str(content), folder)
        else:
            retrying(client.log_text, run_id, content, name)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    return search(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def tag(run, name: str, default: str | None = None) -> str | None:
    """A run's `ablate.<name>` tag."""
    return run.data.tags.get(TAG + name, default)


def status_of(run) -> str:
    return tag(run, "status", "running")


def done_runs(runs: list) -> dict[str, Any]:
    """trial id -> its finished or diverged run (the first one, should there ever be two)."""
    done: dict[str, Any] = {}
    for run in runs:
        if status_of(run) in DONE:
            done.setdefault(run.data.tags.get(TAG + "trial_id"), run)
    return done


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> list:
    """Every run (attempt) of one trial under the parent, oldest first."""
    return search(
        client,
        experiment_id,
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TAG}trial_id` = '{trial_id}'",
    )


def close_stale(client: MlflowClient, runs: list, status: str = "interrupted", error: str = "") -> int:
    """Close child runs still open whose process is gone (a killed driver or worker); how many.

    Open: tagged 'running', or still RUNNING in MLflow (a process killed while it closed its run has
    written its status tag and not yet closed the run). A run tagged 'running' is tagged `status`:
    'interrupted' (the driver was stopped: not a result, rerun on resume) or 'failed' (the trial's
    process died without reporting; recorded with `error`). Any other run keeps its own status.
    """
    stale = [r for r in runs if status_of(r) == "running" or r.info.status == "RUNNING"]
    for run in stale:
        own = status_of(run)
        if own == "running":
            tags = [RunTag(TAG + "status", status)] + ([RunTag(TAG + "error", error)] if error else [])
            retrying(client.log_batch, run.info.run_id, tags=tags)
            own = status
        retrying(client.set_terminated, run.info.run_id, END.get(own, "FINISHED"))
    return len(stale)


def error_line(run, limit: int = 240) -> str:
    """A failed run's error in one line: the exception at the end of its recorded traceback."""
    return one_line_error(run.data.tags.get(TAG + "error", ""), limit)


def one_line_error(text: str, limit: int = 240) -> str:
    """'ValueError: bad thing' from a traceback (or any error text), on one line of at most `limit`."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if frames:
        rest = lines[frames[-1] + 1 :]
        while rest and rest[0].startswith((" ", "\t")):  # the frame's source line and its markers
            rest = rest[1:]
        lines = rest or lines[-1:]
    text = " ".join(" ".join(lines).split()) or "(no error recorded)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def results_runs(runs: list) -> dict[str, Any]:
    """trial id -> the run that stands for it: its finished/diverged run, else its latest failed attempt."""
    chosen = {}
    for run in runs:  # oldest first, so a later failed attempt replaces an earlier one
        if status_of(run) == "failed":
            chosen[run.data.tags.get(TAG + "trial_id")] = run
    return {**chosen, **done_runs(runs)}


def trial_row(run, factors: list[str], responses: list[str]) -> dict[str, Any]:
    """One row of the trials table from a trial's run."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    row: dict[str, Any] = {"trial_id": tags.get(TAG + "trial_id"), "cell_id": tags.get(TAG + "cell_id")}
    row.update({f: params.get(f"factor.{f}", math.nan) for f in factors})
    row["seed"] = int(params["seed"])
    row["status"] = status_of(run)
    row["diverged_step"] = metrics.get(FINAL + "diverged_step", math.nan)
    row.update({r: metrics.get(FINAL + r, math.nan) for r in responses})
    vocab = params.get("derived.vocab_size")
    row.update(vocab_size=int(vocab) if vocab else math.nan, run_id=run.info.run_id)
    row["error"] = tags.get(TAG + "error", "")
    return row


def curve_rows(client: MlflowClient, run) -> list[dict[str, Any]]:
    """Validation and training loss of one run by optimiser steps completed (and tokens seen).

    The loop logs val/loss at step s before that step's update (s steps done) and train/loss at step s
    after it (s + 1 steps done).
    """
    params, trial_id = run.data.params, run.data.tags.get(TAG + "trial_id")
    tokens_per_step = int(params.get("train.batch_size", 0)) * int(params.get("model.context", 0))
    points: dict[int, dict[str, Any]] = {}
    for key, column, shift in ((VAL_LOSS_CURVE, "val_loss", 0), (TRAIN_LOSS_CURVE, "train_loss", 1)):
        for m in retrying(client.get_metric_history, run.info.run_id, key):
            steps = m.step + shift
            point = points.setdefault(
                steps, {"trial_id": trial_id, "step": steps, "tokens": steps * tokens_per_step}
            )
            point[column] = m.value
    return [points[s] for s in sorted(points)]


class UnreadableStore(ValueError):
    """A tracking URI that MLflow cannot read (not an MLflow database, not an MLflow server, ...)."""


class StudyRecord:
    """The read side of a study's record, beside its writer `TrialLogger`: the experiment, the study's
    newest parent run and its child runs. Every read is retried (a SQLite file is busy under load).

    A store without the experiment, or an experiment without the study, reads as a study with no runs.
    """

    def __init__(self, client: MlflowClient, name: str, study: str, experiment: Any, parent: Any):
        self.client, self.name, self.study = client, name, study
        self.experiment, self.parent = experiment, parent  # None where missing

    @classmethod
    def open(cls, uri: str, experiment: str, study: str, *, parent: bool = True) -> StudyRecord:
        """Read `study`'s record in `experiment` at `uri` (parent=False: skip the parent run, as a fresh
        launch does); raises UnreadableStore, with the reason in one line, for a store MLflow cannot read."""
        try:
            client = MlflowClient(uri)
            found = retrying(client.get_experiment_by_name, experiment)
            newest = find_parent(client, found.experiment_id, study) if found is not None and parent else None
        except Exception as err:
            reason = one_line_error(str(err).split("[SQL:")[0], 300)
            raise UnreadableStore(f"cannot read the tracking store at {uri}: {reason}") from None
        return cls(client, experiment, study, found, newest)

    @property
    def experiment_id(self) -> str:
        """The experiment's id; "" when it does not exist yet."""
        return self.experiment.experiment_id if self.experiment is not None else ""

    @property
    def parent_run_id(self) -> str:
        """The newest parent run's id; "" when the study has none."""
        return self.parent.info.run_id if self.parent is not None else ""

    def runs(self) -> list:
        """Every child run (trial attempt) of the parent run, oldest first."""
        return child_runs(self.client, self.experiment_id, self.parent_run_id) if self.parent else []

    def parent_metric_history(self, key: str) -> list:
        return retrying(self.client.get_metric_history, self.parent_run_id, key)

    def metric_history(self, run, key: str) -> list:
        """Every value a run logged under `key` (MLflow Metrics: value, timestamp in ms, step)."""
        return retrying(self.client.get_metric_history, run.info.run_id, key)

    def tables(
        self, factors: list[str], responses: list[str], *, curves: bool = True
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The study's trials table (one row per trial with a result) and its long table of loss curves.

        Trials: trial_id, cell_id, one column per factor (NaN where it does not apply), seed, status
        (finished | diverged | failed), diverged_step, the responses, vocab_size, run_id, error.
        Curves: trial_id, step, tokens, val_loss, train_loss (finished and diverged trials).
        """
        if self.parent is None:
            where = f"in experiment {self.name!r} at {self.client.tracking_uri}"
            raise LookupError(f"no runs of study {self.study!r} {where}; run it first")
        chosen = list(results_runs(self.runs()).values())
        columns = ["trial_id", "cell_id", *factors, "seed", "status", "diverged_step", *responses]
        trials = pd.DataFrame(
            [trial_row(r, factors, responses) for r in chosen], columns=None if chosen else columns
        )
        done = [r for r in chosen if status_of(r) in DONE] if curves else []
        rows = [row for run in done for row in curve_rows(self.client, run)]
        curve_frame = pd.DataFrame(rows, columns=["trial_id", "step", "tokens", "val_loss", "train_loss"])
        if chosen:
            trials = trials.sort_values(["seed", "trial_id"]).reset_index(drop=True)
        return trials, curve_frame


PACKAGES = (
    "ablate",
    "torch",
    "triton",
    "ray",
    "mlflow",
    "numpy",
    "pandas",
    "pydantic",
    "datasets",
    "tokenizers",
    "scipy",
    "statsmodels",
)


def code_version() -> dict[str, Any]:
    """The git commit of the code that runs (and whether the tree had uncommitted changes), if known."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha or "unknown", "git_dirty": bool(dirty) if dirty is not None else None}


def environment() -> dict[str, Any]:
    """Code version, package versions, Python and host: logged with every study."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        **code_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "packages": versions,
    }
