"""Benchmark: analysis and full report for 1000 simulated trials of the RBF replication design.

    python -m ablate.bench.analysis [--trials 1000] [--points 20]

The last seed is cut short to reach exactly --trials, so the design is unbalanced (Type III path).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from ablate.analysis import analyze
from ablate.analysis.simulate import replication_study, simulate_curves, simulate_trials
from ablate.report import write_report

FACTORS = ["metric", "position", "registers", "register_init"]
COMPARISON = "paper: metric=sdpa,position=rope,registers=0 -> metric=rbf,position=susie,registers=1,register_init=zeros"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--points", type=int, default=20, help="points per loss curve")
    args = parser.parse_args()
    study = replication_study()
    rng = np.random.default_rng(0)
    n_seeds = math.ceil(args.trials / len(study.factor_space().cells()))
    trials = simulate_trials(study, n_seeds, rng).iloc[: args.trials]
    curves = simulate_curves(trials, args.points, rng)
    start = time.perf_counter()
    analysis = analyze(
        trials,
        FACTORS,
        "val_loss",
        comparisons=[COMPARISON],
        secondary=["sink_mass", "key_norm_mean"],
        vocab_size=50_257,
    )
    analyzed = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        written = write_report(analysis, Path(folder), curves=curves, title="Benchmark")
        size = written["report.html"].stat().st_size / 1e6
    done = time.perf_counter()
    print(f"{len(trials)} trials, {n_seeds} seeds, {len(curves)} curve points")
    print(f"analyze:      {analyzed - start:6.1f} s")
    print(f"write_report: {done - analyzed:6.1f} s  ({len(written)} files, report.html {size:.1f} MB)")
    print(f"total:        {done - start:6.1f} s")


if __name__ == "__main__":
    main()
