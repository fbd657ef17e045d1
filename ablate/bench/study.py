"""How well a study uses its GPUs: `python -m ablate.bench.study STUDY [--alone | --baseline F] ...`.

Study efficiency = (total tokens trained / study wall time / GPUs used) / (steady tokens/s of one trial
alone on one of those GPUs). Cells differ in speed, so `--alone` measures one trial alone per class of
cells (`--alone-factors`), in this process on GPU 0, with the study's own settings (`--eager`: with
compilation and CUDA graphs off); the efficiency is then the time the finished trials would take one
after another, each alone at its class's rate, over the study's wall time times its GPUs.
Without it, the study is run through `ablate run --fresh` (`--gpu`, `--tokens`, `--mps` and `--fixed
SECTION.KEY=VALUE` run a copy with another per-trial GPU fraction, token budget, MPS setting or fixed
setting; `--timeout` stops it as Ctrl-C does) and the MLflow record is
summarised: tokens, wall time, slots x wall time split by phase, which GPU each trial ran on, the most
trials any GPU held at once and how many worker processes ran them. `--baseline` (an `--alone` result)
adds the efficiency.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ablate import tracking


def measure_alone(study: Path, factors: list[str] | None = None, eager: bool = False) -> dict:
    """Steady tokens/s of one trial alone, in this process on GPU 0, for each class of the study's cells.

    The trial runs the study's own settings (for a study on the fast path: compile, CUDA graphs and the
    fused loss, the fastest configuration a user can choose); `eager` turns compilation and graphs off,
    for the eager baseline beside it.

    A class is one combination of levels of `factors` (default: every factor, so every cell); it is
    measured on its first cell. The study's alone rate weights the classes by their trials: the study's
    tokens over the time its trials would take one after another, each alone (a harmonic mean). A cell
    several times slower than the rest then counts as slow work, not as lost efficiency.
    """
    from ablate.bench.throughput import steady_median
    from ablate.caches import share_compile_caches
    from ablate.config import RunConfig, from_dict
    from ablate.design import load_design
    from ablate.logger import RecordingLogger
    from ablate.train import train
    from ablate.train_config import uncompiled

    share_compile_caches()  # the caches a study's trials use: a cell compiled by the study loads from disk

    design = load_design(study)
    names = list(design.study.factors) if factors is None else factors
    unknown = [f for f in names if f not in design.study.factors]
    if unknown:
        raise SystemExit(
            f"--alone-factors: {unknown} are not factors of {study} ({list(design.study.factors)})"
        )
    first: dict[str, object] = {}
    trials: dict[str, int] = {}
    for trial in design.trials:
        key = class_label(names, trial.cell.levels)
        first.setdefault(key, trial)
        trials[key] = trials.get(key, 0) + 1
    rates, seconds = {}, {}
    for i, (key, trial) in enumerate(first.items(), 1):
        started = time.perf_counter()
        tree = design.run_tree(trial)
        if eager:
            tree = {
                **tree,
                "train": {**tree.get("train", {}), **uncompiled()},
            }
        log = RecordingLogger()
        train(from_dict(RunConfig, tree), log)
        rates[key] = steady_median(log, "tokens_per_s")
        seconds[key] = time.perf_counter() - started
        print(f"alone {i}/{len(first)}: {trial.cell.label}  {rates[key]:,.0f} tokens/s", file=sys.stderr)
    alone = sum(trials.values()) / sum(n / rates[key] for key, n in trials.items())
    return {
        "alone_tokens_per_s": alone,
        "mode": "eager" if eager else "the study's settings",
        "factors": names,
        "by_class": {
            key: {"tokens_per_s": rates[key], "trials": trials[key], "seconds": seconds[key]} for key in rates
        },
    }


def class_label(factors: list[str], levels: dict[str, str]) -> str:
    """A class of cells, e.g. "metric=rbf gamma_schedule=learnable"; an absent factor has level ""."""
    return " ".join(f"{f}={levels.get(f, '')}" for f in factors)


MPS_SETTINGS = ("true", "false", "auto")  # resources.mps, as a command line gives it


def cpus_per_trial(text: str) -> int | float:
    """A trial's CPUs as `resources.cpu` takes them: a number above 0 (Ray shares CPUs, so 2.5 is one)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: CPUs per trial are a number above 0, e.g. 2 or 2.5")
    return int(value) if value.is_integer() else value


def add_copy_options(parser: argparse.ArgumentParser) -> None:
    """--mps, --cpu and --fixed: settings of the study copy that is run (`variant`)."""
    parser.add_argument(
        "--mps", choices=MPS_SETTINGS, default=None, help="resources.mps (default: the study's)"
    )
    parser.add_argument(
        "--cpu",
        type=cpus_per_trial,
        default=None,
        help="resources.cpu, CPUs per trial (default: the study's)",
    )
    parser.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a fixed setting of the study copy, e.g. train.reuse_compiled=true (repeatable)",
    )


def variant(
    study: Path,
    gpu: float | None,
    tokens: int | None,
    mps: str | None = None,
    fixed: list[str] | None = None,
    cpu: float | None = None,
) -> Path:
    """A copy of the study (own name and folder) with another per-trial GPU fraction, token budget, MPS
    setting (true, false or auto), CPUs per trial and/or fixed settings ("train.reuse_compiled=true": a
    YAML value)."""
    tree = yaml.safe_load(study.read_text())
    if gpu is not None:
        tree["name"] += "_gpu" + str(gpu).replace(".", "p")
        tree["resources"] = {**tree.get("resources", {}), "gpu": gpu}
    if cpu is not None:
        if not cpu > 0:
            raise SystemExit(f"--cpu {cpu}: a trial needs a share of CPUs above 0")
        tree["name"] += "_cpu" + str(cpu).replace(".", "p")
        tree["resources"] = {**tree.get("resources", {}), "cpu": cpu}
    if tokens is not None:
        tree["name"] += f"_tok{tokens}"
        tree["fixed"]["train"] = {**tree["fixed"].get("train", {}), "tokens": tokens}
    if mps is not None:
        tree["name"] += f"_mps{mps}"
        tree["resources"] = {**tree.get("resources", {}), "mps": yaml.safe_load(mps)}
    for setting in fixed or []:
        key, _, value = setting.partition("=")
        section, _, name = key.partition(".")
        if not (section and name and value):
            raise SystemExit(
                f"--fixed {setting!r}: expected SECTION.KEY=VALUE, e.g. train.reuse_compiled=true"
            )
        tree["name"] += f"_{name}{value}".replace(".", "p")
        tree["fixed"][section] = {**tree["fixed"].get(section, {}), name: yaml.safe_load(value)}
    tree["tracking"] = {**tree.get("tracking", {}), "experiment": tree["name"]}
    path = study.parent / f"runs/{tree['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


PHASES = ("setup_s", "first_window_s", "train_s", "eval_s", "log_s")


def summarize(study: Path, started: float, ended: float, baseline: dict | None = None) -> dict:
    """The study's record, with its wall time split into slot-seconds by phase.

    started/ended: epoch seconds around `ablate run`. A slot is one trial's share of a GPU; the study
    has `slots` of them (the most trials that ever ran at once) for its whole wall time. baseline: an
    `--alone` result; adds the efficiency.
    """
    from ablate.design import load_design

    design = load_design(study)
    record = tracking.StudyRecord.open(design.tracking_uri(), design.experiment, design.study.name)
    runs = record.runs()
    done = list(tracking.done_runs(runs).values())
    wall = ended - started
    tokens = sum(r.data.metrics.get("tokens", 0.0) for r in done)
    spans = [(r.info.start_time / 1e3, r.info.end_time / 1e3, tracking.tag(r, "gpu_ids", "")) for r in done]
    failed = failure_lines(runs)
    if not spans:
        return {"trials": len(runs), "completed": 0, "tokens": 0.0, "wall_s": wall, "failed": failed}
    slots = max(1, max(sum(1 for s, e, _ in spans if s <= start < e) for start, _, _ in spans))
    phase = {k: sum(r.data.metrics.get(f"{tracking.FINAL}time/{k}", 0.0) for r in done) for k in PHASES}
    slot_seconds = split_slot_seconds(spans, phase, slots, started, ended)
    trial_seconds = sorted(e - s for s, e, _ in spans)
    launch = launch_phases(record)
    per_gpu, peak = gpu_occupancy(spans)
    attempts = [
        (_process(r), s / 1e3, e / 1e3) for r in runs if (s := r.info.start_time) and (e := r.info.end_time)
    ]
    return {
        "trials": len(runs),
        "completed": len(done),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "steady_packed_tokens_per_s": steady_packed_rate(done, tokens, phase, slots),
        "training_at_once": training_at_once(training_spans(record, done)),
        "slots": slots,
        "slot_seconds": slot_seconds,
        "slot_share": {k: round(v / (slots * wall), 3) for k, v in slot_seconds.items()},
        "median_trial_s": trial_seconds[len(trial_seconds) // 2],
        "before_first_trial_s": before_first_trial(launch, started, *first_run_start(done)),
        "ray_shutdown_s": launch.get("ray_shutdown", (None, None))[0],
        "trials_per_gpu": per_gpu,
        "max_trials_at_once_per_gpu": peak,
        "devices": sorted({tracking.tag(r, "device", "?") for r in done}),
        "failed": failed,
        "processes": len({_process(r) for r in done}),
        "gaps_in_process": process_gaps(attempts),
        "gpus": len(per_gpu),
        "first_window_parts_s": first_window_parts(done),
        "compile_parts": compile_parts(done),
        **(efficiency(done, baseline, tokens, wall, len(per_gpu)) if baseline is not None else {}),
    }


def gpu_occupancy(spans: list[tuple[float, float, str]]) -> tuple[dict[str, int], dict[str, int]]:
    """Per GPU: how many trials ran on it, and the most that ran on it at once. spans: (start, end, gpu ids)."""
    per_gpu: dict[str, int] = {}
    peak: dict[str, int] = {}
    for start, _, gpus in spans:
        for gpu in gpus.split(","):
            per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
            at_once = sum(1 for s, e, g in spans if gpu in g.split(",") and s <= start < e)
            peak[gpu] = max(peak.get(gpu, 0), at_once)
    return per_gpu, peak


def split_slot_seconds(
    spans: list[tuple[float, float, str]], phase: dict[str, float], slots: int, started: float, ended: float
) -> dict[str, float]:
    """The study's slot-seconds (slots x wall time) by where they went, outside trials and inside them."""
    first, last = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
    in_trials = sum(e - s for s, e, _ in spans)
    return {
        "before_first_trial (Ray start, data, parent run)": slots * (first - started),
        "after_last_trial (summary, Ray shutdown)": slots * (ended - last),
        "between_trials (idle slots: actor start, scheduling, tail)": slots * (last - first) - in_trials,
        "trial_setup (data load, model, optimiser)": phase["setup_s"],
        "first_window (compilation, warm-up)": phase["first_window_s"],
        "training (steady)": phase["train_s"] - phase["first_window_s"],
        "evaluation": phase["eval_s"],
        "logging in the loop": phase["log_s"],
        "trial_other (MLflow run open/close, imports)": in_trials
        - sum(v for k, v in phase.items() if k != "first_window_s"),  # the first window is in train_s
    }


CACHE_EVENTS = ("fx_cache_hits", "fx_cache_misses", "aot_cache_hits", "aot_cache_misses")  # compile/<name>
COMPILE_PARTS = ("trace s (forward, dynamo)", "forward compile or load s", "backward compile or load s")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def first_window_parts(done: list) -> dict[str, float] | None:
    """The median trial's first window in parts (host seconds; train.FIRST_STEP_MARKS): step 1 (trace
    and compile, or their caches), steps 2-3 (CUDA-graph warm-up and capture), the window's other steps."""
    final = tracking.FINAL + "time/"
    timed = [r.data.metrics for r in done if final + "steps1_3_s" in r.data.metrics]
    if not timed:
        return None
    return {
        "step 1 (trace, compile or cache load)": _median([m[final + "step1_s"] for m in timed]),
        "steps 2-3 (graph warm-up, capture)": _median(
            [m[final + "steps1_3_s"] - m[final + "step1_s"] for m in timed]
        ),
        "the window's other steps": _median(
            [m[final + "first_window_s"] - m[final + "steps1_3_s"] for m in timed]
        ),
        "trials": len(timed),
    }


def compile_parts(done: list) -> dict[str, float] | None:
    """The median trial's compilation by torch's own account (train.compile_spent): dynamo's trace of the
    forward, the backend's forward compile or cache load, the backward's; and the cache events of all
    trials (inductor's FX graphs, AOTAutograd's)."""
    final = tracking.FINAL
    timed = [r.data.metrics for r in done if final + "time/compile_forward_s" in r.data.metrics]
    if not timed:
        return None
    forward, backend = final + "time/compile_forward_s", final + "time/compile_backend_s"
    trace, load, backward = COMPILE_PARTS
    return {
        trace: _median([m[forward] - m.get(backend, 0.0) for m in timed]),
        load: _median([m.get(backend, 0.0) for m in timed]),
        backward: _median([m.get(final + "time/compile_backward_s", 0.0) for m in timed]),
        **{name: int(sum(m.get(final + "compile/" + name, 0.0) for m in timed)) for name in CACHE_EVENTS},
        "trials": len(timed),
    }


def steady_packed_rate(done: list, tokens: float, phase: dict[str, float], slots: int) -> float | None:
    """All slots' steady training together: tokens after each trial's first window over their time.

    The time is the slots' steady seconds over the number of slots, as if every slot trained at once. In
    long trials they mostly do; in short ones a trial often trains while the others are in their first
    windows, and runs faster for it, so the figure overstates what packing gives (at 2M tokens per trial
    it read 3.65-4.47M tokens/s on an H200 whose one trial alone runs at 2.44M). Quote it for long trials."""
    steady_train = phase["train_s"] - phase["first_window_s"]
    if not steady_train:
        return None
    timed = [r for r in done if tracking.FINAL + "time/train_s" in r.data.metrics]
    return (tokens - sum(_first_window_tokens(r) for r in timed)) / (steady_train / slots)


def training_spans(
    record: tracking.StudyRecord, done: list
) -> dict[str, list[list[tuple[float, float, float]]]]:
    """Per GPU (the trials' gpu_ids tag), per trial: (start, end, tokens/s) of each training window after
    its first (which holds compilation, graph capture and warm-up), in epoch seconds.

    A window's line holds its tokens/s, measured over its training time alone (an evaluation inside it is
    paused out), and the tokens so far; the window is placed as that many seconds of training ending at
    its line, so an evaluation shows as a gap before it."""
    spans: dict[str, list[list[tuple[float, float, float]]]] = {}
    for run in done:
        rates = {(m.step, m.timestamp): m.value for m in record.metric_history(run, "tokens_per_s")}
        lines = sorted(  # the training windows' lines: an evaluation's line logs tokens but no rate
            (m.timestamp / 1e3, m.value, rates[m.step, m.timestamp])
            for m in record.metric_history(run, "tokens")
            if (m.step, m.timestamp) in rates
        )
        own = [
            (max(t0, t1 - (n1 - n0) / rate), t1, rate)
            for (t0, n0, _), (t1, n1, rate) in itertools.pairwise(lines)
            if n1 > n0 and rate > 0
        ]
        spans.setdefault(tracking.tag(run, "gpu_ids", "") or "", []).append(own)
    return spans


def training_at_once(spans: dict[str, list[list[tuple[float, float, float]]]]) -> dict[int, dict[str, float]]:
    """How many trials were training at once on a GPU, and how fast that GPU trained then.

    spans: `training_spans`. For each k, the GPU-seconds (summed over GPUs) in which k trials trained on a
    GPU, from its first span's start to its last span's end, and that GPU's tokens/s then. If one trial
    alone fills the GPU, the rate at k = 1, 2, 3 matches the rate at k = 4; a lower one mixes what the
    other trials' first windows, evaluations and set-up cost those that train beside them with which
    cells happened to train then (first windows are not spans, though their steps train). k = 0 is the
    time in which none trained.
    """
    seconds: dict[int, float] = {}
    tokens: dict[int, float] = {}
    for trials in spans.values():
        events = [
            (t, sign, sign * rate) for own in trials for s, e, rate in own for t, sign in ((s, 1), (e, -1))
        ]
        events.sort(key=lambda e: (e[0], e[1]))  # at one instant, ends before starts
        training, rate = 0, 0.0
        for (t, step, change), (t_next, _, _) in itertools.pairwise(events):
            training = training + step
            rate = rate + change if training else 0.0  # no drift left where none trains
            if t_next > t:
                seconds[training] = seconds.get(training, 0.0) + (t_next - t)
                tokens[training] = tokens.get(training, 0.0) + max(rate, 0.0) * (t_next - t)
    return {k: {"seconds": seconds[k], "tokens_per_s": tokens[k] / seconds[k]} for k in sorted(seconds)}


def per_gpu_efficiency(tokens: float, wall: float, gpus: int, alone_tokens_per_s: float) -> float:
    """A study's tokens/s per GPU over one trial's tokens/s alone."""
    return tokens / wall / max(gpus, 1) / alone_tokens_per_s


def efficiency(done: list, baseline: dict, tokens: float, wall: float, gpus: int = 1) -> dict:
    """The study's efficiency against an `--alone` baseline, per GPU the study used (a trial alone has
    one GPU; a study on two that keeps both as busy as one trial alone keeps one has efficiency 1)."""
    ideal = alone_seconds(done, baseline)
    per_gpu = (
        ideal / wall / max(gpus, 1)
        if ideal
        else per_gpu_efficiency(tokens, wall, gpus, baseline["alone_tokens_per_s"])
    )
    return {
        "alone_tokens_per_s": baseline["alone_tokens_per_s"],
        "alone_mode": baseline.get("mode", "the study's settings"),
        "alone_seconds": ideal,  # None when the baseline has no rate for some finished trial's class
        "efficiency": per_gpu,
    }


def failure_lines(runs: list) -> list[str]:
    """One line per trial that ended failed: "<cell> seed=<s> (<host>:<pid>): <the error>"."""

    lines = []
    for run in tracking.results_runs(runs).values():
        if tracking.status_of(run) == "failed":
            where = f"{tracking.tag(run, 'cell')} seed={tracking.tag(run, 'seed')} ({_process_text(run)})"
            lines.append(f"{where}: {tracking.error_line(run)}")
    return lines


def _process_text(run) -> str:
    """Where an attempt ran: host:pid, the how-many-th trial of that process, which attempt."""
    host, pid = _process(run)
    where = [f"{host}:{pid}" if pid else "no process recorded"]
    if tracking.tag(run, "process_trial"):
        where.append(f"trial {tracking.tag(run, 'process_trial')} of its process")
    if tracking.tag(run, "attempt"):
        where.append(f"attempt {tracking.tag(run, 'attempt')}")
    return ", ".join(where)


def alone_seconds(runs: list, baseline: dict) -> float | None:
    """Seconds the finished trials would take one after another, each alone at its class's rate."""
    factors, classes = baseline.get("factors"), baseline.get("by_class")
    if not factors or not classes:
        return None
    total = 0.0
    for run in runs:
        levels = {f: run.data.params.get(f"factor.{f}", "") for f in factors}
        label = class_label(factors, levels)
        if label not in classes:
            return None
        total += run.data.metrics.get("tokens", 0.0) / classes[label]["tokens_per_s"]
    return total


def launch_phases(record: tracking.StudyRecord) -> dict[str, tuple[float, float]]:
    """The parent run's `study/time/<phase>_s` metrics: phase -> (seconds, epoch seconds it ended)."""
    phases = {}
    for key in record.parent.data.metrics:
        if key.startswith("study/time/") and key.endswith("_s"):
            last = record.parent_metric_history(key)[-1]
            phases[key.removeprefix("study/time/").removesuffix("_s")] = (last.value, last.timestamp / 1e3)
    return phases


def first_run_start(done: list) -> tuple[float, dict[str, float]]:
    """When the first trial's run opened (epoch seconds), and the marks its worker process's start left
    on it (`ablate.trial`: module_imported, trial_called, train_imported; none from older runs)."""
    first = min(done, key=lambda r: r.info.start_time)
    marks = {
        key.removeprefix(tracking.START): value
        for key, value in first.data.metrics.items()
        if key.startswith(tracking.START)
    }
    return first.info.start_time / 1e3, marks


def before_first_trial(
    phases: dict[str, tuple[float, float]],
    started: float,
    first: float,
    marks: dict[str, float] | None = None,
) -> dict:
    """Wall seconds from launching `ablate run` to the first trial's run, by phase; with the first trial's
    worker marks (first_run_start), the wait in Tune is split by what its worker process was doing."""
    if not {"store", "tune"} <= phases.keys():
        return {}
    store_s, store_end = phases["store"]
    tune_s, tune_end = phases["tune"]
    split = {"process start, imports, checks": store_end - store_s - started, "MLflow store (read)": store_s}
    labels = {"ray_start": "Ray start", "parent": "store, parent run", "data": "data preparation"}
    # a phase that ran beside one before it in this order (the store, parent run and data while a local
    # Ray starts) counts only for the seconds that one did not cover
    covered: list[tuple[float, float]] = []
    counted = 0.0
    for name, label in labels.items():
        if name not in phases:
            continue
        seconds, end = phases[name]
        own = seconds - sum(max(0.0, min(end, b) - max(end - seconds, a)) for a, b in covered)
        split[label if own >= seconds - 0.005 else f"{label}, beyond what ran beside it"] = own
        covered, counted = _merged([*covered, (end - seconds, end)]), counted + own
    # the driver's own work between those phases, so that the split adds up to the whole wait
    split["between phases"] = (tune_end - tune_s) - store_end - counted
    tune_started = tune_end - tune_s
    steps = ("module_imported", "trial_called", "train_imported")
    if marks and all(tune_started <= marks.get(m, -1) <= first for m in steps):
        split["Tune to the worker's trial code (actor process start, Ray and MLflow imports)"] = (
            marks["module_imported"] - tune_started
        )
        split["worker: the trial handed over (Tune's setup and step)"] = (
            marks["trial_called"] - marks["module_imported"]
        )
        split["worker: imports of the training code (torch, model, kernels)"] = (
            marks["train_imported"] - marks["trial_called"]
        )
        split["worker: opening the trial's run (config, earlier attempts, device)"] = (
            first - marks["train_imported"]
        )
    else:
        split["Tune to the first trial's run (actors start, import, open runs)"] = first - tune_started
    return {k: round(v, 2) for k, v in split.items()}


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of time spans, as disjoint spans in order."""
    out: list[tuple[float, float]] = []
    for begin, end in sorted(spans):
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def process_gaps(spans: list[tuple[object, float, float]]) -> dict[str, float | int] | None:
    """Seconds a worker process sat between the end of one trial and the start of its next.

    spans: (process key, start, end) of every trial run, in any order. Returns the count, median and
    maximum, and the mean over the first and the second half of the study (by start time), which
    shows whether the gap grows as the study goes on; None when no process ran two trials.
    """
    by_process: dict[object, list[tuple[float, float]]] = {}
    for key, start, end in spans:
        by_process.setdefault(key, []).append((start, end))
    gaps = []  # (start of the later trial, gap)
    for trials in by_process.values():
        trials.sort()
        gaps += [(later[0], later[0] - earlier[1]) for earlier, later in itertools.pairwise(trials)]
    if not gaps:
        return None
    gaps.sort()
    values = sorted(g for _, g in gaps)
    half = len(gaps) // 2
    first, second = [g for _, g in gaps[:half]], [g for _, g in gaps[half:]]
    return {
        "count": len(values),
        "median_s": values[len(values) // 2],
        "max_s": values[-1],
        "first_half_mean_s": sum(first) / len(first) if first else None,
        "second_half_mean_s": sum(second) / len(second),
    }


def _process(run) -> tuple[str | None, str | None]:
    """The worker process that ran a trial: (host, pid)."""
    return tracking.tag(run, "host"), tracking.tag(run, "pid")


def _first_window_tokens(run) -> float:
    """Tokens a trial trained in its first logging window (which includes its warm-up)."""
    params, steps = run.data.params, run.data.metrics.get(tracking.FINAL + "steps", 0.0)
    window = min(float(params["train.log_every"]), steps)
    return window * float(params["train.batch_size"]) * float(params["model.context"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("study", type=Path)
    parser.add_argument(
        "--gpu", type=float, default=None, help="per-trial GPU fraction (default: the study's)"
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="per-trial token budget (default: the study's)"
    )
    parser.add_argument("--alone", action="store_true", help="measure one trial alone per class of cells")
    parser.add_argument(
        "--alone-factors",
        default=None,
        help="with --alone: comma-separated factors whose level combinations are measured (default: all)",
    )
    parser.add_argument(
        "--eager", action="store_true", help="with --alone: compile and CUDA graphs off (the eager baseline)"
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="an --alone result (JSON): adds the study efficiency"
    )
    add_copy_options(parser)
    parser.add_argument("--timeout", type=float, default=None, help="stop the study after this many seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    baseline = None
    if args.baseline is not None:  # read first: a bad file should not cost a whole study run
        try:
            baseline = json.loads(args.baseline.read_text())
            baseline["alone_tokens_per_s"] = float(baseline["alone_tokens_per_s"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"--baseline {args.baseline}: not an --alone result ({err})") from None
    study = args.study
    if any(x is not None for x in (args.gpu, args.tokens, args.mps, args.cpu)) or args.fixed:
        study = variant(args.study, args.gpu, args.tokens, args.mps, args.fixed, args.cpu)
    if args.alone:
        factors = args.alone_factors.split(",") if args.alone_factors else None
        result = measure_alone(study, factors, eager=args.eager)
    else:
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "ablate.cli", "run", str(study), "--fresh"])
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:  # stop the study the way Ctrl-C does; summarise what finished
            proc.send_signal(signal.SIGINT)
            code = proc.wait()
        ended = time.time()
        result = {"study": str(study), "exit": code, **summarize(study, started, ended, baseline)}
    for line in result.get("failed", []):
        print(f"failed: {line}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
