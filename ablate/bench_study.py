"""How well a study uses its GPUs: `python -m ablate.bench_study STUDY [--gpu F] [--alone]`.

Study efficiency = (total tokens trained / study wall time) / (steady tokens/s of one trial alone on
the same GPU). `--alone` measures the denominator: one trial per metric, in this process, on GPU 0.
Without it, the study is run through `ablate run` (a fresh parent run, with `--gpu` overriding the
per-trial GPU fraction) and the MLflow record is summarised: tokens, wall time, where the time went,
which GPU each trial ran on and the most trials any GPU held at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def measure_alone(study: Path) -> dict:
    from ablate.bench import steady_median
    from ablate.config import RunConfig, from_dict
    from ablate.design import load_design
    from ablate.logger import RecordingLogger
    from ablate.train import train

    design = load_design(study)
    rates = {}
    for trial in design.trials:
        levels = trial.cell.levels
        if (
            levels.get("position") != "rope"
            or levels.get("registers") != "0"
            or levels.get("metric") in rates
        ):
            continue
        if levels.get("gamma_schedule", "constant") != "constant":
            continue
        log = RecordingLogger()
        train(from_dict(RunConfig, trial.tree), log)
        rates[levels["metric"]] = steady_median(log, "tokens_per_s")
    return {"alone_tokens_per_s": sum(rates.values()) / len(rates), "by_metric": rates}


def variant(study: Path, gpu: float) -> Path:
    """A copy of the study with another per-trial GPU fraction (its own name and output folder)."""
    tree = yaml.safe_load(study.read_text())
    tag = str(gpu).replace(".", "p")
    tree["name"] = f"{tree['name']}_gpu{tag}"
    tree["resources"] = {**tree.get("resources", {}), "gpu": gpu}
    tree["tracking"] = {**tree.get("tracking", {}), "experiment": tree["name"]}
    path = study.parent / f"runs/{tree['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def summarize(study: Path, wall: float) -> dict:
    from ablate import tracking
    from ablate.design import load_design

    design = load_design(study)
    client = tracking.MlflowClient(design.tracking_uri())
    experiment = client.get_experiment_by_name(design.experiment)
    parent = tracking.find_parent(client, experiment.experiment_id, design.study.name)
    runs = tracking.child_runs(client, experiment.experiment_id, parent.info.run_id) if parent else []
    done = list(tracking.done_runs(runs).values())
    tokens = sum(r.data.metrics.get("tokens", 0.0) for r in done)
    spans = [
        (r.info.start_time / 1e3, r.info.end_time / 1e3, r.data.tags.get("ablate.gpu_ids", "")) for r in done
    ]
    first_start = min(s for s, _, _ in spans)
    per_gpu: dict[str, int] = {}
    peak: dict[str, int] = {}
    for start, _, gpus in spans:
        for gpu in gpus.split(","):
            per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
            at_once = sum(1 for s, e, g in spans if gpu in g.split(",") and s <= start < e)
            peak[gpu] = max(peak.get(gpu, 0), at_once)
    trial_seconds = sorted(e - s for s, e, _ in spans)
    return {
        "trials": len(runs),
        "completed": len(done),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "first_trial_after_s": first_start - (parent.info.start_time / 1e3) if parent else None,
        "median_trial_s": trial_seconds[len(trial_seconds) // 2],
        "trials_per_gpu": per_gpu,
        "max_trials_at_once_per_gpu": peak,
        "devices": sorted({r.data.tags.get("ablate.device", "?") for r in done}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("study", type=Path)
    parser.add_argument(
        "--gpu", type=float, default=None, help="per-trial GPU fraction (default: the study's)"
    )
    parser.add_argument("--alone", action="store_true", help="measure one trial alone per metric")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.alone:
        result = measure_alone(args.study)
    else:
        study = variant(args.study, args.gpu) if args.gpu is not None else args.study
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ablate.cli", "run", str(study), "--fresh"], check=False)
        wall = time.perf_counter() - started
        result = {"study": str(study), "exit": proc.returncode, **summarize(study, wall)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
