"""The `ablate` command line: validate, plan, run and browse studies; train one config; analyse results.

User mistakes (a bad study file, an unknown key, a missing table) print one error naming the file, the
key path and the valid choices, and exit with status 2 before anything is launched or written.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ablate import caches, rates

app = typer.Typer(
    help="Designed ablation studies of attention geometries: Ray Tune trials, MLflow records, attribution.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(soft_wrap=True)
# Assumed speeds of one trial, for `plan` without a measured rate: the seed-size model on one H200 GPU,
# the quickstart model per CPU core (the measurements: README, Layout, measured numbers).
GPU_TOKENS_PER_S = 1.5e6
CPU_TOKENS_PER_S = 2.5e4
StudyArg = Annotated[Path, typer.Argument(help="The study file (YAML), e.g. studies/quickstart.yaml.")]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow store; default: the study's tracking.uri, else "
        "sqlite:///<absolute output dir>/mlflow.db.",
    ),
]


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("ablate")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed; pip install -e .)"
        console.print(f"ablate {version}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Designed ablation studies of attention geometries: Ray Tune trials, MLflow records, attribution."""


def fail(message: str) -> typer.Exit:
    """Print one error line to stderr; the caller raises the returned Exit (status 2: a user mistake)."""
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def user_errors(command):
    """Turn a ConfigError (or a lookup of something that does not exist) into one message and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ablate.config import ConfigError  # imported here: `ablate --help` stays fast

        try:
            return command(*args, **kwargs)
        except ConfigError as err:
            raise fail(str(err)) from None
        except LookupError as err:
            raise fail(str(err.args[0] if err.args else err)) from None

    return wrapper


def _quiet_logs() -> None:
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _tracking_uri(design, override: str | None, study: Path) -> str:
    """The study's tracking URI (--tracking-uri first), checked to be a store MLflow can open."""
    from ablate.preflight import check_tracking_uri

    uri = design.tracking_uri(override)
    check_tracking_uri(uri, "--tracking-uri" if override else "tracking.uri", str(study), probe=False)
    return uri


def open_record(design, uri: str, study: Path):
    """The study's record in an existing store (after a moved study folder is followed); a store
    MLflow cannot read exits 2."""
    from ablate import tracking
    from ablate.config import ConfigError

    try:
        record = tracking.StudyRecord.open(uri, design.experiment, design.study.name)
    except tracking.UnreadableStore as err:
        raise ConfigError("", str(err), str(study)) from None
    tracking.relocate_artifacts(uri, design.experiment, design.output_dir / "artifacts")
    return record


def _load(study: Path):
    from ablate.design import load_design

    return load_design(study)


@app.command()
@user_errors
def validate(study: StudyArg) -> None:
    """Check a study file: schema, factor levels, conditions, comparisons and every trial's config."""
    design = _load(study)
    _tracking_uri(design, None, study)
    n_cells, n_seeds = len(design.cells), len(design.seeds)
    console.print(
        f"ok: {study}: {n_cells} cells x {n_seeds} seeds = {n_cells * n_seeds} trials "
        f"({design.study.design.type} design)"
    )


@app.command()
@user_errors
def plan(
    study: StudyArg,
    tokens_per_s: Annotated[
        float | None,
        typer.Option(
            min=1e-9,
            help="Training throughput of one trial at its resources (tokens/s); default: "
            f"{GPU_TOKENS_PER_S:,.0f} per GPU, else {CPU_TOKENS_PER_S:,.0f} per CPU core it asks for.",
        ),
    ] = None,
    seed_sd: Annotated[
        float, typer.Option(help="Seed-to-seed standard deviation of the response (nats).")
    ] = 0.01,
) -> None:
    """Show the design table, the trial count, the compute it needs and the minimum detectable effects."""
    from ablate.design import detectable_effects, trial_hours

    design = _load(study)
    table = Table(title=f"{design.study.name}: design ({design.study.design.type})")
    frame = design.table()
    for column in frame.columns:
        table.add_column(str(column))
    for row in frame.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    console.print(table)
    if design.resolution is not None:
        console.print(f"resolution {design.resolution}; aliases:\n  " + "\n  ".join(design.aliases()))
    measured = None if tokens_per_s else measured_rate(design)
    rate = tokens_per_s or (measured[0] if measured else default_rate(design.study.resources))
    fixed = measured[2] if measured else None
    hours = trial_hours(design, rate, fixed.per_trial_s if fixed else 0.0)
    _print_cost(design, hours, rate, assumed=tokens_per_s is None and not measured, fixed=fixed)
    if measured:
        console.print(f"  rate per trial from {measured[1]}", highlight=False)
    if fixed:
        console.print(
            f"  fixed costs (per trial: added above; per launch: beside): {fixed.describe()}", highlight=False
        )
    effects = Table(title=f"minimum detectable effect (80% power, alpha 0.05, seed sd {seed_sd:g})")
    for column in ("term", "df", "trials", "MDE", "measures"):
        effects.add_column(column)
    for row in detectable_effects(design, seed_sd):
        if math.isnan(row["mde"]):
            effects.add_row(row["term"], str(row["df"]), str(row["trials"]), "n/a", "needs two or more seeds")
        else:
            effects.add_row(
                row["term"], str(row["df"]), str(row["trials"]), f"{row['mde']:.4g}", row["meaning"]
            )
    console.print(effects)


def measured_rate(design) -> tuple[float, str, rates.FixedCosts | None] | None:
    """One GPU trial's tokens/s from the nearest measured rate (ablate/rates.json), what it is, and the
    measured fixed costs to add where it is a long trial's steady rate (a study's rate has them); None for
    a CPU study, a study off the fast path (no CUDA graphs) or without a table."""
    from ablate.config import RunConfig, from_dict

    gpu = design.study.resources.gpu
    if gpu <= 0:
        return None
    tree = design.run_tree(design.trials[0])
    train = from_dict(RunConfig, tree).train
    if not train.cuda_graphs:  # every measured row is of the fast path
        return None
    vocab, assumed = rates.study_vocab(tree.get("data", {}))
    tokens = train.tokens
    # MPS as a launch on a machine that can start the daemon would run it
    found = rates.nearest(
        vocab, 1.0 / gpu if gpu < 1 else 1.0, tokens, mps=design.study.resources.asks_for_mps
    )
    if found is None:
        return None
    what = found.describe() + (f"; vocabulary assumed {vocab}" if assumed else "")
    # a trial trains on one device: a share of a GPU gets that share, more than one GPU no more than one
    return found.tokens_per_s_per_gpu * min(gpu, 1.0), what, rates.fixed_costs() if found.steady else None


def default_rate(resources) -> float:
    """An assumed tokens/s of one trial from the resources it asks for (a GPU share, else CPU cores)."""
    if resources.gpu > 0:
        return GPU_TOKENS_PER_S * resources.gpu
    return CPU_TOKENS_PER_S * resources.cpu


def _hours(hours: float) -> str:
    return f"{hours:,.2f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def _print_cost(
    design,
    hours: list[float],
    tokens_per_s: float,
    assumed: bool = False,
    fixed: rates.FixedCosts | None = None,
) -> None:
    resources, total = design.study.resources, sum(hours)
    plus = f" plus {fixed.per_trial_s:g} s fixed per trial" if fixed else ""
    console.print(
        f"{len(design.cells)} cells x {len(design.seeds)} seeds = {len(hours)} trials; "
        f"{_hours(total)} of trial time at {tokens_per_s:,.0f} tokens/s per trial{plus}"
    )
    if assumed:
        console.print("  (an assumed rate; measure one trial and pass --tokens-per-s for a real estimate)")
    start = (
        f", and {fixed.start_s:g} s of wall clock per launch before the first trial and after the last"
        if fixed
        else ""
    )
    if resources.gpu > 0:
        console.print(f"GPU time: {_hours(total * resources.gpu)} ({resources.gpu:g} GPU per trial){start}")
    else:
        console.print(f"CPU time: {_hours(total * resources.cpu)} ({resources.cpu:g} CPU per trial, no GPU)")
    concurrent = design.study.max_concurrent
    if concurrent:
        console.print(f"wall clock at {concurrent} concurrent trials: {_hours(total / concurrent)}")


@app.command()
@user_errors
def run(
    study: StudyArg,
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            help="Join this Ray cluster (head-node ip:6379, or 'auto' for the one `ray start` runs here); "
            "default: start a local Ray sized to this machine.",
        ),
    ] = None,
    tracking_uri: TrackingOpt = None,
    fresh: Annotated[
        bool, typer.Option(help="Start a new parent run instead of resuming the latest.")
    ] = False,
    max_concurrent: Annotated[
        int | None, typer.Option(min=1, help="At most this many trials at once.")
    ] = None,
) -> None:
    """Run the study's trials through Ray Tune (resumable: finished trials are never rerun)."""
    from ablate.launch import LaunchOptions, run_study

    design = _load(study)
    _quiet_logs()
    options = LaunchOptions(ray_address, tracking_uri, fresh, max_concurrent)
    summary = run_study(design, options, console)
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
@user_errors
def prepare(study: StudyArg) -> None:
    """Tokenise and cache the study's data now, without running a trial (then carry the cache along)."""
    from ablate.launch import prepare_data

    design = _load(study)
    try:
        prepare_data(design, design.trials, console)
    except ValueError as err:  # data that cannot be prepared here: the message says how to fix it
        raise fail(f"{study}: {err}") from None


QUICKSTART = "quickstart.yaml"  # shipped in the package (ablate/studies is the repository's studies/)


@app.command()
@user_errors
def quickstart(
    folder: Annotated[
        Path, typer.Option("--dir", help="Where the study file, its SQLite store and its report go.")
    ] = Path("ablate-quickstart"),
) -> None:
    """The whole job on the shipped quickstart study: 36 CPU trials, then the report, then where to look."""
    from ablate.launch import LaunchOptions, run_study

    study = _quickstart_study(folder)
    design = _load(study)
    _quiet_logs()
    summary = run_study(design, LaunchOptions(ray_address=os.environ.get("RAY_ADDRESS")), console)
    if not summary.ok:
        raise fail(f"{summary.counts.get('failed', 0)} trial(s) failed (above); no report written")
    paths = _write_report(design, study, design.tracking_uri(), None)
    console.print(f"\nreport:  {paths['report.html']}  (and report.md beside it)", highlight=False)
    console.print(f"browse:  ablate ui {study}   (MLflow UI on http://127.0.0.1:5000)", highlight=False)


def _quickstart_study(folder: Path) -> Path:
    """The shipped quickstart study, copied into `folder` (kept if it is already there unchanged)."""
    from importlib import resources

    from ablate.config import ConfigError

    text = (resources.files("ablate") / "studies" / QUICKSTART).read_text(encoding="utf-8")
    study = folder / QUICKSTART
    if study.exists() and study.read_text(encoding="utf-8", errors="replace") != text:
        message = (
            f"{study} differs from the shipped quickstart; run it with `ablate run {study}`, or remove it"
        )
        raise ConfigError("", message)
    if not study.exists():
        folder.mkdir(parents=True, exist_ok=True)
        study.write_text(text, encoding="utf-8")
    return study


def _store_exists(uri: str) -> bool:
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


@app.command()
@user_errors
def status(study: StudyArg, tracking_uri: TrackingOpt = None) -> None:
    """Where a study stands: trials finished, diverged, failed, running and pending (read from MLflow)."""
    design = _load(study)
    uri = _tracking_uri(design, tracking_uri, study)
    total = len(design.trials)
    if not _store_exists(uri):
        console.print(f"{design.study.name}: not started (no store at {uri}); 0/{total} trials done")
        return
    _quiet_logs()
    _print_status(design, open_record(design, uri, study).runs(), uri)


def _print_status(design, runs: list, uri: str) -> None:
    from ablate import tracking

    chosen, running = (
        tracking.results_runs(runs),
        {tracking.tag(r, "trial_id") for r in runs if tracking.status_of(r) == "running"},
    )
    counts: dict[str, int] = {}
    for trial in design.trials:
        status = tracking.status_of(chosen[trial.trial_id]) if trial.trial_id in chosen else "pending"
        status = "running" if status in ("pending", "failed") and trial.trial_id in running else status
        counts[status] = counts.get(status, 0) + 1
    console.print(f"{design.study.name}: {len(design.trials)} trials  (tracking: {uri})")
    table = Table()
    table.add_column("status")
    table.add_column("trials", justify="right")
    for name in ("finished", "diverged", "failed", "running", "pending"):
        table.add_row(name, str(counts.get(name, 0)))
    console.print(table)
    for run in chosen.values():
        if tracking.status_of(run) == "failed":
            where = f"{tracking.tag(run, 'cell')} seed={run.data.params.get('seed')}"
            console.print(f"failed: {where}: {tracking.error_line(run)}", highlight=False, markup=False)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@app.command()
@user_errors
def ui(
    study: StudyArg,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the UI to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI.")] = 5000,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Start the MLflow UI on the study's store and print its URL (Ctrl-C stops it)."""
    design = _load(study)
    uri = _tracking_uri(design, tracking_uri, study)
    if uri.startswith(("http://", "https://")):
        console.print(f"the study is tracked on an MLflow server: open {uri}")
        return
    if not _store_exists(uri):
        raise fail(f"{study}: no tracking store yet at {uri}; run `ablate run {study}` first")
    if not _port_free(host, port):
        raise fail(f"port {port} on {host} is in use (another UI?); choose another with --port")
    record = open_record(design, uri, study)  # a store MLflow cannot read exits 2
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        # one person browsing needs one worker; MLflow's default of four imports its app four times (on a
        # 2-core machine `ablate ui` answered after 23 s so, 17 s with one)
        "--workers",
        "1",
    ]
    console.print(f"MLflow UI for {design.study.name}: {_runs_url(record.experiment, host, port)}")
    sys.stdout.flush()
    # MLflow's background job runner adds processes that slow the UI's shutdown; the UI needs none of it
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    os.execve(sys.executable, command, env)  # the UI replaces this process


def _runs_url(found, host: str, port: int) -> str:
    """The study's runs table (MLflow 3 otherwise opens on its GenAI view, which lists no runs)."""
    base = f"http://{host}:{port}"
    return f"{base}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning" if found else base


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="A run config (YAML): model/data/optim/train sections.")],
    overrides: Annotated[list[str] | None, typer.Option("--set", help="key.path=value, repeatable.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the resolved config and result JSON here.")] = None,
) -> None:
    """Train one configuration (no Ray, no MLflow): progress on stderr, the result as JSON."""
    from ablate.train import main as train_main

    raise typer.Exit(train_main(config, overrides or [], out))


@app.command()
def analyze(
    table: Annotated[Path, typer.Argument(help="Trials table (.csv or .parquet): one row per trial.")],
    factors: Annotated[
        list[str], typer.Option("--factors", help="Factor columns (repeat, or comma-separated).")
    ],
    response: Annotated[str, typer.Option(help="The response column.")] = "val_loss",
    compare: Annotated[list[str] | None, typer.Option(help="'a=x,b=y -> a=z,b=w' (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Output directory of the report.")] = Path("report"),
    adjust: Annotated[str, typer.Option(help="Multiplicity adjustment: holm or bh.")] = "holm",
    secondary: Annotated[list[str] | None, typer.Option(help="Secondary responses (repeatable).")] = None,
    curves: Annotated[
        Path | None, typer.Option(help="Long table of loss curves (trial_id, step, ...).")
    ] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary size (caps diverged losses).")] = None,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    target: Annotated[
        list[float] | None, typer.Option(help="A validation loss to time (with --curves; repeatable).")
    ] = None,
) -> None:
    """Attribute a response to factors from a plain trials table (the statistics of `report`)."""
    from ablate.report import from_table

    names = [name.strip() for item in factors for name in item.split(",") if name.strip()]
    extra = [name.strip() for item in secondary or [] for name in item.split(",") if name.strip()]
    code = from_table(
        table,
        names,
        response,
        compare or [],
        out,
        adjust=adjust,
        secondary=extra,
        vocab_size=vocab_size,
        curves=curves,
        title=title,
        targets=target or [],
    )
    raise typer.Exit(code)


@app.command()
@user_errors
def report(
    study: StudyArg,
    tracking_uri: TrackingOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output directory; default: <output dir>/report.")] = None,
) -> None:
    """Attribution report of a study from its MLflow runs: HTML + Markdown + CSV/JSON, logged to MLflow."""
    design = _load(study)
    uri = _tracking_uri(design, tracking_uri, study)
    if not _store_exists(uri):
        raise fail(f"{study}: no results yet (no store at {uri}); run `ablate run {study}` first")
    _quiet_logs()
    _write_report(design, study, uri, out)


def _write_report(design, study: Path, uri: str, out: Path | None) -> dict[str, Path]:
    """The study's report files (written and logged to its parent run); prints the summary."""
    from ablate.analysis import StudyDataError
    from ablate.preflight import check_writable
    from ablate.report import from_study

    out_dir = out or design.output_dir / "report"
    check_writable(out_dir, "--out" if out else "output", str(study))
    record = open_record(design, uri, study)
    try:
        return from_study(design, record, out_dir, console)
    except StudyDataError as err:
        raise fail(f"{study}: {err}") from None


def main() -> None:
    """Entry point of the `ablate` command."""
    caches.relaunch_with_cached_bytecode()  # before the subcommand imports torch, Ray and MLflow
    app()


if __name__ == "__main__":
    main()
