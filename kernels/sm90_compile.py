"""Compile the TMA attention kernels (triton_attn_tma.py) for an sm90 GPU on a machine without one.

    python -m kernels.sm90_compile [--kinds fwd dkdv dq] [--head-dims 64 128] [--dtypes bfloat16]
                                   [--tails] [--out FILE.jsonl]

Triton compiles for a named target without a driver: this swaps Triton's active driver for one that only
names the target (cuda, capability 90), then runs each kernel's `warmup` for every config of its lists
(_GPU_CONFIGS) and prints one JSON line per compile: shared memory, how many tl.dots became wgmma
(`warp_group_dot`) and how many TMA copies the TTGIR holds, and registers and spilled bytes (STACK) read
from the cubin with the cuobjdump that Triton ships. A failed compile is a line with "error". Speed still
needs a GPU (kernels/bench.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from kernels import triton_attn_tma as tma

KERNELS = {"fwd": tma._attn_fwd, "dkdv": tma._attn_bwd_dkdv, "dq": tma._attn_bwd_dq}


class _TargetOnlyDriver:
    """Enough of Triton's driver interface for JITFunction.warmup to compile for sm90 (no launch)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def sm90_target():
    """Within: Triton's kernels compile for sm90 whatever the machine has (and cannot launch)."""
    drivers = triton.runtime.driver
    saved = drivers._active  # None until something asked for the real driver; restored as it was
    drivers.set_active(_TargetOnlyDriver())
    try:
        yield
    finally:
        drivers._active = saved
        for kernel in KERNELS.values():  # their binders hold the sm90-only target: drop them
            kernel.device_caches.clear()


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spilled stack bytes) of the kernel in a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def _arguments(kind: str, n: int, d: int, dtype: torch.dtype, spec: tuple) -> tuple:
    """CPU stand-ins for one launch of `kind` (only dtypes, strides and alignment matter to a compile)."""
    batch, heads = 1, 2
    d_pad = max(16, triton.next_power_of_2(d))
    block_m, block_n = spec[:2]
    q, k, v, do, out = (torch.empty(batch, heads, n, d, dtype=dtype) for _ in range(5))
    rows = lambda: torch.empty(batch, heads, n)  # noqa: E731
    tiles = [tma._tiles_arg(t) for t in (q, k, v, do)]
    tma._set_block_shapes(
        dict(zip(("Q", "K", "V", "DO"), tiles, strict=True), BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad)
    )
    scalars = (torch.empty(heads), torch.empty(heads))
    if kind == "fwd":
        args = (*tiles[:3], *scalars, out, rows(), rows(), *out.stride()[:3], heads, n)
    elif kind == "dkdv":
        outputs = (out, torch.empty_like(out), rows(), rows())
        args = (*tiles, *scalars, rows(), rows(), rows(), *outputs, heads, n)
    else:
        args = (*tiles, *scalars, rows(), rows(), rows(), out, heads, n)
    return args, d_pad


def compile_one(kind: str, n: int, d: int, dtype: torch.dtype, spec: tuple, causal: bool) -> dict:
    """Compile one kernel at one config for sm90 and describe the result."""
    kernel = KERNELS[kind]
    args, d_pad = _arguments(kind, n, d, dtype, spec)
    block_m, block_n, warps, stages = spec
    row = dict(kind=kind, n_ctx=n, head_dim=d, dtype=str(dtype)[6:], config=list(spec), causal=causal)
    try:
        compiled = kernel.warmup(
            *args, HEAD_DIM=d, D_PAD=d_pad, CAUSAL=causal, PRECISION="ieee" if dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, grid=(1,),
        )  # fmt: skip
    except Exception as err:  # a compile that fails is the finding
        return row | dict(error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
    ttgir = compiled.asm["ttgir"]
    registers, spilled = _resources(compiled.asm["cubin"])
    return row | dict(
        shared=compiled.metadata.shared,
        wgmma=ttgir.count("ttng.warp_group_dot "),
        tma_loads=ttgir.count("async_tma_copy_global_to_local"),
        registers=registers,
        spilled=spilled,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="*", default=["fwd", "dkdv", "dq"])
    parser.add_argument("--head-dims", nargs="*", type=int, default=[64, 128])
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16"])
    parser.add_argument(
        "--tails", action="store_true", help="also N = 1000 (not a multiple of 16) and non-causal"
    )
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    if tma.INTERPRET:
        sys.exit("run without TRITON_INTERPRET=1: this compiles for the GPU")
    with sm90_target():
        for job in _jobs(args):
            row = compile_one(*job)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def _jobs(args):
    """(kind, N, D, dtype, config, causal) for every config of the lists asked for."""
    cases = [(4096, True)] + ([(1000, True), (4096, False)] if args.tails else [])
    for kind, d, dtype in itertools.product(args.kinds, args.head_dims, args.dtypes):
        d_pad = max(64, triton.next_power_of_2(d))
        for (n, causal), spec in itertools.product(cases, tma._GPU_CONFIGS[kind][d_pad]):
            yield kind, n, d, getattr(torch, dtype), spec, causal


if __name__ == "__main__":
    main()
