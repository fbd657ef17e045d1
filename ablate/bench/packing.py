"""Trials per GPU: `python -m ablate.bench.packing --processes 1,2,4 [--mps]`.

Runs K copies of one `ablate.bench.throughput` row at once on one GPU, as K trials of a study packed onto it
(`resources.gpu: 1/K`) would, and prints the aggregate steady tokens/s for each K. The compile caches
are warmed by one run first, so the K copies start training within seconds of each other; each copy's
steady rate is its median over logging windows after the first two, measured while the others run.
With `--mps` the copies run under an NVIDIA MPS control daemon started for this command alone (its own
pipe and log directories; stopped at the end), so their kernels can share the GPU's multiprocessors
instead of time-slicing it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ablate import mps


def bench_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ablate.bench.throughput",
        "--variants",
        args.variant,
        "--metrics",
        args.metric,
        "--vocab",
        str(args.vocab),
        "--steps",
        str(args.steps),
        "--cells",
        args.cell,
        "--out",
        str(out),
    ]


def run_copies(args: argparse.Namespace, k: int, work: Path, env: dict) -> list[dict]:
    """K concurrent copies of the bench row; their result rows."""
    outs = [work / f"k{k}-{i}.json" for i in range(k)]
    procs = [
        subprocess.Popen(bench_command(args, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a bench copy failed (exit {proc.returncode}):\n{err.decode()[-2000:]}")
    return [json.loads(out.read_text())[0] for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", default="1,2,4", help="comma-separated copies per GPU")
    parser.add_argument("--mps", action="store_true", help="run the copies under NVIDIA MPS")
    parser.add_argument("--metric", default="sdpa")
    parser.add_argument("--variant", default="fused+graphs")
    parser.add_argument(
        "--cell", default="position=rope", help="model settings, as ablate.bench.throughput --cells"
    )
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    counts = sorted({1, *(int(k) for k in args.processes.split(","))})  # 1: the baseline of every ratio
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            daemon = mps.start_daemon(work) if args.mps else None
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        env = mps.client_env(daemon) if daemon else dict(os.environ)
        try:
            run_copies(args, 1, work, env)  # warm the compile caches
            rows = [(k, run_copies(args, k, work, env)) for k in counts]
        finally:
            if daemon:
                mps.stop_daemon(daemon)
    label = f"{args.metric} {args.cell} {args.variant}, vocab {args.vocab}, {'MPS' if args.mps else 'no MPS'}"
    print(f"\n{label}\n\n| trials on the GPU | each (tokens/s) | aggregate | vs one |\n|---|---|---|---|")
    one = sum(r["tokens_per_s"] for r in rows[0][1])  # counts start at 1
    for k, results in rows:
        total = sum(r["tokens_per_s"] for r in results)
        each = "/".join(f"{r['tokens_per_s'] / 1e6:.2f}M" for r in results)
        print(f"| {k} | {each} | {total / 1e6:.2f}M | {total / one:.2f}x |")


if __name__ == "__main__":
    main()
