"""Training throughput of one trial on a GPU: `python -m ablate.bench.throughput`.

Runs `ablate.train.train` on random tokens at the seed-size model (4 layers, d_model 256, 4 heads,
context 256, batch 64, vocab 50257, bf16, compiled) for every metric and every variant of the step:
`plain` (compiled, the full logits and F.cross_entropy), `graphs` (the same, replayed as CUDA graphs),
`fused` (the LM head and loss as one Triton op, kernels/linear_ce.py), `fused+graphs`, and `chunked`
(the pure-torch chunked head+loss). `fused-persistent+graphs` and `fused-epilogue+graphs` run the fused
op with its other schedules (linear_ce.py; on an H200 neither was faster than `fused` in the step, README);
they run only when named in --variants.
`--backend` names one or several attention backends (comma-separated) for rbf and penalty; sdpa runs once per
cell, so every ratio to it comes from the same command. `--write-table` (one variant, named backends) then writes
each attention length's row of kernels/autotune_table.json (the sequence length plus registers: 256 and 257 at the
seed size) from the mean tokens/s of each backend's rbf and penalty rows at that length, so that `auto` picks the
fastest backend measured in a training step there.
Prints steady-state tokens/s, MFU and peak memory as a Markdown table. `--repeat N` runs each row N times
in this process (the compile caches warm after the first); with `--reuse-compiled` the repeats also reuse
the first run's compiled step (`train.reuse_compiled`). `--profile N` also profiles each row's fourth logging
window (steady steps) with `torch.profiler` and prints its N costliest GPU kernels per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ablate.config import RunConfig, from_dict
from ablate.logger import RecordingLogger
from ablate.train import train

SEED_MODEL = {"n_layers": 4, "d_model": 256, "n_heads": 4, "context": 256}


VARIANTS = {  # name -> train settings on top of the compiled step
    "plain": {"loss": "plain"},
    "graphs": {"loss": "plain", "cuda_graphs": True},
    "fused": {"loss": "fused"},
    "fused+graphs": {"loss": "fused", "cuda_graphs": True},
    "chunked": {"loss": "chunked", "loss_chunks": 8},
    "fused-persistent+graphs": {"loss": "fused-persistent", "cuda_graphs": True},
    "fused-epilogue+graphs": {"loss": "fused-epilogue", "cuda_graphs": True},
    "fused+graphs+max-autotune": {"loss": "fused", "cuda_graphs": True, "max_autotune": True},
}
DEFAULT_VARIANTS = ("plain", "graphs", "fused", "fused+graphs", "chunked")  # the others: no faster


def bench_config(
    metric: str,
    variant: str,
    steps: int,
    backend: str,
    *,
    vocab: int = 50257,
    model: dict | None = None,
    reuse_compiled: bool = False,
) -> RunConfig:
    tree = {
        # the backend applies to rbf and penalty; sdpa always runs torch's SDPA (the baseline)
        "model": {
            **SEED_MODEL,
            "metric": metric,
            "position": "rope",
            "attn_backend": "auto" if metric == "sdpa" else backend,
            **(model or {}),
        },
        "data": {"source": f"random:{vocab}", "val_tokens": 64 * 256},
        "train": {
            "tokens": steps * 64 * 256,
            "batch_size": 64,
            "eval_every": 10 * steps,
            "eval_batches": 1,
            "log_every": 20,
            "compile": True,
            "reuse_compiled": reuse_compiled,
            **VARIANTS[variant],
        },
    }
    return from_dict(RunConfig, tree)


WARM_WINDOWS = 2  # logging windows that hold compilation, graph capture and warm-up, left out of rates


class ClockedLogger(RecordingLogger):
    """A RecordingLogger that also notes the wall-clock time at which each training window was logged
    (right after the window's one sync), so that copies run at once (`ablate.bench.packing`) can be
    compared over the seconds in which all of them trained."""

    def __init__(self) -> None:
        super().__init__()
        self.window_ends: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        if "tokens_per_s" in metrics:
            self.window_ends.append(time.time())


class ProfilingLogger(ClockedLogger):
    """A ClockedLogger that profiles the GPU over one steady logging window: `torch.profiler` starts when
    window `start` is logged and stops when the next one is (each log comes right after the window's one
    sync, so the profile holds exactly that window's steps and no compilation or warm-up)."""

    def __init__(self, start: int = 3, activity: str = "CUDA") -> None:
        super().__init__()
        self.start, self.activity = start, getattr(torch.profiler.ProfilerActivity, activity)
        self.profiler: torch.profiler.profile | None = None
        self.kernels: dict[str, float] = {}  # kernel name -> GPU microseconds over the window
        self.first_step, self.steps = 0, 0  # the step logged before the window, and the window's steps

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        if "tokens_per_s" not in metrics:
            return
        windows = len(self.window_ends)
        if windows == self.start:
            self.profiler = torch.profiler.profile(activities=[self.activity])
            self.profiler.__enter__()
            self.first_step = step
        elif windows == self.start + 1 and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.steps = step - self.first_step
            self.kernels = kernel_times(self.profiler)
            self.profiler = None

    def close(self) -> None:
        """Stop a profile that a run ended inside (one that diverged or failed), keeping nothing of it."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


def kernel_times(profiler: torch.profiler.profile) -> dict[str, float]:
    """GPU microseconds per kernel name over a profile (every launch of the name summed)."""
    totals: dict[str, float] = {}
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time
    return totals


def kernel_table(row: dict, top: int) -> str:
    """The `top` costliest kernels of a profiled row, in ms per step, with the rest summed."""
    steps, kernels = row["profile_steps"], row["kernels"]
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])
    total = sum(kernels.values())
    lines = [
        f"{row['metric']} {row['variant']}: {total / steps / 1e3:.3f} ms of GPU kernels a step "
        f"({steps} steps profiled, {len(kernels)} kernel names)",
        "",
        "| kernel | ms a step | share |",
        "|---|---|---|",
    ]
    for name, us in ranked[:top]:
        lines.append(f"| `{name[:90]}` | {us / steps / 1e3:.3f} | {us / total:.1%} |")
    rest = sum(us for _, us in ranked[top:])
    if rest:
        lines.append(f"| {len(ranked) - top} others | {rest / steps / 1e3:.3f} | {rest / total:.1%} |")
    return "\n".join(lines)


def steady_windows(log: ClockedLogger) -> list[list[float]]:
    """[start, end, tokens/s] of each logging window after the first WARM_WINDOWS (those `steady_median`
    takes); a window starts when the one before it was logged."""
    rates = [v for _, v in log.series("tokens_per_s")]
    ends = log.window_ends
    return [[ends[i - 1], ends[i], rates[i]] for i in range(WARM_WINDOWS, len(rates))]


def run_one(metric: str, variant: str, steps: int, backend: str, *, profile: bool = False, **config) -> dict:
    log = ProfilingLogger() if profile else ClockedLogger()
    cfg = bench_config(metric, variant, steps, backend, **config)
    try:
        result = train(cfg, log)
    finally:
        if profile:
            log.close()
    profiled = {"profile_steps": log.steps, "kernels": log.kernels} if profile else {}
    return {
        "metric": metric,
        "variant": variant,
        "backend": cfg.model.attn_backend if metric != "sdpa" else "sdpa",
        "attn_len": cfg.model.context + cfg.model.registers,  # the attention's length (registers included)
        "head_dim": cfg.model.d_model // cfg.model.n_heads,
        **{k: v for k, v in (config.get("model") or {}).items()},
        "tokens_per_s": steady_median(log, "tokens_per_s"),
        "mfu": steady_median(log, "mfu"),
        "peak_mem_gb": log.series("peak_mem_gb")[-1][1],
        "first_window_s": result.summary["time/first_window_s"],  # compilation, graph capture, warm-up
        # its parts (train.FIRST_STEP_MARKS): step 1 (trace and compile), steps 2-3 (graphs captured)
        "step1_s": result.summary.get("time/step1_s"),
        "steps1_3_s": result.summary.get("time/steps1_3_s"),
        # torch's account of step 1's compilation (train.compile_spent): forward frame, its backend, backward
        **{k.removeprefix("time/"): result.summary.get(k) for k in COMPILE_KEYS},
        "status": result.status,
        "windows": steady_windows(log),  # wall clock: for copies run at once (ablate.bench.packing)
        **profiled,
    }


def steady_median(log: RecordingLogger, key: str) -> float:
    """Median over the logging windows after the first WARM_WINDOWS (which include compilation)."""
    values = sorted(v for _, v in log.series(key)[WARM_WINDOWS:])
    return values[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--backend",
        default="auto",
        help="attention backend(s) of rbf and penalty, comma-separated (sdpa runs once per cell)",
    )
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {list(VARIANTS)}"
    )
    parser.add_argument("--metrics", default="sdpa,rbf,penalty")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary of the random tokens")
    parser.add_argument(
        "--cells",
        default="",
        help="semicolon-separated model settings to run each metric with, e.g. "
        "'position=rope;position=susie,registers=1' (default: rope, no registers)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each row this often in this process (compile cache warm)"
    )
    parser.add_argument(
        "--reuse-compiled",
        action="store_true",
        help="keep each row's compiled step for its repeats (train.reuse_compiled): --repeat 2 then shows "
        "the first window of a trial that reuses it",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile each row's fourth logging window and print its N costliest GPU kernels a step",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--write-table",
        action="store_true",
        help="write each attention length's row of kernels/autotune_table.json from the rbf and penalty "
        "rows (one variant; --backend names the backends compared)",
    )
    args = parser.parse_args()
    variants, metrics, backends = args.variants.split(","), args.metrics.split(","), args.backend.split(",")
    problems = check_arguments(args, variants, metrics, backends)
    if problems:
        raise SystemExit("; ".join(problems))
    if not torch.cuda.is_available():
        raise SystemExit("ablate.bench.throughput measures GPU throughput; no CUDA device is available")
    rows = []
    for variant in variants:
        for cell in parse_cells(args.cells):
            for metric, backend in runs(metrics, backends):
                for _ in range(args.repeat):
                    rows.append(
                        run_one(
                            metric,
                            variant,
                            args.steps,
                            backend,
                            vocab=args.vocab,
                            model=cell,
                            reuse_compiled=args.reuse_compiled,
                            profile=args.profile > 0,
                        )
                    )
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "kernels"}), flush=True)
    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.steps} steps, backend {args.backend}\n"
    )
    print(markdown_table(rows))
    for row in rows if args.profile else ():
        if row["profile_steps"]:
            print("\n" + kernel_table(row, args.profile))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    if args.write_table:
        from kernels.bench import environment

        write_table(rows, environment("ablate.bench.throughput"))


def check_arguments(
    args: argparse.Namespace, variants: list[str], metrics: list[str], backends: list[str]
) -> list[str]:
    """What is wrong with the command line (nothing has run yet)."""
    from kernels import BACKENDS

    problems = []
    if args.profile and args.steps < 5 * 20:
        problems.append("--profile needs --steps >= 100: it profiles the fourth 20-step logging window")
    if unknown := [v for v in variants if v not in VARIANTS]:
        problems.append(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    choices = ["auto", *(name for name in BACKENDS if name != "sdpa")]  # sdpa has no key-norm term
    if unknown := [b for b in backends if b not in choices]:
        problems.append(f"unknown backend(s) {unknown} for rbf and penalty; choose from {choices}")
    if args.write_table:
        if len(variants) != 1:
            problems.append("--write-table compares backends in one step variant: give one --variants")
        if "auto" in backends:
            problems.append("--write-table records named backends: leave auto out of --backend")
        if not {"rbf", "penalty"} & set(metrics):
            problems.append("--write-table needs rbf or penalty in --metrics (sdpa has no backend choice)")
    return problems


def runs(metrics: list[str], backends: list[str]) -> list[tuple[str, str]]:
    """(metric, backend) of each row of a cell: sdpa once (torch's SDPA whatever the backend), every other
    metric on each backend."""
    return [(m, b) for m in metrics for b in (backends[:1] if m == "sdpa" else backends)]


def table_rows(rows: list[dict]) -> list[dict]:
    """One kernels/autotune_table.json row per attention length of the rbf and penalty rows: each backend's
    mean tokens/s over that length's rows (every cell and metric it ran), the fastest as the pick."""
    by_length: dict[tuple[int, int], dict[str, list[float]]] = {}
    for row in rows:
        if row["metric"] != "sdpa" and row.get("status") == "finished":
            rates = by_length.setdefault((row["attn_len"], row["head_dim"]), {})
            rates.setdefault(row["backend"], []).append(row["tokens_per_s"])
    out = []
    for (length, head_dim), rates in sorted(by_length.items()):
        means = {name: round(statistics.fmean(values)) for name, values in rates.items()}
        best = max(means, key=means.get)
        out.append(
            dict(
                dtype="bfloat16",
                n_ctx=length,
                head_dim=head_dim,
                causal=True,
                backend=best,
                tokens_per_s=means,
            )
        )
    return out


def write_table(rows: list[dict], env: dict, path: Path | None = None) -> list[dict]:
    """Replace the rows of the measured lengths in the autotune table (the others stay); the new rows."""
    from kernels import dispatch
    from kernels.bench import updated_table

    path = path or dispatch.TABLE_PATH
    stamp = f"{env['command']}: a training step's tokens/s, bf16 autocast ({env['gpu']}, {env['date']})"
    new = [{**r, "source": stamp} for r in table_rows(rows)]
    old = json.loads(path.read_text()) if path.exists() else {}
    table = updated_table(old, new, {**old.get("environment", {})})
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(
        f"wrote {len(new)} row(s) of {path}: " + ", ".join(f"N {r['n_ctx']} -> {r['backend']}" for r in new)
    )
    return new


COMPILE_KEYS = ("time/compile_forward_s", "time/compile_backend_s", "time/compile_backward_s")
TABLE_KEYS = (
    *("metric", "variant", "backend", "attn_len", "head_dim", "tokens_per_s", "mfu", "peak_mem_gb"),
    *("first_window_s", "step1_s", "steps1_3_s", "status", "windows", "profile_steps", "kernels"),
    *(k.removeprefix("time/") for k in COMPILE_KEYS),
)


def parse_cells(text: str) -> list[dict]:
    """'position=rope;position=susie,registers=1' -> [{position: rope}, {position: susie, registers: 1}]."""
    cells = []
    for cell in filter(None, text.split(";")):
        settings = dict(item.split("=", 1) for item in cell.split(","))
        cells.append({k: _number_or_text(v) for k, v in settings.items()})
    return cells or [{}]


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _first_steps(row: dict) -> str:
    if row.get("step1_s") is None or row.get("steps1_3_s") is None:
        return ""
    return f" ({row['step1_s']:.1f} / {row['steps1_3_s'] - row['step1_s']:.1f} s)"


def markdown_table(rows: list[dict]) -> str:
    """One line per (variant, metric); ratios against sdpa with the same variant and with `plain`."""
    lines = [
        "| metric | backend | cell | step | tokens/s | vs sdpa, same step | vs plain sdpa | MFU | peak memory "
        "| first window (step 1 / steps 2-3) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict) -> str:
        return ",".join(f"{k}={v}" for k, v in row.items() if k not in TABLE_KEYS) or "-"

    def base(variant: str, row: dict) -> float | None:
        match = [
            r for r in rows if r["metric"] == "sdpa" and r["variant"] == variant and cell(r) == cell(row)
        ]
        return match[0]["tokens_per_s"] if match else None

    def ratio(value: float, reference: float | None) -> str:
        return f"{value / reference:.3f}x" if reference else "-"

    for row in rows:
        tps = row["tokens_per_s"]
        lines.append(
            f"| {row['metric']} | {row.get('backend', '-')} | {cell(row)} | {row['variant']} | {tps / 1e6:.2f}M | "
            f"{ratio(tps, base(row['variant'], row))} | {ratio(tps, base('plain', row))} | {row['mfu']:.1%} | "
            f"{row['peak_mem_gb']:.1f} GB | {row['first_window_s']:.1f} s{_first_steps(row)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
