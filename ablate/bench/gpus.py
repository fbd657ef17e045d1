"""One GPU against every GPU of this host, for one study, in one command:

    python -m ablate.bench.gpus STUDY [--tokens N] [--gpu F] [--warm-tokens N] [--timeout S] [--out F]

Runs the study through `python -m ablate.bench.study` (that is, `ablate run --fresh`) twice: first with
`CUDA_VISIBLE_DEVICES` set to the first GPU, then on every GPU, and prints the two records side by side:
trials finished, tokens, wall time, the aggregate tokens/s, the trials each GPU ran and the most it held
at once, and the wait before the first trial; then the ratio of the two aggregate rates.

`--warm-tokens N` first runs every cell once for N tokens on every GPU, outside both measurements, so
that neither side pays for compiling a cell the first time (trials share inductor's on-disk caches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [g for g in named.split(",") if g.strip()]
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True
    )
    return out.stdout.split() if out.returncode == 0 else []


def bench(study: Path, gpus: list[str], args: argparse.Namespace, tokens: int | None) -> dict:
    """One `bench_study` run of the study on these GPUs; its summary (JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        command = [sys.executable, "-m", "ablate.bench.study", str(study), "--out", str(out)]
        if tokens is not None:
            command += ["--tokens", str(tokens)]
        if args.gpu is not None:
            command += ["--gpu", str(args.gpu)]
        if args.timeout is not None:
            command += ["--timeout", str(args.timeout)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL)
        if not out.exists():
            raise SystemExit(
                f"bench_study on GPUs {','.join(gpus)} wrote no summary (exit {done.returncode})"
            )
        return json.loads(out.read_text())


def side(summary: dict) -> dict:
    """The figures compared between the two runs."""
    return {
        "trials finished": summary["completed"],
        "tokens": summary["tokens"],
        "wall s": summary["wall_s"],
        "aggregate tokens/s": summary["aggregate_tokens_per_s"],
        "trials per GPU": summary["trials_per_gpu"],
        "most trials on a GPU at once": summary["max_trials_at_once_per_gpu"],
        "before the first trial s": sum(summary["before_first_trial_s"].values()),
        "failed": len(summary.get("failed", [])),
        "worker processes": summary.get("processes"),
    }


def show(one: dict, every: dict, n_gpus: int, console: Console) -> float:
    """Print the two sides and return the ratio of their aggregate rates."""
    table = Table(title=f"one GPU against {n_gpus} GPUs")
    table.add_column("")
    table.add_column("1 GPU", justify="right")
    table.add_column(f"{n_gpus} GPUs", justify="right")
    a, b = side(one), side(every)
    for key in a:
        table.add_row(key, _text(a[key]), _text(b[key]))
    console.print(table)
    ratio = b["aggregate tokens/s"] / a["aggregate tokens/s"] if a["aggregate tokens/s"] else float("nan")
    console.print(f"aggregate tokens/s, {n_gpus} GPUs over 1: {ratio:.2f}x")
    return ratio


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if value < 1e4 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in sorted(value.items()))
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", type=Path)
    parser.add_argument(
        "--tokens", type=int, default=None, help="per-trial token budget (default: the study's)"
    )
    parser.add_argument(
        "--gpu", type=float, default=None, help="per-trial GPU fraction (default: the study's)"
    )
    parser.add_argument(
        "--warm-tokens", type=int, default=None, help="first run every cell for this many tokens"
    )
    parser.add_argument("--timeout", type=float, default=None, help="stop each run after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="write both summaries and the ratio (JSON)")
    args = parser.parse_args()
    if not args.study.is_file():
        raise SystemExit(f"{args.study}: no such study file")
    gpus = visible_gpus()
    if len(gpus) < 2:
        raise SystemExit(f"this host shows {len(gpus)} GPU(s); the comparison needs two or more")
    console = Console()
    if args.warm_tokens is not None:
        console.print(
            f"warming the compile caches: every cell for {args.warm_tokens:,} tokens on {len(gpus)} GPUs"
        )
        bench(args.study, gpus, args, args.warm_tokens)
    console.print(f"1 GPU ({gpus[0]}) ...")
    one = bench(args.study, gpus[:1], args, args.tokens)
    console.print(f"{len(gpus)} GPUs ({','.join(gpus)}) ...")
    every = bench(args.study, gpus, args, args.tokens)
    ratio = show(one, every, len(gpus), console)
    if args.out:
        args.out.write_text(json.dumps({"one_gpu": one, "every_gpu": every, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
