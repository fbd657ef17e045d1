"""Benchmark every attention backend against dot-product SDPA (flash and cuDNN) in one run.

    python -m kernels.bench [--out DIR] [--write-table] [--shapes N,D ...] [--backends NAME ...] [--repeats R]
                            [--warm I/K]

Causal, H = 16, B*N = 64k tokens, N in {1024, 4096, 16384}, D in {64, 128}, bf16 and fp16. For each
backend: forward and backward median time (triton.testing.do_bench, L2 flushed between runs), TFLOP/s
(causal: forward 2*B*H*N^2*D, backward 2.5x that) and the peak memory of one forward+backward above the
inputs. rbf uses a = 2*gamma, b = gamma; penalty a = gamma, b = gamma/2; gamma = 1/sqrt(D). Then the
O(N) memory check at N = 32768. --write-table stores the fastest rbf backend per shape in
kernels/autotune_table.json, which the "auto" dispatcher reads (rows of shapes not run are kept; each row
names the command, GPU and date that measured it).
--shapes times the given N,D pairs instead of that grid (any N and D; B = max(1, 64k // N)), and `--shapes
0,0` nothing but the memory check. --backends keeps only the named candidates (e.g. sdpa-cudnn triton
triton-tma; a name covers its rbf and penalty rows). --repeats R times every backend of a shape R times in
R rounds (each round every backend once, so that a slow spell of the GPU falls on all of them) and keeps
each time's median over the rounds, and its spread, (max - min) / median of forward+backward. --warm I/K
only runs shard I of K once (fills the compile caches from a parallel process, no timing).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import dispatch, gluon_attn, triton_attn, triton_attn_tma
from kernels.flex import flex_attention_rbf
from kernels.sdpa_aug import sdpa_aug_attention

TOKENS, HEADS = 65536, 16
LENGTHS, HEAD_DIMS, DTYPES = (1024, 4096, 16384), (64, 128), (torch.bfloat16, torch.float16)
MEMORY_LENGTH = 32768


@dataclass(frozen=True)
class Candidate:
    name: str
    geometry: str  # sdpa | rbf | penalty
    run: Callable[..., torch.Tensor]  # (q, k, v, a, b) -> out
    registry: str | None = None  # the dispatcher backend this measures, if any


def _sdpa(backend):
    def run(q, k, v, a, b):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def _aug(backend):
    return lambda q, k, v, a, b: sdpa_aug_attention(q, k, v, a, b, causal=True, backends=[backend])


def _triton(pre_norm):
    return lambda q, k, v, a, b: triton_attn._attention(q, k, v, a, b, True, pre_norm)


def _triton_tma():
    return lambda q, k, v, a, b: triton_attn_tma._attention(q, k, v, a, b, True)


def _gluon():
    return lambda q, k, v, a, b: gluon_attn.gluon_attention(q, k, v, a, b, causal=True)


CANDIDATES = [
    Candidate("sdpa-flash", "sdpa", _sdpa(SDPBackend.FLASH_ATTENTION)),
    Candidate("sdpa-cudnn", "sdpa", _sdpa(SDPBackend.CUDNN_ATTENTION)),
    Candidate("triton", "rbf", _triton(True), "triton"),
    Candidate("triton", "penalty", _triton(True)),
    Candidate("triton-loopnorm", "rbf", _triton(False)),
    Candidate("triton-tma", "rbf", _triton_tma(), "triton-tma"),
    Candidate("triton-tma", "penalty", _triton_tma()),
    Candidate("gluon", "rbf", _gluon(), "gluon"),
    Candidate("gluon", "penalty", _gluon()),
    Candidate("flex", "rbf", lambda q, k, v, a, b: flex_attention_rbf(q, k, v, a, b, causal=True), "flex"),
    Candidate("sdpa-aug-cudnn", "rbf", _aug(SDPBackend.CUDNN_ATTENTION), "sdpa-aug"),
    Candidate("sdpa-aug-flash", "rbf", _aug(SDPBackend.FLASH_ATTENTION), "sdpa-aug"),
]


def _inputs(batch, n, d, dtype, geometry):
    gen = torch.Generator(device="cuda").manual_seed(n * d)
    q, k, v, do = (
        torch.randn(batch, HEADS, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(4)
    )  # fmt: skip
    gamma = torch.full((HEADS,), d**-0.5, device="cuda")
    a, b = {"sdpa": (gamma, 0 * gamma), "rbf": (2 * gamma, gamma), "penalty": (gamma, gamma / 2)}[geometry]
    return [t.requires_grad_() for t in (q, k, v)], a, b, do


def _peak_mib(cand, q, k, v, a, b, do) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cand.run(q, k, v, a, b).backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in (q, k, v):
        t.grad = None
    return peak / 2**20


def measure(cand: Candidate, batch: int, n: int, d: int, dtype: torch.dtype, timing: bool = True) -> dict:
    """One backend at one shape: forward/backward median ms, TFLOP/s, peak MiB (or the error)."""
    (q, k, v), a, b, do = _inputs(batch, n, d, dtype, cand.geometry)
    row = dict(
        backend=cand.name, geometry=cand.geometry, dtype=str(dtype)[6:], n_ctx=n, head_dim=d, batch=batch
    )
    try:
        cand.run(q, k, v, a, b).backward(do)  # compile and autotune outside the timings
        if timing:
            fwd = triton.testing.do_bench(lambda: cand.run(q, k, v, a, b), return_mode="median")
            out = cand.run(q, k, v, a, b)
            backward = lambda: out.backward(do, retain_graph=True)  # noqa: E731
            bwd = triton.testing.do_bench(backward, grad_to_none=[q, k, v], return_mode="median")
            del out
            flops = 2 * batch * HEADS * n * n * d  # causal forward, as in the issue
            row.update(
                fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=flops / fwd * 1e-9, bwd_tflops=2.5 * flops / bwd * 1e-9
            )
            row["peak_mib"] = _peak_mib(cand, q, k, v, a, b, do)
    except Exception as err:  # a backend that cannot run a shape is a result, not a crash
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return row


def over_rounds(rounds: list[dict]) -> dict:
    """One backend's rows of the same shape from several rounds -> one row: the median forward and backward
    times (TFLOP/s of those), the largest peak memory, and `spread`, (max - min) / median of the rounds'
    forward+backward times; the first error if any round failed."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    row = dict(rounds[0])
    fwd, bwd = (sorted(r[key] for r in rounds) for key in ("fwd_ms", "bwd_ms"))
    totals = sorted(r["fwd_ms"] + r["bwd_ms"] for r in rounds)
    median = lambda xs: (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2  # noqa: E731
    row.update(fwd_ms=median(fwd), bwd_ms=median(bwd), peak_mib=max(r["peak_mib"] for r in rounds))
    row.update(fwd_tflops=rounds[0]["fwd_tflops"] * rounds[0]["fwd_ms"] / row["fwd_ms"],
               bwd_tflops=rounds[0]["bwd_tflops"] * rounds[0]["bwd_ms"] / row["bwd_ms"],
               rounds=len(rounds), spread=(totals[-1] - totals[0]) / median(totals))  # fmt: skip
    return row


def add_ratios(rows: list[dict]) -> None:
    """(fwd+bwd) over dot-product SDPA flash and cuDNN at the same shape and dtype."""
    total = lambda r: r["fwd_ms"] + r["bwd_ms"] if "fwd_ms" in r else math.nan  # noqa: E731
    key = lambda r: (r["dtype"], r["n_ctx"], r["head_dim"])  # noqa: E731
    base = {(key(r), r["backend"]): total(r) for r in rows if r["geometry"] == "sdpa"}
    for r in rows:
        r["x_flash"] = total(r) / base.get((key(r), "sdpa-flash"), math.nan)
        r["x_cudnn"] = total(r) / base.get((key(r), "sdpa-cudnn"), math.nan)


def markdown(rows: list[dict]) -> str:
    head = "| dtype | N | D | backend | geometry | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | peak MiB | x flash | x cuDNN | spread |"
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['n_ctx']} | {r['head_dim']} | {r['backend']} | {r['geometry']} | "
                         f"{r['error'][:60]} ||||||||")  # fmt: skip
            continue
        lines.append(
            f"| {r['dtype']} | {r['n_ctx']} | {r['head_dim']} | {r['backend']} | {r['geometry']} | "
            f"{r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['bwd_tflops']:.0f} | "
            f"{r['peak_mib']:.0f} | {r['x_flash']:.3f} | {r['x_cudnn']:.3f} | "
            + (f"{100 * r['spread']:.1f}% of {r['rounds']} |" if "spread" in r else "one run |")
        )
    return "\n".join(lines)


def memory_check(d: int, candidates: list[Candidate]) -> list[dict]:
    """Peak memory of one forward+backward at N = 32768 (bf16, causal); the reference is not run."""
    n, batch = MEMORY_LENGTH, TOKENS // MEMORY_LENGTH
    auto = Candidate("auto", "rbf", lambda q, k, v, a, b: dispatch.attention(q, k, v, a, b, causal=True))
    (q, k, v), a, b, _ = _inputs(batch, n, d, torch.bfloat16, "rbf")
    chosen = dispatch._choose_backend(q, k, v, a, b, True)
    rows = []
    for cand in [*(c for c in candidates if c.geometry in ("sdpa", "rbf")), auto]:
        (q, k, v), a, b, do = _inputs(batch, n, d, torch.bfloat16, cand.geometry)
        row = dict(backend=cand.name, geometry=cand.geometry, n_ctx=n, head_dim=d, batch=batch)
        try:
            _peak_mib(cand, q, k, v, a, b, do)  # compile and autotune first: do_bench allocates
            row["peak_mib"] = _peak_mib(cand, q, k, v, a, b, do)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        if cand.name == "auto":
            row["chosen"] = chosen
        rows.append(row)
    flash = next((r.get("peak_mib") for r in rows if r["backend"] == "sdpa-flash"), None)
    for r in rows:
        if flash and "peak_mib" in r:
            r["x_flash_memory"] = r["peak_mib"] / flash
    return rows


def selection_table(rows: list[dict]) -> list[dict]:
    """Fastest dispatcher backend per (dtype, N, D) for rbf; sdpa-aug counts with cuDNN when it ran."""
    table = []
    for key in dict.fromkeys((r["dtype"], r["n_ctx"], r["head_dim"]) for r in rows):
        mine = [r for r in rows if (r["dtype"], r["n_ctx"], r["head_dim"]) == key and r["geometry"] == "rbf"]
        timed = {}
        for cand_name, registry in [(c.name, c.registry) for c in CANDIDATES if c.registry]:
            r = next((r for r in mine if r["backend"] == cand_name and "fwd_ms" in r), None)
            if r is not None and registry not in timed:
                timed[registry] = r["fwd_ms"] + r["bwd_ms"]
        if timed:
            best = min(timed, key=timed.get)
            table.append(
                dict(dtype=key[0], n_ctx=key[1], head_dim=key[2], causal=True, backend=best, ms=timed)
            )
    return table


def _shapes(args) -> list[tuple]:
    """(dtype, N, D) to time: the grid (LENGTHS x HEAD_DIMS), or the --shapes pairs in each dtype (any N and
    D; `0,0` alone times nothing, for the memory check only). A malformed pair is an error."""
    if not args.shapes:
        return [(dtype, n, d) for dtype in DTYPES for d in HEAD_DIMS for n in LENGTHS]
    wanted = set()
    for text in args.shapes:
        pair = text.split(",")
        if len(pair) != 2 or not all(x.strip().isdigit() for x in pair):
            raise SystemExit(f"--shapes takes N,D pairs of whole numbers, e.g. 4096,64; got {text!r}")
        n, d = map(int, pair)
        if (n, d) != (0, 0) and (n == 0 or d == 0):
            raise SystemExit(f"--shapes {text}: N and D must be positive (0,0 alone skips the timing)")
        wanted.add((n, d))
    wanted.discard((0, 0))
    return [(dtype, n, d) for dtype in DTYPES for d, n in sorted((d, n) for n, d in wanted)]


def environment(module: str = "kernels.bench") -> dict:
    """What a measurement ran on, and the command (`python -m <module>` and this process's arguments)."""
    return dict(
        gpu=torch.cuda.get_device_name(),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        triton=triton.__version__,
        cudnn=torch.backends.cudnn.version(),
        command=f"python -m {module} " + " ".join(sys.argv[1:]),
    )


def _candidates(names: list[str] | None) -> list[Candidate]:
    """CANDIDATES, or those with the given names (in CANDIDATES' order); an unknown name is an error."""
    known = list(dict.fromkeys(c.name for c in CANDIDATES))
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {known}")
    return [c for c in CANDIDATES if names is None or c.name in names]


def _tuned_configs() -> list[str]:
    found = []
    for module in (triton_attn, triton_attn_tma):
        for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
            for key, config in getattr(module, name).cache.items():
                found.append(f"{module.__name__}.{name} {key[:4]} -> {config}")
    return found


def with_source(rows: list[dict], env: dict) -> list[dict]:
    """The rows, each saying what measured it (`source`): its own, else the command, GPU and date of `env`."""
    stamp = f"{env.get('command', '?')} ({env.get('gpu', '?')}, {env.get('date', '?')})"
    return [{**r, "source": r.get("source") or stamp} for r in rows]


def merged_table(old: list[dict], new: list[dict]) -> list[dict]:
    """The new rows, then the old rows of every (dtype, N, D, causal) this run did not measure."""
    key = lambda r: (r["dtype"], r["n_ctx"], r["head_dim"], r["causal"])  # noqa: E731
    measured = {key(r) for r in new}
    return new + [r for r in old if key(r) not in measured]


def updated_table(old: dict, new: list[dict], env: dict) -> dict:
    """The table file after a run measured `new` in `env`: the new rows, then the old file's rows of
    shapes not run, each naming what measured it (old rows without a source take the old file's)."""
    kept = with_source(old.get("rows", []), old.get("environment", {}))
    return dict(environment=env, rows=merged_table(kept, with_source(new, env)))


def warm(shard: int, shards: int, args) -> None:
    memory = [(torch.bfloat16, MEMORY_LENGTH, d) for d in HEAD_DIMS]
    jobs = [(c, s) for s in [*memory, *_shapes(args)] for c in _candidates(args.backends)][shard::shards]
    for cand, (dtype, n, d) in jobs:
        row = measure(cand, max(1, TOKENS // n), n, d, dtype, timing=False)
        print("warm", cand.name, cand.geometry, str(dtype)[6:], n, d, row.get("error", "ok"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="folder for bench.csv, bench.json, bench.md")
    parser.add_argument("--write-table", action="store_true", help="update kernels/autotune_table.json")
    parser.add_argument("--shapes", nargs="*", help="restrict to N,D pairs, e.g. 4096,64")
    parser.add_argument("--backends", nargs="*", help="restrict to these candidates, e.g. sdpa-cudnn triton")
    parser.add_argument("--warm", help="I/K: run shard I of K once without timing (fills compile caches)")
    parser.add_argument("--no-memory", action="store_true", help="skip the N = 32768 memory check")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per shape (medians; default 1)")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats takes a whole number of rounds >= 1; got {args.repeats}")
    for knob in ("recompile_limit", "cache_size_limit"):  # one flex compile per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    torch._functorch.config.donated_buffer = False  # compiled flex backward timed with retain_graph
    if args.warm:
        warm(*map(int, args.warm.split("/")), args)
        return
    env, rows, candidates = environment(), [], _candidates(args.backends)
    memory = [] if args.no_memory else [r for d in HEAD_DIMS for r in memory_check(d, candidates)]
    print(*map(json.dumps, memory), sep="\n", flush=True)
    for dtype, n, d in _shapes(args):
        rounds = {cand: [] for cand in candidates}
        for i in range(args.repeats):
            for cand in candidates:
                rounds[cand].append(measure(cand, max(1, TOKENS // n), n, d, dtype))
                print(json.dumps({**rounds[cand][-1], "round": i + 1}), flush=True)
        rows += [rounds[cand][0] if args.repeats == 1 else over_rounds(rounds[cand]) for cand in candidates]
    add_ratios(rows)
    table = selection_table(rows)
    report = dict(environment=env, rows=rows, memory=memory, selection=table, tuned=_tuned_configs())
    text = "\n".join([f"{env}", "", markdown(rows), "", *map(json.dumps, memory), "", *report["tuned"]])
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
        (args.out / "bench.md").write_text(text + "\n")
        with open(args.out / "bench.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    if args.write_table:
        old = json.loads(dispatch.TABLE_PATH.read_text()) if dispatch.TABLE_PATH.exists() else {}
        dispatch.TABLE_PATH.write_text(json.dumps(updated_table(old, table, env), indent=1) + "\n")


if __name__ == "__main__":
    main()
