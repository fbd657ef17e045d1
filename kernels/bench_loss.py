"""Benchmark the LM head and its cross-entropy, forward and backward, every way the model can compute it.

    python -m kernels.bench_loss [--vocab 8192 50257] [--tokens 16384] [--d-model 256]
                                 [--row-kernel 4096,8 1024,4] [--persistent 4096,8,4 ...]
                                 [--logits-block-n 128] [--losses plain,...] [--row-passes]
                                 [--out DIR]

At the seed size (64 x 256 tokens, d_model 256, with bias): h in bf16, W and b in float32 as the model
holds them (cast to bf16 inside, as under autocast). For each vocab size:

    plain            F.cross_entropy(float32 logits), eager, under bf16 autocast (model loss "plain")
    plain-compiled   the same under torch.compile: the fastest plain version a user can choose
    fused BV/W       kernels.linear_cross_entropy (linear_ce.py), schedule "rows" (model loss "fused"),
                     with the row kernel at BLOCK_V BV and W warps, one row per --row-kernel pair
                     (default: 4096,8 and the shipped 1024,4)
    persistent BV/W/P  schedule "persistent" (model loss "fused-persistent"): the persistent row kernel
                     at BLOCK_V BV, W warps and P programs per SM, one row per --persistent triple; the
                     first triple once more with the bias added in the row kernel ("b in rows"), and
                     once with db as G's column sums instead of a column of the dW matmul ("db apart")
    epilogue N       schedule "epilogue" (model loss "fused-epilogue"): the Triton logits matmul with
                     softmax partials at BLOCK_N N (one row per --logits-block-n), then the row kernel
    tiled            kernels.linear_cross_entropy_tiled (linear_ce_tiled.py), no logits in memory

`--row-passes` times instead the row kernels alone, over a logits buffer already written (random bf16,
tokens x vocab padded to 64): the rows kernel at each --row-kernel pair and the persistent one at each
--persistent triple, each as one training step runs it (loss and G written over the buffer), beside an
in-place `mul_` over the same buffer, which reads and writes each byte once: the floor a row pass that
reads the logits once could reach.

--losses picks the families above (default: all). Columns: forward (with autograd recording; the fused op
computes its gradients here), forward+backward (one training step of the loss), both
triton.testing.do_bench medians with L2 flushed; the peak memory of one forward+backward above the
inputs; the loss's difference to plain's; the step's time over plain-compiled's. The autotuned configs
(tiled kernels, logits matmul) are listed after the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kernels import linear_ce, linear_ce_tiled, logits_matmul


def _plain(h, w, b, targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = F.linear(h, w, b)  # (N, V) bf16
    return F.cross_entropy(logits.float(), targets)


_plain_compiled = torch.compile(_plain, fullgraph=True)


FAMILIES = ("plain", "plain-compiled", "fused", "persistent", "epilogue", "tiled")


@contextlib.contextmanager
def _knobs(module, **values):
    """The module's knobs (read at each call) at other values for the duration."""
    shipped = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in shipped.items():
            setattr(module, name, value)


def _fused(schedule: str) -> Callable:
    return functools.partial(linear_ce.linear_cross_entropy_triton, schedule=schedule)


def candidates(
    row_kernels: list[tuple[int, ...]],
    persistent: list[tuple[int, ...]],
    block_ns: list[int],
    families: tuple[str, ...] = FAMILIES,
) -> dict[str, tuple[Callable, Callable]]:
    """name -> (loss function, context to run it in), for the families asked for."""
    found = {
        "plain": (_plain, contextlib.nullcontext),
        "plain-compiled": (_plain_compiled, contextlib.nullcontext),
    }
    for block_v, warps in row_kernels:
        found[f"fused {block_v}/{warps}"] = (
            _fused("rows"),
            functools.partial(_knobs, linear_ce, BLOCK_V=block_v, NUM_WARPS=warps),
        )
    for i, (block_v, warps, per_sm) in enumerate(persistent):
        knobs = dict(PERSISTENT_BLOCK_V=block_v, PERSISTENT_NUM_WARPS=warps, PROGRAMS_PER_SM=per_sm)
        name = f"persistent {block_v}/{warps}/{per_sm}"
        found[name] = (_fused("persistent"), functools.partial(_knobs, linear_ce, **knobs))
        if i == 0:  # where the bias and its gradient are computed
            context = functools.partial(_knobs, linear_ce, **knobs, BIAS_IN_MATMUL=False)
            found[f"{name} b in rows"] = (_fused("persistent"), context)
            context = functools.partial(_knobs, linear_ce, **knobs, DB_IN_DW_MATMUL=False)
            found[f"{name} db apart"] = (_fused("persistent"), context)
    for block_n in block_ns:
        context = functools.partial(_knobs, logits_matmul, BLOCK_N=block_n)
        found[f"epilogue {block_n}"] = (_fused("epilogue"), context)
    found["tiled"] = (linear_ce_tiled.linear_cross_entropy_tiled, contextlib.nullcontext)
    return {name: v for name, v in found.items() if name.partition(" ")[0] in families}


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


def row_pass_candidates(
    row_kernels: list[tuple[int, ...]], persistent: list[tuple[int, ...]]
) -> dict[str, tuple[Callable, Callable]]:
    """name -> (row pass over (z, targets, losses, v), context to run it in); "floor" first."""
    found = {"floor: in-place mul_": (lambda z, targets, losses, v: z.mul_(1.0), contextlib.nullcontext)}
    for block_v, warps in row_kernels:
        context = functools.partial(_knobs, linear_ce, BLOCK_V=block_v, NUM_WARPS=warps)
        found[f"rows {block_v}/{warps}"] = (_rows_pass, context)
    for block_v, warps, per_sm in persistent:
        knobs = dict(PERSISTENT_BLOCK_V=block_v, PERSISTENT_NUM_WARPS=warps, PROGRAMS_PER_SM=per_sm)
        found[f"persistent {block_v}/{warps}/{per_sm}"] = (
            _persistent_pass,
            functools.partial(_knobs, linear_ce, **knobs),
        )
    return found


def _rows_pass(z, targets, losses, v):
    linear_ce._row_pass(z, targets, losses, v, with_grad=True)


def _persistent_pass(z, targets, losses, v):
    linear_ce._persistent_rows(z, None, None, targets, losses, v, with_grad=True)


def measure_row_pass(
    name: str, pass_fn: Callable, context: Callable, n: int, v: int, *, device="cuda", bench=None
) -> dict:
    """Milliseconds of one row pass over a fresh copy of the same random logits (the copy's time taken
    out), as a median of `bench` (triton.testing.do_bench)."""
    bench = bench or functools.partial(triton.testing.do_bench, return_mode="median")
    gen = torch.Generator(device=device).manual_seed(v)
    v_pad = triton.cdiv(v, linear_ce.PAD) * linear_ce.PAD
    logits = (torch.randn(n, v_pad, device=device, generator=gen) * 2).bfloat16()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    z, losses = logits.clone(), torch.empty(n, dtype=torch.float32, device=device)
    row = dict(row_pass=name, tokens=n, vocab=v)
    try:
        with context():
            with_pass = bench(lambda: (z.copy_(logits), pass_fn(z, targets, losses, v)))
        row["ms"] = with_pass - bench(lambda: z.copy_(logits))
    except Exception as err:  # a config that cannot run is a result, not a crash
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return row


def row_pass_markdown(rows: list[dict]) -> str:
    floors = {r["vocab"]: r["ms"] for r in rows if r["row_pass"].startswith("floor") and "ms" in r}
    lines = ["| vocab | row pass | ms | x floor |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['vocab']} | {r['row_pass']} | {r['error'][:80]} | |")
            continue
        ratio = f"{r['ms'] / floors[r['vocab']]:.2f}" if r["vocab"] in floors else "-"
        lines.append(f"| {r['vocab']} | {r['row_pass']} | {r['ms']:.3f} | {ratio} |")
    return "\n".join(lines)


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
        diff = f"{r['loss_diff']:+.1e}" if "loss_diff" in r else "-"  # "-": plain or its pair not run
        ratio = f"{r['x_plain_compiled']:.3f}" if "x_plain_compiled" in r else "-"
        lines.append(
            f"| {r['vocab']} | {r['loss_fn']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['peak_mib']:.0f} | {diff} | {ratio} |"
        )
    return "\n".join(lines)


TUNED = [  # (module, autotuned kernel): the configs they chose are listed after the table
    (linear_ce_tiled, "_fwd_tuned"),
    (linear_ce_tiled, "_dh_tuned"),
    (linear_ce_tiled, "_dw_tuned"),
    (logits_matmul, "_logits_tuned"),
]


def tuned_configs() -> list[str]:
    found = []
    for module, name in TUNED:
        for key, config in getattr(module, name).cache.items():
            found.append(f"{name} {key} -> {config}")
    return found


def _ints(text: str, count: int) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(","))
    if len(values) != count:
        raise SystemExit(f"{text!r}: expected {count} comma-separated integers")
    return values


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
    parser.add_argument(
        "--persistent", nargs="+", default=["4096,8,4", "8192,16,2", "8192,8,2", "16384,16,1"],
        help="BLOCK_V,WARPS,PROGRAMS_PER_SM triples for the persistent row kernel (default in linear_ce.py: "
        f"{linear_ce.PERSISTENT_BLOCK_V},{linear_ce.PERSISTENT_NUM_WARPS},{linear_ce.PROGRAMS_PER_SM})",
    )  # fmt: skip
    parser.add_argument(
        "--logits-block-n", type=int, nargs="+", default=[128],
        help=f"BLOCK_N of the epilogue schedule's logits matmul (default in logits_matmul.py: {logits_matmul.BLOCK_N})",
    )  # fmt: skip
    parser.add_argument(
        "--losses", default=",".join(FAMILIES), help=f"comma-separated, from {list(FAMILIES)}"
    )
    parser.add_argument(
        "--row-passes", action="store_true", help="time the row kernels alone over written logits"
    )
    parser.add_argument("--out", type=Path, help="folder for bench_loss.json and bench_loss.md")
    args = parser.parse_args()
    families = tuple(args.losses.split(","))
    if unknown := [f for f in families if f not in FAMILIES]:
        raise SystemExit(f"unknown loss families {unknown}; choose from {list(FAMILIES)}")
    row_kernels = [_ints(pair, 2) for pair in args.row_kernel]
    persistent = [_ints(triple, 3) for triple in args.persistent]
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
        if args.row_passes:
            for name, (pass_fn, context) in row_pass_candidates(row_kernels, persistent).items():
                rows.append(measure_row_pass(name, pass_fn, context, args.tokens, v))
                print(json.dumps(rows[-1]), flush=True)
            continue
        for name, (loss_fn, context) in candidates(
            row_kernels, persistent, args.logits_block_n, families
        ).items():
            rows.append(measure(name, loss_fn, context, args.tokens, args.d_model, v))
            print(json.dumps(rows[-1]), flush=True)
    if args.row_passes:
        text = "\n".join([json.dumps(env), "", row_pass_markdown(rows)])
    else:
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
