"""One GPU against every GPU of this host, for one study, in one command:

    python -m ablate.bench.gpus STUDY [--tokens N] [--gpu F] [--mps M] [--cpu N] [--fixed K=V]
                                      [--warm-tokens N] [--alone-factors F] [--alone-tokens N]
                                      [--no-alone-eager]
                                      [--also gpu=F,cpu=N,mps=M,K=V ...] [--timeout S] [--out F]

Runs the study through `python -m ablate.bench.study` (that is, `ablate run --fresh`) twice: first with
`CUDA_VISIBLE_DEVICES` set to the first GPU, then on every GPU, and prints the two records side by side:
trials finished, tokens, wall time, the aggregate tokens/s (in all and per GPU), the trials each GPU ran
and the most it held at once against what the study's per-trial GPU share allows, the wait before the
first trial, and where the slots' time went; then the ratio of the two aggregate rates. On a host of
one GPU (or with `CUDA_VISIBLE_DEVICES` naming one) it runs and prints the one-GPU side alone, so that a
study's efficiency against one trial alone also comes from one command there.

`--warm-tokens N` first runs every cell once for N tokens on every GPU, outside both measurements, so
that neither side pays for compiling a cell the first time (trials share inductor's on-disk caches); it
runs again with each `--also` side's fixed settings or CPUs per trial that differ, so that each side finds
its own code compiled (`train.precompile` saves a step that a traced trial does not read, and the reverse;
the CPUs set torch's thread count, which a saved step's name includes).
`--alone-factors F` measures one trial alone per class of cells (the levels of the factors F) on the
first GPU, with the study's settings (for a study on the fast path, the fastest configuration) and
eager, and adds each side's efficiency per GPU against both; `--no-alone-eager` leaves the eager one
out (with every factor a class, an eager trial per cell costs more than the study).
`--also gpu=F,cpu=N,mps=M,SECTION.KEY=V` (repeatable) runs the one-GPU side again with another per-trial
GPU share, CPUs per trial, MPS setting or fixed setting, after the first and against the same baseline,
so that trials per GPU with and without MPS, or with and without `train.reuse_compiled`, are compared in
one command.
`--no-one-gpu` leaves the one-GPU side out on a host of several GPUs and measures every GPU against the
trials alone only: for a study too long to run twice in one sitting (the per-GPU efficiency still comes
from one command).
`--out F` is rewritten after each stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ablate.bench.study import (
    CACHE_EVENTS,
    COMPILE_PARTS,
    MPS_SETTINGS,
    add_copy_options,
    cpus_per_trial,
    per_gpu_efficiency,
)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [g for g in named.split(",") if g.strip()]
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True
    )
    return out.stdout.split() if out.returncode == 0 else []


def bench(study: Path, gpus: list[str], args: argparse.Namespace, tokens: int | None, *extra: str) -> dict:
    """One `bench.study` run on these GPUs (extra: its further arguments, e.g. --alone); its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        command = [sys.executable, "-m", "ablate.bench.study", str(study), "--out", str(out), *extra]
        if tokens is not None:
            command += ["--tokens", str(tokens)]
        if args.gpu is not None:
            command += ["--gpu", str(args.gpu)]
        if args.mps is not None:
            command += ["--mps", args.mps]
        if args.cpu is not None:
            command += ["--cpu", str(args.cpu)]
        for setting in args.fixed:
            command += ["--fixed", setting]
        if args.timeout is not None and "--alone" not in extra:
            command += ["--timeout", str(args.timeout)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL)
        if not out.exists():
            raise SystemExit(
                f"bench.study {' '.join(extra)} on GPUs {','.join(gpus)} wrote no summary "
                f"(exit {done.returncode})"
            )
        return json.loads(out.read_text())


def measured(summary: dict, where: str) -> dict:
    """The summary of a study run in which trials finished; else a clear stop with its errors."""
    if not summary.get("completed"):
        lines = "\n".join(summary.get("failed", [])[:5])
        raise SystemExit(f"no trial finished on {where} (exit {summary.get('exit')})\n{lines}".rstrip())
    return summary


def study_resources(study: Path):
    """The study file's `resources`, with the study spec's defaults (what a run without --gpu or --cpu
    asks for)."""
    import yaml

    from ablate.spec import Resources

    return Resources.model_validate(yaml.safe_load(study.read_text()).get("resources") or {})


def allowed_per_gpu(study: Path, gpu: float | None) -> int:
    """The most trials a GPU may hold at once under the study's (or --gpu's) per-trial GPU share."""
    share = gpu if gpu is not None else study_resources(study).gpu
    return math.floor(1 / share + 1e-9) if share else 0


def side(summary: dict, alone: dict[str, float]) -> dict:
    """The figures compared between the two runs. alone: mode -> one trial's tokens/s alone."""
    gpus = max(summary.get("gpus") or len(summary["trials_per_gpu"]), 1)
    per_gpu = summary["aggregate_tokens_per_s"] / gpus
    figures = {
        "trials finished": summary["completed"],
        "tokens": summary["tokens"],
        "wall s": summary["wall_s"],
        "aggregate tokens/s": summary["aggregate_tokens_per_s"],
        "aggregate tokens/s per GPU": per_gpu,
        "trials per GPU": summary["trials_per_gpu"],
        "most trials on a GPU at once": summary["max_trials_at_once_per_gpu"],
        "before the first trial s": sum(summary["before_first_trial_s"].values()),
        "failed": len(summary.get("failed", [])),
        "worker processes": summary.get("processes"),
    }
    for mode, rate in alone.items():
        figures[f"per GPU over one trial alone ({mode})"] = per_gpu_efficiency(
            summary["tokens"], summary["wall_s"], gpus, rate
        )
    if parts := summary.get("first_window_parts_s"):
        figures["first window, median trial: step 1 / steps 2-3 / other steps s"] = " / ".join(
            f"{v:.2f}" for k, v in parts.items() if k != "trials"
        )
    if compiled := summary.get("compile_parts"):
        figures["compile, median trial: trace / forward / backward s"] = " / ".join(
            f"{compiled[k]:.2f}" for k in COMPILE_PARTS
        )
        figures["compile caches, all trials: FX hits / misses, AOT hits / misses"] = " / ".join(
            str(compiled[k]) for k in CACHE_EVENTS
        )
    for phase, share in (summary.get("slot_share") or {}).items():
        figures[f"slot time: {phase}"] = f"{share:.1%}"
    if at_once := summary.get("training_at_once"):
        total = sum(v["seconds"] for v in at_once.values()) or 1.0
        for k, v in sorted(at_once.items(), key=lambda kv: -int(kv[0])):  # JSON keys are text
            figures[f"{k} training at once: share of the time, tokens/s per GPU"] = (
                f"{v['seconds'] / total:.1%}, {v['tokens_per_s'] / 1e6:.2f}M"
            )
    return figures


def show(
    one: dict | None,
    every: dict | None,
    n_gpus: int,
    console: Console,
    alone: dict[str, float] | None = None,
    also: list[tuple[str, dict]] | None = None,
) -> float | None:
    """Print the sides (one GPU; each `--also` variant on one GPU; every GPU) and return the ratio of the
    every-GPU side's aggregate rate to the one-GPU side's (None without one of the two)."""
    columns = [
        *([("1 GPU", one)] if one is not None else []),
        *(also or []),
        *([(f"{n_gpus} GPUs", every)] if every is not None else []),
    ]
    title = (
        "one GPU" if every is None else f"{n_gpus} GPUs" if one is None else f"one GPU against {n_gpus} GPUs"
    )
    table = Table(title=title)
    table.add_column("")
    for label, _ in columns:
        table.add_column(label, justify="right")
    figures = [side(summary, alone or {}) for _, summary in columns]
    keys = dict.fromkeys(k for f in figures for k in f)  # every side's rows, the first side's order first
    for key in keys:
        table.add_row(key, *(_text(f.get(key, "")) for f in figures))
    console.print(table)
    if one is None:
        return None
    first = figures[0]["aggregate tokens/s"]
    for (label, _), f in zip(columns[1:], figures[1:], strict=True):
        ratio = f["aggregate tokens/s"] / first if first else float("nan")
        console.print(f"aggregate tokens/s, {label} over 1 GPU: {ratio:.2f}x")
    if every is None:
        return None
    return figures[-1]["aggregate tokens/s"] / first if first else float("nan")


def also_sides(specs: list[str]) -> list[dict]:
    """`--also` specs ("gpu=1", "gpu=0.125,cpu=2", "gpu=0.25,mps=true", "train.reuse_compiled=true") as
    the settings of further one-GPU runs: gpu, cpu, mps and fixed settings (SECTION.KEY=VALUE); a bad
    one stops with what is allowed."""
    sides = []
    for spec in specs:
        settings = dict(item.partition("=")[::2] for item in spec.split(",") if item)
        fixed = [f"{k}={v}" for k, v in settings.items() if "." in k.strip(".") and v]
        bad = [k for k in settings if k not in ("gpu", "cpu", "mps") and f"{k}={settings[k]}" not in fixed]
        gpu, cpu, mps = settings.get("gpu"), settings.get("cpu"), settings.get("mps")
        try:
            share = None if gpu is None else float(gpu)
        except ValueError:
            share = -1.0
        try:
            cpus = None if cpu is None else cpus_per_trial(cpu)
        except argparse.ArgumentTypeError:
            cpus = 0  # refused below
        if (
            bad
            or not settings
            or (share is not None and not 0 < share <= 1)
            or cpus == 0
            or mps not in (None, *MPS_SETTINGS)
        ):
            raise SystemExit(
                f"--also {spec!r}: expected gpu=F (0 < F <= 1), cpu=N (N > 0), mps=true|false|auto "
                "and/or SECTION.KEY=VALUE settings, comma-separated"
            )
        sides.append({"gpu": share, "cpu": cpus, "mps": mps, "fixed": fixed})
    return sides


def placement_lines(summary: dict, allowed: int) -> list[str]:
    """Whether each GPU held at most `allowed` trials at once, from the trials' MLflow records."""
    return [
        f"GPU {gpu}: {summary['trials_per_gpu'].get(gpu, 0)} trials, at most {peak} at once "
        f"(the study allows {allowed}): {'ok' if peak <= allowed else 'OVER'}"
        for gpu, peak in sorted(summary["max_trials_at_once_per_gpu"].items())
    ]


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 10 else f"{value:,.1f}" if value < 1e4 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in sorted(value.items()))
    return str(value)


def parse_args() -> tuple[argparse.Namespace, list[dict]]:
    """The command line, checked before anything runs; with the `--also` sides parsed."""
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
    parser.add_argument(
        "--alone-factors",
        default=None,
        help="also measure one trial alone per class of these factors' levels (comma-separated)",
    )
    parser.add_argument(
        "--alone-tokens",
        type=int,
        default=None,
        help="with --alone-factors: the token budget of each trial alone (default: --tokens)",
    )
    parser.add_argument(
        "--alone-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --alone-factors: also measure each class alone eager (default: yes)",
    )
    add_copy_options(parser)  # --mps, --cpu, --fixed: for both sides
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="gpu=F,cpu=N,mps=M,SECTION.KEY=V",
        help="after the one-GPU side, run it again with these settings, against the same baseline "
        "(repeatable), e.g. --also gpu=1 --also gpu=0.125,cpu=2 --also train.reuse_compiled=true",
    )
    parser.add_argument(
        "--one-gpu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the one-GPU side (default: yes); --no-one-gpu: every GPU only, on a host of several",
    )
    parser.add_argument("--timeout", type=float, default=None, help="stop each run after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="write what was measured so far (JSON)")
    args = parser.parse_args()
    if not args.study.is_file():
        raise SystemExit(f"{args.study}: no such study file")
    for name in ("tokens", "warm_tokens", "alone_tokens"):
        budget = getattr(args, name)
        if budget is not None and budget < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {budget}: a token budget is at least 1")
    if args.alone_tokens is not None and not args.alone_factors:
        raise SystemExit("--alone-tokens sets the budget of the trials alone: give --alone-factors too")
    if not args.alone_eager and not args.alone_factors:
        raise SystemExit("--no-alone-eager leaves out the eager trials alone: give --alone-factors too")
    if not args.one_gpu and args.also:
        raise SystemExit("--also runs further one-GPU sides: leave out --no-one-gpu, or --also")
    if args.gpu is not None and not 0 < args.gpu <= 1:
        raise SystemExit(f"--gpu {args.gpu}: a per-trial GPU share is in (0, 1]")
    return args, also_sides(args.also)


def side_args(args: argparse.Namespace, settings: dict) -> argparse.Namespace:
    """The arguments of one `--also` side: the command's, with its share, CPUs, MPS and fixed settings."""
    overrides = {k: settings[k] for k in ("gpu", "cpu", "mps") if settings[k] is not None}
    return argparse.Namespace(**{**vars(args), **overrides, "fixed": [*args.fixed, *settings["fixed"]]})


def warm_up(args: argparse.Namespace, variants: list, gpus: list[str], console: Console, save) -> None:
    """Every cell once for --warm-tokens, with the command's settings and each side's that differ."""
    console.print(
        f"warming the compile caches: every cell for {args.warm_tokens:,} tokens on {len(gpus)} GPUs"
    )
    save(warm=bench(args.study, gpus, args, args.warm_tokens))
    # a side with other fixed settings may compile other code (e.g. train.precompile), and one with other
    # CPUs per trial runs other torch threads, which dynamo guards and a saved step's name includes
    # (ablate.precompiled.step_key): without its own warm-up it would trace every cell. Warmed too
    study_cpu = study_resources(args.study).cpu

    def compiled_with(side: argparse.Namespace) -> tuple[tuple[str, ...], float]:
        return tuple(side.fixed), float(side.cpu) if side.cpu is not None else study_cpu

    first = compiled_with(args)
    warmed, compiles = [], {first}
    for variant in variants:
        if (key := compiled_with(variant)) not in compiles:
            compiles.add(key)
            what = [*variant.fixed, *([f"cpu={key[1]:g}"] if key[1] != first[1] else [])]
            console.print(f"warming with {', '.join(what)} too")
            warmed.append(bench(args.study, gpus, variant, args.warm_tokens))
            save(warm_also=warmed)


def alone_stage(args: argparse.Namespace, gpu: str, console: Console, save) -> dict[str, float]:
    """One trial alone per class of --alone-factors on `gpu`, fast path then eager: {mode: tokens/s}."""
    alone: dict[str, float] = {}
    modes = (("fast path", ()), ("eager", ("--eager",)))
    for mode, extra in modes if args.alone_eager else modes[:1]:
        console.print(f"one trial alone per class of {args.alone_factors} ({mode}) on GPU {gpu} ...")
        try:
            result = bench(
                args.study,
                [gpu],
                args,
                args.alone_tokens or args.tokens,
                "--alone",
                "--alone-factors",
                args.alone_factors,
                *extra,
            )
        except SystemExit as err:  # the comparison of the two sides still stands without it
            console.print(f"[red]{err}[/]; going on without this baseline")
            continue
        alone[mode] = result["alone_tokens_per_s"]
        save(**{f"alone_{mode.replace(' ', '_')}": result})
        if by_class := result.get("by_class"):
            console.print(slowest_classes(by_class, mode, alone[mode]))
    return alone


SLOWEST_SHOWN = 10


def slowest_classes(by_class: dict[str, dict], mode: str, harmonic: float) -> Table:
    """The classes alone, slowest first (the SLOWEST_SHOWN slowest of many), each against the fastest:
    a cell much slower than its kind (a backend that loses at one length, say) shows at the top."""
    ranked = sorted(by_class.items(), key=lambda kv: kv[1]["tokens_per_s"])
    fastest = ranked[-1][1]["tokens_per_s"]
    shown = ranked if len(ranked) <= SLOWEST_SHOWN + 2 else ranked[:SLOWEST_SHOWN]
    table = Table(
        title=f"one trial alone ({mode}), slowest first; study's harmonic mean {harmonic:,.0f} tokens/s"
    )
    for column in ("class", "trials", "tokens/s", "x fastest"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for key, row in shown:
        rate = row["tokens_per_s"]
        table.add_row(key, str(row["trials"]), f"{rate:,.0f}", f"{rate / fastest:.3f}")
    if rest := ranked[len(shown) :]:
        low, high = rest[0][1]["tokens_per_s"], rest[-1][1]["tokens_per_s"]
        table.add_row(
            f"{len(rest)} more", str(sum(r["trials"] for _, r in rest)), f"{low:,.0f}-{high:,.0f}", ""
        )
    return table


def main() -> None:
    args, sides = parse_args()
    gpus = visible_gpus()
    if not gpus:
        raise SystemExit("this host shows no GPU (nvidia-smi or CUDA_VISIBLE_DEVICES)")
    if not args.one_gpu and len(gpus) < 2:
        raise SystemExit(f"--no-one-gpu measures every GPU only, and this host shows {len(gpus)}")
    console = Console()
    record: dict = {"study": str(args.study), "gpus": gpus, "tokens_per_trial": args.tokens}

    def save(**stage) -> None:
        record.update(stage)
        if args.out:
            args.out.write_text(json.dumps(record, indent=2))

    variants = [side_args(args, settings) for settings in sides]
    if args.warm_tokens is not None:
        warm_up(args, variants, gpus, console, save)
    alone = alone_stage(args, gpus[0], console, save) if args.alone_factors else {}
    one = None
    if args.one_gpu:
        console.print(f"1 GPU ({gpus[0]}) ...")
        one = measured(bench(args.study, gpus[:1], args, args.tokens), f"GPU {gpus[0]}")
        save(one_gpu=one)
    also = []
    for settings, variant in zip(sides, variants, strict=True):
        shown = [f"{k}={settings[k]}" for k in ("gpu", "cpu", "mps") if settings[k] is not None]
        label = "1 GPU, " + ", ".join(shown + settings["fixed"])
        console.print(f"{label} ...")
        summary = measured(bench(args.study, gpus[:1], variant, args.tokens), label)
        also.append((label, summary))
        save(also=[{"side": lab, **s} for lab, s in also])
    every = None
    if len(gpus) > 1:
        console.print(f"{len(gpus)} GPUs ({','.join(gpus)}) ...")
        every = measured(bench(args.study, gpus, args, args.tokens), f"GPUs {','.join(gpus)}")
        save(every_gpu=every)
    ratio = show(one, every, len(gpus), console, alone, also)
    allowed = allowed_per_gpu(args.study, args.gpu)
    checked = [("1 GPU", one, allowed), (f"{len(gpus)} GPUs", every, allowed)]
    for (label, summary), settings in zip(also, sides, strict=True):
        checked.append((label, summary, allowed_per_gpu(args.study, settings["gpu"] or args.gpu)))
    for name, summary, most in checked:
        for line in placement_lines(summary, most) if summary is not None else []:
            console.print(f"{name}: {line}")
    save(ratio=ratio, allowed_per_gpu=allowed)


if __name__ == "__main__":
    main()
