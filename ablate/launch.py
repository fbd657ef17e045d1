"""Run a study: one Ray Tune trial per (cell, seed), each logging to its own MLflow child run.

The driver expands the design, prepares the data once, opens (or resumes) the study's parent run, and
launches the trials that have no result yet through Ray Tune: FIFO scheduling (no early stopping, which
would bias the attribution), `tune.with_resources` per trial, bounded retries for failures. A diverged
trial is a result: it is recorded and never retried. Resuming needs no Tune state: MLflow is the record,
so running the same command again skips every (cell, seed) that finished or diverged.

The driver never initialises CUDA; trials do, inside their Ray workers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ablate import mps, tracking
from ablate.caches import share_compile_caches
from ablate.config import RunConfig, from_dict
from ablate.design import Design, Trial
from ablate.preflight import starts_local_ray
from ablate.spec import StudyError

TAG = tracking.TAG


@dataclass
class LaunchOptions:
    ray_address: str | None = None  # None: start a local Ray instance sized to this machine
    tracking_uri: str | None = None  # None: the study's tracking.uri, else sqlite in the output dir
    fresh: bool = False  # start a new parent run instead of resuming the latest one
    max_concurrent: int | None = None  # None: the study's max_concurrent, else what resources allow


@dataclass
class RunSummary:
    parent_run_id: str
    counts: dict[str, int] = field(default_factory=dict)  # status -> trials, over the whole study
    skipped: int = 0  # trials already done before this run
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)  # "<cell> seed=<s>: <error>", one per failed trial

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0 and self.counts.get("missing", 0) == 0


@dataclass
class StudyStore:
    """The study's place in MLflow: client, experiment and parent run."""

    client: Any
    uri: str
    experiment_id: str
    parent_run_id: str


def read_study_store(design: Design, options: LaunchOptions) -> tuple[StudyStore, Any, list]:
    """Where the study stands: (store, the parent run to resume or None, its child runs). Writes nothing.

    A store or experiment that does not exist yet reads as a study with no runs (experiment id "").
    Checks that finished trials ran the settings the study asks for now.
    """
    uri = design.tracking_uri(options.tracking_uri)
    store = StudyStore(None, uri, "", "")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return store, None, []
    try:
        record = tracking.StudyRecord.open(
            uri, design.experiment, design.study.name, parent=not options.fresh
        )
    except (
        tracking.UnreadableStore
    ) as err:  # a file that is not an MLflow database, a server that is not MLflow
        key = "--tracking-uri" if options.tracking_uri else "tracking.uri"
        raise StudyError([(key, str(err))], str(design.source) if design.source else None) from None
    store.client, store.experiment_id = record.client, record.experiment_id
    parent, runs = record.parent, record.runs()
    check_settings_unchanged(design, runs)
    store.parent_run_id = parent.info.run_id if parent else ""
    return store, parent, runs


def create_study_store(design: Design, store: StudyStore) -> None:
    """The output folder, the store and the experiment, where they are new (after every check passed)."""
    design.output_dir.mkdir(parents=True, exist_ok=True)
    store.client = tracking.open_store(store.uri)
    artifact_root = design.output_dir / "artifacts" if store.uri.startswith("sqlite:") else None
    store.experiment_id = tracking.ensure_experiment(store.client, design.experiment, artifact_root)


def preflight(design: Design, options: LaunchOptions) -> None:
    """Everything a launch can check before it writes: tracking URI, output folder, the CPUs and GPUs of
    this machine for a Ray started here (and MPS, for a study that asks for it)."""
    from ablate import preflight as checks

    source = str(design.source) if design.source else None
    key = "--tracking-uri" if options.tracking_uri else "tracking.uri"
    checks.check_writable(design.output_dir, "output", source)
    checks.check_tracking_uri(design.tracking_uri(options.tracking_uri), key, source)
    if design.study.resources.mps is True:
        checks.check_mps(options.ray_address, source)
    checks.check_local_cpus(design.study.resources.cpu, options.ray_address, source)
    checks.check_local_gpus(design.study.resources.gpu, options.ray_address, source)


def start_parent(design: Design, store: StudyStore, resume: bool) -> None:
    """Create the study's parent run (params, study file, design table), or mark the resumed one running."""
    client = store.client
    if resume:
        tracking.retrying(client.update_run, store.parent_run_id, status="RUNNING")
    else:
        params = parent_params(design)
        store.parent_run_id = tracking.create_parent(client, store.experiment_id, design.study.name, params)
        tracking.log_artifacts(client, store.parent_run_id, study_artifacts(design))
    if design.study.description:  # what MLflow shows as the run's description
        tracking.retrying(client.set_tag, store.parent_run_id, tracking.DESCRIPTION, design.study.description)
    env = tracking.environment()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tracking.log_artifacts(client, store.parent_run_id, {f"launches/{stamp}/environment.json": _json(env)})
    tracking.retrying(client.set_tag, store.parent_run_id, TAG + "git_sha", env["git_sha"])


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def parent_params(design: Design) -> dict[str, Any]:
    """What the parent run records as params: the design in brief, code and package versions."""
    study, env = design.study, tracking.environment()
    params = {
        "study": study.name,
        "design": study.design.type,
        "cells": len(design.cells),
        "seeds": ",".join(map(str, design.seeds)),
        "trials": len(design.cells) * len(design.seeds),
        "resolution": design.resolution,
        "response": study.responses.primary,
        "resources.cpu": study.resources.cpu,
        "resources.gpu": study.resources.gpu,
        "resources.mps": study.resources.mps,
        "git_sha": env["git_sha"],
        "git_dirty": env["git_dirty"],
        "python": env["python"],
    }
    params.update({f"factor.{n}": ",".join(f.level_names()) for n, f in study.factors.items()})
    params.update({f"version.{k}": v for k, v in env["packages"].items()})
    return params


def study_artifacts(design: Design) -> dict[str, str]:
    """The study file as written, its validated form, and the design table."""
    files = {
        "study/spec.json": design.study.model_dump_json(indent=2),
        "study/design.csv": design.table().to_csv(index=False),
        "study/trials.csv": trials_frame(design).to_csv(index=False),
    }
    if design.source is not None:
        files["study/" + design.source.name] = design.source.read_text()
    return files


def trials_frame(design: Design):
    """One row per trial of the design: trial id, cell id, seed, config hash, factor levels."""
    import pandas as pd

    rows = [
        {
            "trial_id": t.trial_id,
            "cell_id": t.cell.cell_id,
            "seed": t.seed,
            "config_hash": t.config_hash,
            **{f: t.cell.levels.get(f, "") for f in design.study.factors},
        }
        for t in design.trials
    ]
    return pd.DataFrame(rows)


def check_settings_unchanged(design: Design, runs: list) -> None:
    """A finished trial is reused only if it ran the settings the study file asks for now."""
    done = tracking.done_runs(runs)
    changed = [
        t
        for t in design.trials
        if t.trial_id in done and done[t.trial_id].data.tags.get(TAG + "config_hash") != t.config_hash
    ]
    if changed:
        message = (
            f"{len(changed)} trial(s) already finished with other settings (e.g. {changed[0].cell.label} "
            f"seed {changed[0].seed}): the study file changed since they ran. Use --fresh to start a new "
            "parent run (earlier results stay in MLflow), or restore the file's settings"
        )
        raise StudyError([("fixed", message)], str(design.source) if design.source else None)


def _absolute_paths(design: Design, trial: Trial) -> dict:
    """Trials may run in another directory (or machine): give them absolute data and cache paths.

    Relative paths in the study file are read against its folder (`Design.run_tree`).
    """
    from ablate.data_config import DataConfig, cache_root

    tree = design.run_tree(trial)
    data = dict(tree.get("data", {}))
    data["cache_dir"] = str(cache_root(DataConfig(**data)).resolve())
    return {**tree, "data": data}


def trial_payload(trial: Trial, design: Design, store: StudyStore) -> dict[str, Any]:
    """What one Tune trial receives: its identity, its run config, and where to log."""
    track = design.study.tracking
    return {
        "trial_id": trial.trial_id,
        "cell_id": trial.cell.cell_id,
        "label": trial.cell.label,
        "levels": trial.cell.levels,
        "seed": trial.seed,
        "config_hash": trial.config_hash,
        "study": design.study.name,
        "tree": _absolute_paths(design, trial),
        "node_cache": not trial.tree.get("data", {}).get("cache_dir"),  # a node's $ABLATE_CACHE may win
        "tracking": {
            "uri": store.uri,
            "experiment_id": store.experiment_id,
            "parent_run_id": store.parent_run_id,
            "system_metrics": track.system_metrics,
            "interval": track.system_metrics_interval,
            "flush_seconds": track.flush_seconds,
        },
    }


def _trial_key(trial) -> str:
    return trial.config["trial"]["trial_id"]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Progress:
    """Counts trials as Ray Tune reports them and renders one status panel (and a line per trial)."""

    def __init__(self, total: int, skipped: int, console: Console):
        self.total, self.skipped, self.console = total, skipped, console
        self.running: set[str] = set()
        self.counts = {"finished": 0, "diverged": 0, "failed": 0, "retries": 0}
        self.results: dict[str, tuple[str, float]] = {}  # trial id -> (label, val_loss) of finished trials
        self.started = time.monotonic()

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state; not the console
        return {k: v for k, v in self.__dict__.items() if k != "console"}

    def start(self, trial) -> None:
        self.running.add(_trial_key(trial))

    def result(self, trial, result: dict) -> None:
        payload, status = trial.config["trial"], result.get("status", "finished")
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "finished":
            self.results[payload["trial_id"]] = (
                f"{payload['label']} seed={payload['seed']}",
                result["val_loss"],
            )
        details = {
            "finished": f"val_loss {result['val_loss']:.4f}",
            "diverged": f"at step {result['diverged_step']}",
        }
        detail = details.get(status, "(already recorded by an earlier launch)")
        self.console.print(f"  {status:<8} {payload['label']} seed={payload['seed']}  {detail}")

    def end(self, trial, *, failed: bool = False, retry: bool = False) -> None:
        self.running.discard(_trial_key(trial))
        payload = trial.config["trial"]
        if failed or retry:
            self.counts["retries" if retry else "failed"] += 1
            word = "retrying" if retry else "failed"
            self.console.print(
                f"  {word:<8} {payload['label']} seed={payload['seed']}  (error logged in MLflow)"
            )

    def done(self) -> int:
        return sum(self.counts.get(k, 0) for k in ("finished", "diverged", "failed", "skipped"))

    def eta(self) -> str:
        done, elapsed = self.done(), time.monotonic() - self.started
        if not done:
            return "-"
        return _duration(elapsed / done * (self.total - self.skipped - done))

    def render(self):
        from rich.text import Text

        c, elapsed = self.counts, _duration(time.monotonic() - self.started)
        lines = [
            f"{self.done() + self.skipped}/{self.total} done | running {len(self.running)} | finished "
            f"{c['finished']} | diverged {c['diverged']} | failed {c['failed']} | retries {c['retries']}",
            f"elapsed {elapsed} | ETA {self.eta()}",
        ]
        if self.results:
            ranked = sorted(self.results.values(), key=lambda item: item[1])
            lines += [
                f"best  val_loss {ranked[0][1]:.4f}  {ranked[0][0]}",
                f"worst val_loss {ranked[-1][1]:.4f}  {ranked[-1][0]}",
            ]
        return Text("\n".join(lines))


def progress_callback(progress: Progress):
    """A Ray Tune callback that forwards trial events to `progress`."""
    from ray import tune

    class _Callback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.start(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress.result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.end(trial)

        def on_trial_recover(self, iteration, trials, trial, **info):
            progress.end(trial, retry=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.end(trial, failed=True)

    return _Callback()


class PhaseClock:
    """Wall time of a study launch's phases, for the parent run: metrics `study/time/<phase>_s`.

    Each metric is stamped with the time its phase ended, so a reader can also place the phases in time
    (`python -m ablate.bench.study` splits the wait before the first trial this way).
    """

    def __init__(self) -> None:
        self.metrics: list = []

    @contextmanager
    def phase(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            self.metrics.append(tracking.Metric(f"study/time/{name}_s", end - start, int(end * 1000), 0))


def run_study(design: Design, options: LaunchOptions, console: Console | None = None) -> RunSummary:
    """Run every trial of the study that has no result yet; returns the study's status counts."""
    console = console or Console()
    started = time.monotonic()
    clock = PhaseClock()
    preflight(design, options)
    with one_driver(design, options):
        return _run_study(design, options, console, started, clock)


def _run_study(
    design: Design, options: LaunchOptions, console: Console, started: float, clock: PhaseClock
) -> RunSummary:
    with clock.phase("store"):
        store, parent, runs = read_study_store(design, options)
    done = tracking.done_runs(runs)
    todo = [t for t in design.trials if t.trial_id not in done]
    skipped = len(design.trials) - len(todo)
    console.print(
        f"[bold]{design.study.name}[/]: {len(design.trials)} trials, {skipped} already done, "
        f"{len(todo)} to run  (tracking: {store.uri})"
    )
    if todo:
        # the daemon quits after Ray's workers, its clients, have exited
        with mps_daemon(design, use_mps(design, options, console), console) as mps_on:

            def record() -> None:  # the study's store, parent run and data
                with clock.phase("parent"):
                    create_study_store(design, store)
                    start_parent(design, store, resume=parent is not None)
                    tracking.retrying(  # a tag, not a param: auto may decide otherwise on resume
                        store.client.set_tag,
                        store.parent_run_id,
                        tracking.TAG + "mps",
                        "on" if mps_on else "off",
                    )
                    tracking.close_stale(store.client, runs)  # left running by a driver that was killed
                with clock.phase("data"):
                    prepare_data(design, todo, console)

            started_ray = False
            try:
                started_ray = start_ray_beside(record, design, store, options, clock)
                with clock.phase("tune"):
                    run_tune(design, todo, store, options, Progress(len(design.trials), skipped, console))
            finally:
                if started_ray:
                    import ray

                    with clock.phase("ray_shutdown"):
                        ray.shutdown()
        runs = tracking.child_runs(store.client, store.experiment_id, store.parent_run_id)
        tracking.close_stale(
            store.client, runs, "failed", "the trial's process ended without reporting a result"
        )
    summary = summarize(design, store, started, skipped)
    if store.parent_run_id:
        tracking.retrying(store.client.log_batch, store.parent_run_id, metrics=clock.metrics)
        tracking.retrying(
            store.client.set_terminated, store.parent_run_id, "FINISHED" if summary.ok else "FAILED"
        )
    print_summary(design, store, summary, console)
    return summary


def use_mps(design: Design, options: LaunchOptions, console: Console) -> bool:
    """Whether this launch runs its trials under MPS: `resources.mps` true (checked in preflight), or
    auto where trials share a GPU (0 < gpu < 1) and this machine can start the daemon; auto says which.

    MPS pays where trials share a GPU: four sdpa trials per H200 gave 1.10x one trial alone's steady
    tokens/s under MPS and 0.94x without (`python -m ablate.bench.packing --processes 1,2,4 [--mps]`).
    """
    from ablate import preflight as checks

    resources = design.study.resources
    if resources.mps != "auto" or not resources.asks_for_mps:  # true: checked in preflight
        return resources.asks_for_mps
    why = checks.mps_unavailable(options.ray_address)
    console.print(f"MPS: {'on (trials share GPUs)' if why is None else 'off: ' + why[0]}")
    return why is None


# Where `one_driver` keeps its locks: one folder per user, the same whatever $TMPDIR says, so that
# drivers started with different temporary folders (two shells, two batch jobs on one node) see each
# other. In the temporary folder they did not: two runs of one study wrote its SQLite store at once, and
# one stopped in MLflow's schema migration with a traceback.
LOCKS = Path("/tmp") / f"ablate-locks-{os.getuid()}"


@contextmanager
def one_driver(design: Design, options: LaunchOptions):
    """At most one `ablate run` of a study (its tracking store and experiment) on this machine at a time.

    Two would write one record at once: both resuming the same parent run, or two parents whose trials
    and timings a reader of "the latest" mixes up. The lock is an advisory file lock in `LOCKS` (not in
    the output folder, which nothing may touch before the checks pass), released when the process ends
    however it ends; the file names the pid holding it.
    """
    key = f"{design.tracking_uri(options.tracking_uri)}\n{design.experiment}"
    LOCKS.mkdir(exist_ok=True)
    path = LOCKS / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".lock")
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            source = str(design.source) if design.source else None
            message = (
                f"another `ablate run` of this study is running (pid {holder}), writing to "
                f"{design.tracking_uri(options.tracking_uri)}; wait for it to end, or stop it (Ctrl-C) first"
            )
            raise StudyError([("run", message)], source) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def mps_daemon(design: Design, on: bool, console: Console):
    """When `on`: an NVIDIA MPS control daemon private to this launch, around the local Ray; yields
    whether one runs.

    Started before Ray, so that Ray's workers inherit its pipe directory and become its clients. It is
    started with the driver's CUDA_VISIBLE_DEVICES, the list from which Ray hands each worker GPU ids;
    the workers inherit that list too (`mps.SERVED`), and each trial renames its ids to the daemon's
    numbering before torch starts CUDA (`ablate.trial`). Its pipe and log folders are temporary (a
    socket's path must stay short), and the driver's environment is restored when it quits. A daemon
    that does not start stops a study that asked for MPS (`true`) and is passed over under `auto`.
    """
    if not on:
        yield False
        return
    with tempfile.TemporaryDirectory(prefix="ablate-mps-", ignore_cleanup_errors=True) as folder:
        try:
            daemon = mps.start_daemon(Path(folder))
        except RuntimeError as err:
            if design.study.resources.mps == "auto":  # asked for where it can run: the study runs without
                console.print(f"MPS: off: the daemon did not start ({err})")
                yield False
                return
            source = str(design.source) if design.source else None
            raise StudyError([("resources.mps", str(err))], source) from None
        exported = mps.worker_env(daemon)
        saved = {key: os.environ.get(key) for key in exported}
        os.environ.update(exported)
        try:
            yield True
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if not mps.stop_daemon(daemon):
                console.print(
                    f"warning: the MPS daemon did not answer `quit` within {mps.STOP_TIMEOUT_S:g} s"
                )


def start_ray_beside(
    record: Callable[[], None], design: Design, store: StudyStore, options: LaunchOptions, clock: PhaseClock
) -> bool:
    """Start (or join) Ray, and `record` the study (store, parent run, data); True if Ray started here.

    A Ray started here takes about 3 s to come up, so the study is recorded meanwhile, in a thread:
    `preflight` has checked this machine's CPUs and GPUs, which are what that Ray will have. A cluster
    (`--ray-address`, or a Ray this process runs already) is checked first, then recorded: nothing is
    written for a study it cannot run. Ray itself starts in the main thread, where it installs its
    handler of SIGTERM.
    """
    beside = starts_local_ray(options.ray_address)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-record") as pool:
        recorded = pool.submit(record) if beside else None
        with clock.phase("ray_start"):
            started = init_ray(options.ray_address)  # on failure, leaving this block waits for the record
    try:
        if recorded is not None:
            recorded.result()
        check_cluster(design, store.uri)  # for a Ray started here: what preflight checked, as Ray counts it
        if recorded is None:
            record()
    except BaseException:
        if started:  # the caller learns that Ray started only from the return value
            import ray

            ray.shutdown()
        raise
    return started


def init_ray(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray sized to this machine; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    share_compile_caches()
    # Ray's notice that token authentication is on by default asks nothing of the user here
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    _brief_ray_errors()
    # "local": a new instance even where `ray start` left one running; join one with --ray-address auto
    ray.init(
        address=address or "local",
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        **({} if address else {"_system_config": dict(LOCAL_RAY_CONFIG)}),  # a copy: Ray adds to it
    )
    return True


# For the first driver of a new local Ray, the raylet starts one idle worker process per CPU and lets
# the driver in only once they have started. Tune's trial actors never run in them (Tune gives its
# actors a runtime environment of their own, and a worker serves one environment), so on a 16-core host
# they were 16 interpreters started for nothing, on the study's critical path and beside the trials' own.
# (A cluster joined with --ray-address keeps its own settings.)
LOCAL_RAY_CONFIG = {"prestart_worker_first_driver": False}


RAY_ERROR_CHARS = 200


def brief_ray_error(message: str) -> str:
    """The first line of an error Ray pushes to the driver, cut to RAY_ERROR_CHARS (a raylet's death
    comes with its last log lines and a state dump, about 900 characters on one line and dozens more)."""
    first = " ".join((message.strip().splitlines() or [""])[0].split())
    first = first if len(first) <= RAY_ERROR_CHARS else first[: RAY_ERROR_CHARS - 3] + "..."
    return f"{first} (Ray's logs: /tmp/ray/session_latest/logs)"


def _brief_ray_errors() -> None:
    """Print Ray's error messages to the driver in one short line each (the full text is in its logs)."""
    from ray._private import worker

    show = getattr(worker, "print_to_stdstream", None)
    if show is None or getattr(show, "brief", False):
        return

    def brief(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and data.get("lines"):
            data = {**data, "lines": [brief_ray_error(str(line)) for line in data["lines"]]}
        show(data, ignore_prefix)

    brief.brief = True
    worker.print_to_stdstream = brief


def check_cluster(design: Design, uri: str) -> None:
    """A trial must fit on the cluster (or Tune would wait forever) and reach the tracking store."""
    import ray

    from ablate.preflight import too_few

    have, want = ray.cluster_resources(), design.study.resources
    source = str(design.source) if design.source else None
    for kind, asked in (("CPU", want.cpu), ("GPU", want.gpu)):
        if asked > have.get(kind, 0):
            raise too_few(kind, asked, have.get(kind, 0), source, "the Ray cluster")
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1 and uri.startswith("sqlite:"):
        message = (
            f"a SQLite store is a file on this machine; trials on the other {nodes - 1} node(s) cannot write "
            "to it. Start `mlflow server` (PostgreSQL backend) and pass --tracking-uri http://HOST:5000"
        )
        raise StudyError([("tracking.uri", message)], source)


def prepare_data(design: Design, trials: list[Trial], console: Console) -> None:
    """Tokenise and pack each distinct data setting once, before any trial starts (trials hit the cache)."""
    from ablate.data import prepare

    seen = set()
    for trial in trials:
        cfg = from_dict(RunConfig, _absolute_paths(design, trial))
        key = (repr(cfg.data), cfg.model.context)
        if key not in seen:
            seen.add(key)
            console.print(
                f"preparing data: {cfg.data.source} ({cfg.data.tokenizer}, context {cfg.model.context}) "
                f"under {cfg.data.cache_dir}"
            )
            prepare(cfg.data, cfg.model.context)


def run_tune(
    design: Design, todo: list[Trial], store: StudyStore, options: LaunchOptions, progress: Progress
) -> None:
    """One Tune trial per pending (cell, seed): FIFO, fixed resources, bounded retries of failures."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from rich.live import Live

    from ablate.trial import TrialTrainable

    study = design.study
    payloads = [trial_payload(t, design, store) for t in todo]
    tuner = tune.Tuner(
        tune.with_resources(TrialTrainable, {"cpu": study.resources.cpu, "gpu": study.resources.gpu}),
        param_space={"trial": tune.grid_search(payloads)},
        tune_config=tune.TuneConfig(
            scheduler=FIFOScheduler(),
            max_concurrent_trials=options.max_concurrent or study.max_concurrent,
            reuse_actors=reuse_workers(),
            trial_name_creator=_trial_key,
            trial_dirname_creator=_trial_key,
        ),
        run_config=tune.RunConfig(
            name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(design.output_dir / "ray"),
            failure_config=tune.FailureConfig(max_failures=study.retries),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),  # MLflow is the record
            verbose=0,
            callbacks=[progress_callback(progress)],
        ),
    )
    quiet = logging.getLogger("ray.tune")  # trial errors are recorded in MLflow and summarised here
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        with Live(get_renderable=progress.render, console=progress.console, refresh_per_second=2):
            tuner.fit()
    finally:
        quiet.setLevel(level)
        if not progress.console.is_terminal:
            progress.console.print()  # the last panel has no newline off a terminal


REUSE_WORKERS = "ABLATE_REUSE_WORKERS"  # "0": a new worker process per trial; unset or "1": reuse


def reuse_workers() -> bool:
    """Whether a Ray worker process may run several trials, one after another (Tune's `reuse_actors`).

    Yes, compiled or not: the next trial skips a process start and its imports, and a compiled one
    finds its kernels in memory and in inductor's on-disk caches. Trials run in the worker's main
    thread (`ablate.trial`), where compiled trials share processes without the crashes they had in
    Tune's function API (README, "Studies on the fast path"). `$ABLATE_REUSE_WORKERS=0` gives every
    trial a new process instead.
    """
    return os.environ.get(REUSE_WORKERS, "").strip() != "0"


def summarize(design: Design, store: StudyStore, started: float, skipped: int) -> RunSummary:
    """Status counts over the study's trials, from MLflow (the record), not from Tune."""
    runs = (
        tracking.child_runs(store.client, store.experiment_id, store.parent_run_id)
        if store.parent_run_id
        else []
    )
    chosen = tracking.results_runs(runs)
    counts: dict[str, int] = {}
    failures = []
    for trial in design.trials:
        status = tracking.status_of(chosen[trial.trial_id]) if trial.trial_id in chosen else "missing"
        counts[status] = counts.get(status, 0) + 1
        if status == "failed":
            error = tracking.error_line(chosen[trial.trial_id])
            failures.append(f"{trial.cell.label} seed={trial.seed}: {error}")
    return RunSummary(store.parent_run_id, counts, skipped, time.monotonic() - started, failures)


def print_summary(design: Design, store: StudyStore, summary: RunSummary, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"{design.study.name}: {len(design.trials)} trials in {_duration(summary.elapsed_s)}")
    table.add_column("status")
    table.add_column("trials", justify="right")
    for status in ("finished", "diverged", "failed", "missing"):
        if summary.counts.get(status):
            table.add_row(status, str(summary.counts[status]))
    console.print(table)
    for line in summary.failures:
        console.print(f"failed: {line}", highlight=False, markup=False)
    console.print(f"tracking: {store.uri}  (parent run {summary.parent_run_id})")
    if design.source is not None:
        console.print(f"next: ablate ui {design.source}   |   ablate report {design.source}")
