"""Trials per GPU: `python -m ablate.bench.packing --processes 1,2,4 [--mps]`.

Runs K copies of one `ablate.bench.throughput` row at once on one GPU, as K trials of a study packed onto it
(`resources.gpu: 1/K`) would, and prints the aggregate steady tokens/s for each K. The compile caches
are warmed by one run first, so the K copies start training within seconds of each other. Each copy's
steady rate is its median over the logging windows that lie wholly in the seconds when every copy was
past its first two windows (the overlap, printed): a copy that started late or ended early and trained
alone for part of its run would otherwise count its faster windows as packed ones. Too few steps for
an overlap is an error that says so.
With `--mps` the copies run under an NVIDIA MPS control daemon started for this command alone (its own
pipe and log directories; stopped at the end), so their kernels can share the GPU's multiprocessors
instead of time-slicing it. `--thread-percentage 100,50` runs every K > 1 once per value of
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, the share of the GPU's multiprocessors each client may use (100 is
MPS's default); the one-copy baseline always has the whole GPU.
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
    parser.add_argument(
        "--thread-percentage",
        default="100",
        help="with --mps: comma-separated CUDA_MPS_ACTIVE_THREAD_PERCENTAGE values (1-100) to run each K > 1 at",
    )
    args = parser.parse_args()
    counts = sorted({1, *(int(k) for k in args.processes.split(","))})  # 1: the baseline of every ratio
    shares = thread_shares(args.thread_percentage, args.mps)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            daemon = mps.start_daemon(work) if args.mps else None
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        env = mps.client_env(daemon) if daemon else dict(os.environ)
        try:
            run_copies(args, 1, work, env)  # warm the compile caches
            rows = [(1, 100, run_copies(args, 1, work, env))]
            for k in counts[1:]:
                for share in shares:
                    rows.append((k, share, run_copies(args, k, work, with_share(env, share))))
        finally:
            if daemon:
                mps.stop_daemon(daemon)
    label = f"{args.metric} {args.cell} {args.variant}, vocab {args.vocab}, {'MPS' if args.mps else 'no MPS'}"
    print(f"\n{label}\n")
    print(
        "| trials on the GPU | SMs per trial (MPS) | each (tokens/s) | aggregate | vs one | all training |\n"
        "|---|---|---|---|---|---|"
    )
    measured = [(k, share, *overlapped(results)) for k, share, results in rows]
    one = sum(measured[0][2])  # counts start at 1
    for k, share, rates, seconds in measured:
        each = "/".join(f"{r / 1e6:.2f}M" for r in rates)
        sms = f"{share}%" if args.mps else "-"
        print(
            f"| {k} | {sms} | {each} | {sum(rates) / 1e6:.2f}M | {sum(rates) / one:.2f}x | {seconds:.1f} s |"
        )


def overlapped(results: list[dict]) -> tuple[list[float], float]:
    """Each copy's median tokens/s over its steady windows (`ablate.bench.throughput.steady_windows`)
    that lie wholly in the seconds when every copy was in steady training, and how long that was."""
    too_short = SystemExit(
        f"{len(results)} copies: a copy has no logging window in the seconds when all of them trained at "
        "once; run more --steps"
    )
    if not all(r["windows"] for r in results):
        raise too_short
    start = max(r["windows"][0][0] for r in results)
    end = min(r["windows"][-1][1] for r in results)
    rates = []
    for r in results:
        inside = sorted(rate for s, e, rate in r["windows"] if s >= start and e <= end)
        if not inside:
            raise too_short
        rates.append(inside[len(inside) // 2])
    return rates, end - start


def thread_shares(text: str, under_mps: bool) -> list[int]:
    """The --thread-percentage values, checked: integers 1-100, and other than 100 only with --mps."""
    try:
        shares = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--thread-percentage takes integers 1-100, comma-separated; got {text!r}") from None
    if not shares or any(not 1 <= v <= 100 for v in shares):
        raise SystemExit(f"--thread-percentage takes integers 1-100, comma-separated; got {text!r}")
    if shares != [100] and not under_mps:
        raise SystemExit("--thread-percentage limits MPS clients; it needs --mps")
    return shares


def with_share(env: dict, share: int) -> dict:
    """`env` with each MPS client limited to `share` percent of the multiprocessors (100: MPS's default)."""
    env = {k: v for k, v in env.items() if k != mps.THREADS}
    if share != 100:
        env[mps.THREADS] = str(share)
    return env


if __name__ == "__main__":
    main()
