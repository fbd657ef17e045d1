"""Hopper (sm90+) variant of the fused attention in triton_attn.py: the same math, the same key-norm prepass
and the same deterministic per-row da/db, with the q, k, v and dO tiles moved by the tensor memory
accelerator (TMA) through tensor descriptors instead of pointer loads.

Why: on an H200 the pointer-based kernels ran at 1.30-1.57x SDPA-cuDNN's forward+backward time (README,
"Kernel benchmark"). On sm90 a descriptor load lands a tile in shared memory in the swizzled layout that
wgmma (which tl.dot becomes there) reads, and the software pipeliner overlaps those copies with the
matmuls across `num_stages` buffers without per-thread address arithmetic. A variant with warp
specialisation of the forward and dq loops (a TMA producer warp group, over descriptors made in the
kernel) was tried and removed: on an H200 with Triton 3.6 (2026-11-30) its benchmark hung for more than 8
minutes at its first shape (bf16, N 4096, D 64), while these pipelined kernels measured 1.28-1.45x
SDPA-cuDNN (4-8% faster than `triton`). Git history keeps it; re-add it only with a GPU measurement.
A forward loop rotated by one matmul (issue the next key block's q.k, then this block's softmax: the
overlap FlashAttention-3 gets within a warp group) buys nothing here: compiled for sm90 (Triton 3.9,
`kernels.sm90_compile`'s target), the TTGIR waits for that wgmma right after issuing it
(`warp_group_dot_wait {pendings = 0}`), because Triton keeps a wgmma in flight across iterations only
when its result feeds the next iteration's dot as the accumulator, as P.V does. Triton's tutorial of the
same release enables automatic warp specialisation of attention on Blackwell only. That overlap needs
explicit control of the waits: a Gluon forward with them (commit f8d007f) measured 0.96-1.04x this one's
time on an H200 and was removed (kernels/README.md, "A forward with explicit wgmma waits"). What did help is
ping-pong between two warp groups (kernels/gluon_attn.py, the `gluon` backend: its forward at D 128, a
one-kernel backward at D 64 and 128).

Each descriptor covers one (B, H, N, D) tensor with its own strides (rank 4, block (1, 1, rows, D_PAD)),
so strided views such as a permuted qkv projection are read in place, and rows past N or columns past D
read as zero per head: the masks of the pointer kernels are only needed on the scores. TMA needs rows of
a multiple of 16 bytes (D * itemsize), 16-byte aligned strides and base address; inputs whose strides or
address are not aligned are copied first (inside the op, so torch.compile sees no data pointers).
Outputs are written with pointer stores (contiguous, as in triton_attn.py). fp32 inputs run (the tests
use them) but their ieee dots spill registers heavily: this backend is for bf16 and fp16.

The Triton interpreter (TRITON_INTERPRET=1) runs host descriptors, so the tests of triton_attn.py
have counterparts here that run on CPU; `python -m kernels.sm90_compile` compiles every config for sm90
without a GPU; speed is measured by `python -m kernels.bench --backends triton-tma ...`.
"""

from __future__ import annotations

import copy

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from kernels import triton_attn as base
from kernels.triton_attn import _keep

try:  # host descriptors (written against Triton 3.6, the GPU benchmark machine's)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

INTERPRET, AUTOTUNE = base.INTERPRET, base.AUTOTUNE


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, kn2_base, off_b, off_h, a2, b2, offs_m, lo, hi, n_ctx,
               BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BN,)
        k = desc_k.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)  # (BN, D), zero past N
        if MASKED:
            kn2 = tl.load(kn2_base + cols, mask=cols < n_ctx, other=0.0)
        else:
            kn2 = tl.load(kn2_base + cols)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * a2 - (kn2 * b2)[None, :]  # (BM, BN)
        if MASKED:
            s = tl.where(_keep(offs_m[:, None], cols[None, :], n_ctx, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)  # (BN, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, A, B, O, LSE, KN2, sob, soh, son, n_heads, n_ctx, HEAD_DIM: tl.constexpr,
              D_PAD: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    # one program: a block of BLOCK_M queries, looping over key blocks; KN2 (B, H, N) from _key_norms.
    # Q, K, V: host descriptors over (B, H, N, D), tile shapes set per config by _set_block_shapes
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // n_heads
    off_h = bh % n_heads
    desc_q, desc_k, desc_v = Q, K, V
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, D_PAD)
    a2 = tl.load(A + off_h) * 1.4426950408889634
    b2 = tl.load(B + off_h) * 1.4426950408889634
    q = desc_q.load([off_b, off_h, start_m * BLOCK_M, 0]).reshape(BLOCK_M, D_PAD)  # (BM, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if CAUSAL:  # full blocks left of the diagonal, then the diagonal block (masked)
        lo = start_m * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, n_ctx)
    else:  # full blocks, then the ragged tail (masked)
        lo = (n_ctx // BLOCK_N) * BLOCK_N
        hi = n_ctx
    kn2_base = KN2 + bh.to(tl.int64) * n_ctx
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, kn2_base, off_b, off_h, a2, b2, offs_m,
                               0, lo, n_ctx, BLOCK_N, D_PAD, False, CAUSAL, PRECISION)  # fmt: skip
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, kn2_base, off_b, off_h, a2, b2, offs_m,
                               lo, hi, n_ctx, BLOCK_N, D_PAD, True, CAUSAL, PRECISION)  # fmt: skip
    acc = acc / l_i[:, None]
    row_ok = offs_m < n_ctx
    tl.store(LSE + bh.to(tl.int64) * n_ctx + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = O + off_b.to(tl.int64) * sob + off_h * soh + offs_m[:, None] * son + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------
# backward (delta comes from triton_attn._bwd_preprocess, the key norms from the forward)


@triton.jit
def _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, desc_q, desc_do, lse_base, delta_base, off_b, off_h,
                a2, cols, lo, hi, n_ctx, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in tl.range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m  # (BM,)
        q = desc_q.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, D_PAD)  # (BM, D), zero past N
        if MASKED:  # rows past N: q = dO = 0 and lse = delta = 0, so they add nothing
            lse = tl.load(lse_base + rows, mask=rows < n_ctx, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < n_ctx, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * a2 - key_bias[:, None]  # (BN, BM)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            pT = tl.where(_keep(rows[None, :], cols[:, None], n_ctx, CAUSAL), pT, 0.0)
        do = desc_do.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, D_PAD)  # (BM, D)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk_acc = tl.dot(dsT.to(q.dtype), q, dk_acc, input_precision=PRECISION)
        colsum += tl.sum(dsT, 1)
    return dk_acc, dv, colsum


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, A, B, LSE, DELTA, KN2, DK, DV, DA_ROWS, DB_ROWS, n_heads, n_ctx,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # one program: a block of BLOCK_N keys, looping over query blocks. Q, K, V, DO: host descriptors
    # (see _attn_fwd). DK, DV contiguous (B, H, N, D).
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    off_b = bh // n_heads
    off_h = bh % n_heads
    desc_q, desc_k, desc_v, desc_do = Q, K, V, DO
    a = tl.load(A + off_h)
    b = tl.load(B + off_h)
    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, D_PAD)
    row_base = bh.to(tl.int64) * n_ctx
    k = desc_k.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)  # (BN, D)
    v = desc_v.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)  # (BN, D)
    col_ok = cols < n_ctx
    kn2 = tl.load(KN2 + row_base + cols, mask=col_ok, other=0.0)  # (BN,)
    key_bias = kn2 * (b * 1.4426950408889634)
    dk_acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    colsum = tl.zeros([BLOCK_N], tl.float32)
    n_even = (n_ctx // BLOCK_M) * BLOCK_M
    if CAUSAL:  # the diagonal block (masked), full blocks below it, the ragged tail (masked)
        lo = start_n
        hi = tl.minimum(start_n + BLOCK_N, n_ctx)
        tail = tl.maximum(hi, n_even)
    else:
        lo = 0
        hi = 0
        tail = n_even
    lse_base = LSE + row_base
    delta_base = DELTA + row_base
    a2 = a * 1.4426950408889634
    dk_acc, dv, colsum = _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, desc_q, desc_do, lse_base,
                                     delta_base, off_b, off_h, a2, cols, lo, hi, n_ctx,
                                     BLOCK_M, D_PAD, True, CAUSAL, PRECISION)  # fmt: skip
    dk_acc, dv, colsum = _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, desc_q, desc_do, lse_base,
                                     delta_base, off_b, off_h, a2, cols, hi, n_even, n_ctx,
                                     BLOCK_M, D_PAD, False, CAUSAL, PRECISION)  # fmt: skip
    dk_acc, dv, colsum = _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, desc_q, desc_do, lse_base,
                                     delta_base, off_b, off_h, a2, cols, tail, n_ctx, n_ctx,
                                     BLOCK_M, D_PAD, True, CAUSAL, PRECISION)  # fmt: skip
    kf = k.to(tl.float32)
    dk = a * dk_acc - (2.0 * b) * colsum[:, None] * kf
    tl.store(DA_ROWS + row_base + cols, tl.sum(dk_acc * kf, 1), mask=col_ok)
    tl.store(DB_ROWS + row_base + cols, -colsum * kn2, mask=col_ok)
    out = row_base * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq_acc, q, do, lse, delta, desc_k, desc_v, kn2_base, off_b, off_h, a2, b2, offs_m, lo, hi,
              n_ctx, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BN,)
        k = desc_k.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)  # (BN, D), zero past N
        v = desc_v.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)  # (BN, D)
        if MASKED:
            kn2 = tl.load(kn2_base + cols, mask=cols < n_ctx, other=0.0)
        else:
            kn2 = tl.load(kn2_base + cols)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * a2 - (kn2 * b2)[None, :]  # (BM, BN)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_keep(offs_m[:, None], cols[None, :], n_ctx, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq_acc = tl.dot(ds.to(k.dtype), k, dq_acc, input_precision=PRECISION)
    return dq_acc


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, A, B, LSE, DELTA, KN2, DQ, n_heads, n_ctx,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # one program: a block of BLOCK_M queries, looping over key blocks. Q, K, V, DO: host descriptors
    # (see _attn_fwd). DQ contiguous (B, H, N, D).
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // n_heads
    off_h = bh % n_heads
    desc_q, desc_k, desc_v, desc_do = Q, K, V, DO
    a = tl.load(A + off_h)
    b2 = tl.load(B + off_h) * 1.4426950408889634
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_ctx
    row_base = bh.to(tl.int64) * n_ctx
    q = desc_q.load([off_b, off_h, start_m * BLOCK_M, 0]).reshape(BLOCK_M, D_PAD)  # (BM, D)
    do = desc_do.load([off_b, off_h, start_m * BLOCK_M, 0]).reshape(BLOCK_M, D_PAD)  # (BM, D)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq_acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if CAUSAL:
        lo = start_m * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, n_ctx)
    else:
        lo = (n_ctx // BLOCK_N) * BLOCK_N
        hi = n_ctx
    a2 = a * 1.4426950408889634
    kn2_base = KN2 + row_base
    dq_acc = _dq_inner(dq_acc, q, do, lse, delta, desc_k, desc_v, kn2_base, off_b, off_h, a2, b2, offs_m,
                       0, lo, n_ctx, BLOCK_N, D_PAD, False, CAUSAL, PRECISION)  # fmt: skip
    dq_acc = _dq_inner(dq_acc, q, do, lse, delta, desc_k, desc_v, kn2_base, off_b, off_h, a2, b2, offs_m,
                       lo, hi, n_ctx, BLOCK_N, D_PAD, True, CAUSAL, PRECISION)  # fmt: skip
    out = row_base * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(
        DQ + out, (a * dq_acc).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    )


# ----------------------------------------------------------------------------------------------------
# configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim (16 and 32 use the 64 lists).
# Every 64 and 128 entry compiles for sm90 with Triton 3.6 (`python -m kernels.sm90_compile`, no GPU
# needed) with wgmma for every tl.dot, TMA copies in the loops and, at N a multiple of 16, no register
# spills (a few bytes at other N); the 256 lists are for correctness only (they spill, as triton_attn's do).
# fwd and dq: BLOCK_M % BLOCK_N == 0; dkdv: BLOCK_N % BLOCK_M == 0 (the causal diagonal is split there).
# The first config that fits is the one used when autotuning is off.

_GPU_CONFIGS = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
        256: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 16, 4, 1)],
    },
    "dkdv": {
        64: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)],
        128: [(64, 64, 8, 2), (16, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)],
        256: [(32, 64, 4, 1), (16, 32, 4, 1)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2)],
        256: [(64, 32, 4, 1), (32, 16, 4, 1)],
    },
}
_INTERPRET_CONFIGS = base._INTERPRET_CONFIGS  # tiny tiles: several blocks, ragged tails, split diagonals
# per kernel: which descriptors hold query rows (BLOCK_M of them a tile) and which key rows (BLOCK_N)
_QUERY_SIDE, _KEY_SIDE = ("Q", "DO"), ("K", "V")


def _set_block_shapes(nargs) -> None:
    # host descriptors carry their tile shape, which depends on the config: set it before each launch
    for name in _QUERY_SIDE + _KEY_SIDE:
        if isinstance(nargs.get(name), TensorDescriptor):
            rows = nargs["BLOCK_M"] if name in _QUERY_SIDE else nargs["BLOCK_N"]
            nargs[name].block_shape = [1, 1, rows, nargs["D_PAD"]]


def _make_prune(kind: str, out: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs[:1]
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        elem = named_args[out].element_size()
        table = _GPU_CONFIGS[kind][max(d_pad, 64)]
        fits = [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in table
            and base._smem_bytes(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, d_pad, elem)
            <= base._SMEM_LIMIT
        ]
        smallest = min(table, key=lambda spec: spec[0] * spec[1])
        fits = fits or [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == smallest
        ]
        return fits if AUTOTUNE else fits[:1]

    return prune


class _Autotuner(Autotuner):
    """Triton's autotuner, with its on-disk cache of timings kept on for configs that set the tile shapes.

    A study's workers share that cache (`TRITON_CACHE_AUTOTUNING=1` under `ablate.caches`), so that a
    kernel is timed once per shape and every process then launches the same tile. Triton skips the cache
    for configs that carry a pre-launch hook, since it cannot store a function (`check_disk_cache`, the
    same in Triton 3.6 and 3.9). Here the hook only copies BLOCK_M and BLOCK_N, which the stored config
    keeps, into the descriptors: the cache is read and written through copies of the configs without it,
    and the choice is mapped back to the config that carries it. Without this each worker process timed
    every config of the three kernels at each new length, inside its first trial and while other trials
    trained, and could pick another tile (and so another rounding) than its neighbours.
    """

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        hooked = {_unhooked(config): config for config in configs}

        def bench_and_unhook():
            bench_fn()  # Triton's: times the hooked configs, keeps the fastest in self.cache
            self.configs_timings = {_unhooked(c): timing for c, timing in self.configs_timings.items()}

        found = super().check_disk_cache(tuning_key, list(hooked), bench_and_unhook)
        if found:  # Triton rebuilt the stored config, without the hook: launch the one that has it
            chosen = hooked.get(self.cache[tuning_key])
            if chosen is None:  # not one of these configs (cannot happen while the key names them all)
                bench_fn()
                return False
            self.cache[tuning_key] = chosen
        return found


def _unhooked(config: triton.Config) -> triton.Config:
    bare = copy.copy(config)
    bare.pre_hook = None
    return bare


def _tuned(kernel, kind: str, out: str):
    if INTERPRET:
        specs = [_INTERPRET_CONFIGS[kind]]
    else:
        specs = list(dict.fromkeys(s for table in _GPU_CONFIGS[kind].values() for s in table))
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
        for m, n, w, s in specs
    ]
    return _Autotuner(
        kernel,
        kernel.arg_names,
        configs,
        key=base.TUNING_KEY,
        reset_to_zero=None,
        restore_value=None,
        prune_configs_by={"early_config_prune": _make_prune(kind, out)},
    )


_fwd_kernel = _tuned(_attn_fwd, "fwd", "O")
_dkdv_kernel = _tuned(_attn_bwd_dkdv, "dkdv", "DK")
_dq_kernel = _tuned(_attn_bwd_dq, "dq", "DQ")


# ----------------------------------------------------------------------------------------------------
# launchers, registered as torch.library custom ops like triton_attn's (opaque to torch.compile)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when TMA can read it in place (unit stride in D, other strides positive multiples of 16
    bytes, 16-byte aligned address), else a contiguous copy."""
    strides_ok = all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])  # size-1 dims too
    if t.stride(-1) == 1 and strides_ok and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _tiles_arg(t: torch.Tensor) -> TensorDescriptor:
    """A kernel's Q, K, V or DO: a host descriptor over t's (B, H, N, D) and strides (its tile shape set per
    config by _set_block_shapes)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 1, 1])


@torch.library.custom_op("ablate::rbf_attention_tma_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (o, lse, the key norms), the last kept for the backward
    B, H, N, D = q.shape
    dims = base._dims(q)
    q, k, v = (_tma_ready(t) for t in (q, k, v))
    o = base._alloc((B, H, N, D), q.dtype, q.device)
    lse = base._alloc((B, H, N), torch.float32, q.device)  # base-2 log-sum-exp per row
    kn2 = base._alloc((B, H, N), torch.float32, q.device)
    block = 16 if INTERPRET else 64
    base._key_norms[(triton.cdiv(N, block), B * H)](
        k, kn2, *k.stride()[:3], H, N, N, HEAD_DIM=D, D_PAD=dims["D_PAD"], BLOCK=block
    )
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        *(_tiles_arg(t) for t in (q, k, v)), a, b, o, lse, kn2, *o.stride()[:3], H, N, CAUSAL=causal, **dims
    )
    return o, lse, kn2


@torch.library.custom_op("ablate::rbf_attention_tma_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kn2: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    dims = base._dims(q)
    do, q, k, v = (_tma_ready(t) for t in (do, q, k, v))
    delta = base._alloc((B, H, N), torch.float32, q.device)
    block = 16 if INTERPRET else 64
    base._bwd_preprocess[(triton.cdiv(N, block), B * H)](
        o, do, k, delta, kn2, *o.stride()[:3], *do.stride()[:3], *k.stride()[:3], H, N, N,
        HEAD_DIM=D, D_PAD=dims["D_PAD"], BLOCK=block, NORMS=False,
    )  # fmt: skip
    dq, dk, dv = (base._alloc((B, H, N, D), q.dtype, q.device) for _ in range(3))
    da_rows, db_rows = (base._alloc((B, H, N), torch.float32, q.device) for _ in range(2))  # summed below
    for kernel, grid_rows, outputs in (
        (_dkdv_kernel, "BLOCK_N", (dk, dv, da_rows, db_rows)),
        (_dq_kernel, "BLOCK_M", (dq,)),
    ):
        tiles = [_tiles_arg(t) for t in (q, k, v, do)]  # per kernel: the pre-hook sets tile shapes
        grid = lambda meta, rows=grid_rows: (triton.cdiv(N, meta[rows]), B * H)
        kernel[grid](*tiles, a, b, lse, delta, kn2, *outputs, H, N, CAUSAL=causal, **dims)
    return dq, dk, dv, da_rows.sum((0, 2)), db_rows.sum((0, 2))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, a, b, causal):
    return base._fwd_fake(q, k, v, a, b, causal, True)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, a, b, o, lse, kn2, causal):
    return base._bwd_fake(do, q, k, v, a, b, o, lse, kn2, causal)


base.register_autograd(_fwd_op, _bwd_op)


# ----------------------------------------------------------------------------------------------------
# public entry point


def triton_tma_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    causal: bool = True,
) -> torch.Tensor:
    """Fused softmax(a*q.k - b*||k||^2) v on Hopper's TMA. q, k, v: (B, H, N, D), one of fp16/bf16/fp32,
    16 <= D <= 256 with D * itemsize a multiple of 16 bytes; a, b: (H,). Needs an sm90+ GPU (or
    TRITON_INTERPRET=1). Returns (B, H, N, D) in q's dtype; differentiable in q, k, v, a and b."""
    return _attention(q, k, v, a, b, causal)


def _attention(q, k, v, a, b, causal: bool) -> torch.Tensor:
    inputs = base.checked_inputs("triton-tma", unsupported_reason(q, k, v, a, b), q, k, v, a, b)
    return _fwd_op(*inputs, causal)[0]


def unsupported_reason(q, k, v, a, b) -> str | None:
    """Why the TMA kernels cannot run these inputs, or None when they can."""
    reason = base.unsupported_reason(q, k, v, a, b)
    if reason:
        return reason
    if TensorDescriptor is None:
        return f"this Triton ({triton.__version__}) has no triton.tools.tensor_descriptor (written for 3.6)"
    row_bytes = q.shape[-1] * q.element_size()
    if row_bytes % 16:
        return f"TMA needs rows of a multiple of 16 bytes; head dim {q.shape[-1]} x {q.element_size()} bytes is {row_bytes}"
    if q.device.type == "cuda":
        return capability_reason(torch.cuda.get_device_capability(q.device))
    return None


def capability_reason(capability: tuple[int, int]) -> str | None:
    """Why a GPU of this compute capability cannot run the TMA kernels, or None (sm90 and newer can)."""
    if capability[0] < 9:
        return f"TMA needs an sm90+ GPU (Hopper or newer); got sm{capability[0]}{capability[1]}: use backend 'triton'"
    return None
