"""Benchmark the LM head and its cross-entropy, forward and backward, every way the model can compute it.

    python -m kernels.bench_loss [--vocab 8192 50257] [--tokens 16384] [--d-model 256]
                                 [--row-kernel 4096,8 1024,4] [--out DIR]

At the seed size (64 x 256 tokens, d_model 256, with bias): h in bf16, W and b in float32 as the model
holds them (cast to bf16 inside, as under autocast). For each vocab size:

    plain            F.cross_entropy(float32 logits), eager, under bf16 autocast (model loss "plain")
    plain-compiled   the same under torch.compile: the fastest plain version a user can choose
    fused BV/W       kernels.linear_cross_entropy (linear_ce.py) with the row kernel at BLOCK_V BV and
                     W warps, one row per --row-kernel pair (default: 4096,8 and the shipped 1024,4)
    tiled            kernels.linear_cross_entropy_tiled (linear_ce_tiled.py), no logits in memory

Columns: forward (with autograd recording; the fused op computes its gradients here), forward+backward
(one training step of the loss), both triton.testing.do_bench medians with L2 flushed; the peak memory of
one forward+backward above the inputs; the loss's difference to plain's; the step's time over
plain-compiled's. The tiled kernels' autotuned configs are listed after the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kernels import linear_ce, linear_ce_tiled


def _plain(h, w, b, targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = F.linear(h, w, b)  # (N, V) bf16
    return F.cross_entropy(logits.float(), targets)


_plain_compiled = torch.compile(_plain, fullgraph=True)


@contextlib.contextmanager
def _row_kernel(block_v: int, warps: int):
    """linear_ce.py's row kernel at another BLOCK_V and warp count (read at each call) for the duration."""
    shipped = linear_ce.BLOCK_V, linear_ce.NUM_WARPS
    linear_ce.BLOCK_V, linear_ce.NUM_WARPS = block_v, warps
    try:
        yield
    finally:
        linear_ce.BLOCK_V, linear_ce.NUM_WARPS = shipped


def candidates(row_kernels: list[tuple[int, int]]) -> dict[str, tuple[Callable, Callable]]:
    """name -> (loss function, context to run it in)."""
    found = {
        "plain": (_plain, contextlib.nullcontext),
        "plain-compiled": (_plain_compiled, contextlib.nullcontext),
    }
    for block_v, warps in row_kernels:
        found[f"fused {block_v}/{warps}"] = (
            linear_ce.linear_cross_entropy_triton,
            lambda bv=block_v, w=warps: _row_kernel(bv, w),
        )
    found["tiled"] = (linear_ce_tiled.linear_cross_entropy_tiled, contextlib.nullcontext)
    return found


def _inputs(n: int, d: int, v: int):
    gen = torch.Generator(device="cuda").manual_seed(v)
    h = torch.randn(n, d, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=gen) * d**-0.5).requires_grad_()
    b = (torch.randn(v, device="cuda", generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    return h, w, b, targets


def measure(name: str, loss_fn: Callable, context: Callable, n: int, d: int, v: int) -> dict:
    h, w, b, targets = _inputs(n, d, v)
    params = [h, w, b]
    row = dict(loss_fn=name, tokens=n, d_model=d, vocab=v)

    def step():
        loss_fn(h, w, b, targets).backward()

    try:
        with context():
            row["loss"] = loss_fn(h, w, b, targets).item()
            step()  # compile and autotune outside the timings
            row["fwd_ms"] = triton.testing.do_bench(lambda: loss_fn(h, w, b, targets), return_mode="median")
            row["fwd_bwd_ms"] = triton.testing.do_bench(step, grad_to_none=params, return_mode="median")
            for t in params:
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as err:  # a variant that cannot run a shape is a result, not a crash
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return row


def add_ratios(rows: list[dict]) -> None:
    """Loss difference to plain and step time over plain-compiled, at the same vocab size."""
    by = {(r["vocab"], r["loss_fn"]): r for r in rows}
    for r in rows:
        plain, compiled = by.get((r["vocab"], "plain"), {}), by.get((r["vocab"], "plain-compiled"), {})
        if "fwd_bwd_ms" in r and "loss" in plain:
            r["loss_diff"] = r["loss"] - plain["loss"]
        if "fwd_bwd_ms" in r and "fwd_bwd_ms" in compiled:
            r["x_plain_compiled"] = r["fwd_bwd_ms"] / compiled["fwd_bwd_ms"]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| vocab | loss fn | fwd ms | fwd+bwd ms | peak MiB | loss - plain | x plain-compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['vocab']} | {r['loss_fn']} | {r['error'][:80]} |||||")
            continue
        lines.append(
            f"| {r['vocab']} | {r['loss_fn']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['peak_mib']:.0f} | {r.get('loss_diff', float('nan')):+.1e} | "
            f"{r.get('x_plain_compiled', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def tuned_configs() -> list[str]:
    found = []
    for name in ("_fwd_tuned", "_dh_tuned", "_dw_tuned"):
        for key, config in getattr(linear_ce_tiled, name).cache.items():
            found.append(f"{name} {key} -> {config}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 50257])
    parser.add_argument("--tokens", type=int, default=64 * 256, help="rows N (batch x context)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument(
        "--row-kernel", nargs="+", default=["4096,8", "1024,4"],
        help="BLOCK_V,WARPS pairs for the fused op's row kernel (shipped: "
        f"{linear_ce.BLOCK_V},{linear_ce.NUM_WARPS})",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for bench_loss.json and bench_loss.md")
    args = parser.parse_args()
    row_kernels = [tuple(int(x) for x in pair.split(",")) for pair in args.row_kernel]
    for knob in ("recompile_limit", "cache_size_limit"):  # one plain compile per vocab size
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    env = dict(
        gpu=torch.cuda.get_device_name(),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        triton=triton.__version__,
        command="python -m kernels.bench_loss " + " ".join(sys.argv[1:]),
    )
    rows = []
    for v in args.vocab:
        for name, (loss_fn, context) in candidates(row_kernels).items():
            rows.append(measure(name, loss_fn, context, args.tokens, args.d_model, v))
            print(json.dumps(rows[-1]), flush=True)
    add_ratios(rows)
    text = "\n".join([json.dumps(env), "", markdown(rows), "", *tuned_configs()])
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        report = dict(environment=env, rows=rows, tuned=tuned_configs())
        (args.out / "bench_loss.json").write_text(json.dumps(report, indent=1))
        (args.out / "bench_loss.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
