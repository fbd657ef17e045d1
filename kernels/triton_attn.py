"""Fused Triton attention for softmax(a*q.k - b*||k||^2) v, forward and backward.

FlashAttention-style: an online softmax over key tiles, never materialising the (N, N) scores. The key
norms ||k_j||^2 are computed once per key in float32 by a small kernel, read as a (BLOCK_N,) vector per
tile and kept for the backward; recomputing them from every key tile inside the loop
(ABLATE_KEY_NORM=loop) measured 25-35% slower in the forward on an H200 (python -m kernels.bench, rows
"triton" vs "triton-loopnorm"). Scores live in base 2 (exp2), so a and b are pre-multiplied by log2(e)
and the saved log-sum-exp is base 2.

Backward, with dS the gradient of the loss w.r.t. the scores s = a*q.k - b*||k||^2:
    dS = P * (dP - delta),  delta_i = sum_d dO_id * O_id
    dq = a * dS k
    dk = a * dS^T q - 2 b colsum(dS) k
    dv = P^T dO
    da = sum_ij dS_ij q_i.k_j = sum_j k_j . (dS^T q)_j      (free: it reuses the dk accumulator)
    db = -sum_j colsum(dS)_j ||k_j||^2
da and db are written per key row and summed over (batch, key) on the host: deterministic, no atomics.

Layout: q, k, v (B, H, N, D) with unit stride in D (any other strides); a, b (H,). D is padded to a
power of two inside the kernel with masks; any N works (tails are masked).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# ABLATE_TRITON_AUTOTUNE=0 uses the first config of each list (fast compiles for tests).
AUTOTUNE = os.environ.get("ABLATE_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
# forward key norms: "pre" (default) reads them from a (B, H, N) float32 vector written by a small
# kernel first, and kept for the backward; "loop" recomputes ||k||^2 from each key tile in the loop, and the
# backward's preprocess computes them.
PRE_NORM = os.environ.get("ABLATE_KEY_NORM", "pre") != "loop"


# ----------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _load(ptrs, rows, n_rows, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    # rows and d_ok broadcast against ptrs; masked elements read as zero
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows) & d_ok, other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok, other=0.0)
    return x


@triton.jit
def _keep(rows, cols, n_ctx, CAUSAL: tl.constexpr):
    # rows (R, 1) or (1, R) query indices, cols key indices: which scores survive masking. Rows past
    # the end keep their keys so that no row is empty (they are never stored).
    keep = cols < n_ctx
    if CAUSAL:
        keep = keep & (cols <= rows)
    return keep


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kn2_base, skn, svn, a2, b2, offs_m, offs_d, d_ok, lo, hi,
               n_ctx, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               EVEN_D: tl.constexpr, PRECISION: tl.constexpr, PRE_NORM: tl.constexpr):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BN,)
        kT = _load(k_base + cols[None, :] * skn + offs_d[:, None], cols[None, :], n_ctx, d_ok[:, None],
                   MASKED, EVEN_D)  # (D, BN)  # fmt: skip
        if PRE_NORM:  # ||k||^2 computed once per key by _key_norms
            if MASKED:
                kn2 = tl.load(kn2_base + cols, mask=cols < n_ctx, other=0.0)
            else:
                kn2 = tl.load(kn2_base + cols)
        else:  # ||k||^2 from the tile in registers
            kf = kT.to(tl.float32)
            kn2 = tl.sum(kf * kf, 0)
        s = tl.dot(q, kT, input_precision=PRECISION) * a2 - (kn2 * b2)[None, :]  # (BM, BN), base 2
        if MASKED:
            s = tl.where(_keep(offs_m[:, None], cols[None, :], n_ctx, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + cols[:, None] * svn + offs_d[None, :], cols[:, None], n_ctx, d_ok[None, :],
                  MASKED, EVEN_D)  # (BN, D)  # fmt: skip
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, A, B, O, LSE, KN2,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, n_heads, n_ctx,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              PRE_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # one program: a block of BLOCK_M queries, looping over key blocks. KN2 (B, H, N) when PRE_NORM.
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = bh % n_heads
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    a2 = tl.load(A + off_h) * 1.4426950408889634
    b2 = tl.load(B + off_h) * 1.4426950408889634
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    q_ptrs = Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
    q = _load(q_ptrs, offs_m[:, None], n_ctx, d_ok[None, :], True, EVEN_D)  # (BM, D)
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
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kn2_base, skn, svn, a2, b2, offs_m, offs_d,
                               d_ok, 0, lo, n_ctx, BLOCK_N, False, CAUSAL, EVEN_D, PRECISION, PRE_NORM)  # fmt: skip
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kn2_base, skn, svn, a2, b2, offs_m, offs_d,
                               d_ok, lo, hi, n_ctx, BLOCK_N, True, CAUSAL, EVEN_D, PRECISION, PRE_NORM)  # fmt: skip
    acc = acc / l_i[:, None]
    row_ok = offs_m < n_ctx
    tl.store(LSE + bh.to(tl.int64) * n_ctx + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = O + off_b * sob + off_h * soh + offs_m[:, None] * son + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _key_norms(K, KN2, skb, skh, skn, n_heads, n_ctx, row_stride,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # ||k_j||^2 in float32, a row of row_stride >= N per (batch, head): (B, H, N) at row_stride N
    bh = tl.program_id(1)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = bh % n_heads
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    mask = (rows[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
    k_ptrs = K + off_b * skb + off_h * skh + rows[:, None] * skn + offs_d[None, :]
    k = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(KN2 + bh.to(tl.int64) * row_stride + rows, tl.sum(k * k, 1), mask=rows < n_ctx)


# ----------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_preprocess(O, DO, K, DELTA, KN2,
                    sob, soh, son, sdb, sdh, sdn, skb, skh, skn, n_heads, n_ctx, delta_stride,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                    NORMS: tl.constexpr = True):  # fmt: skip
    # delta_i = sum_d O_id dO_id, float32 rows of delta_stride >= N per (batch, head) ((B, H, N) at N), and
    # where NORMS ||k_i||^2, float32 (B, H, N) (K and KN2 are not touched otherwise: the backward got the
    # norms from its forward)
    bh = tl.program_id(1)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = bh % n_heads
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    mask = (rows[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
    tile = rows[:, None] * son + offs_d[None, :]
    o = tl.load(O + off_b * sob + off_h * soh + tile, mask=mask, other=0.0).to(tl.float32)
    tile = rows[:, None] * sdn + offs_d[None, :]
    do = tl.load(DO + off_b * sdb + off_h * sdh + tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * delta_stride + rows, tl.sum(o * do, 1), mask=rows < n_ctx)
    if NORMS:
        tile = rows[:, None] * skn + offs_d[None, :]
        k = tl.load(K + off_b * skb + off_h * skh + tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(KN2 + bh.to(tl.int64) * n_ctx + rows, tl.sum(k * k, 1), mask=rows < n_ctx)


@triton.jit
def _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, q_base, do_base, lse_base, delta_base, sqn, sdn,
                a2, cols, offs_d, d_ok, lo, hi, n_ctx,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m  # (BM,)
        qT = _load(q_base + rows[None, :] * sqn + offs_d[:, None], rows[None, :], n_ctx, d_ok[:, None],
                   MASKED, EVEN_D)  # (D, BM)  # fmt: skip
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < n_ctx, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < n_ctx, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        sT = tl.dot(k, qT, input_precision=PRECISION) * a2 - key_bias[:, None]  # (BN, BM)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            pT = tl.where(_keep(rows[None, :], cols[:, None], n_ctx, CAUSAL), pT, 0.0)
        do = _load(do_base + rows[:, None] * sdn + offs_d[None, :], rows[:, None], n_ctx, d_ok[None, :],
                   MASKED, EVEN_D)  # (BM, D)  # fmt: skip
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk_acc = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk_acc, input_precision=PRECISION)
        colsum += tl.sum(dsT, 1)
    return dk_acc, dv, colsum


@triton.jit
def _attn_bwd_dkdv(Q, K, V, A, B, DO, LSE, DELTA, KN2, DK, DV, DA_ROWS, DB_ROWS,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, n_heads, n_ctx,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # one program: a block of BLOCK_N keys, looping over query blocks. DK, DV contiguous (B, H, N, D).
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = bh % n_heads
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    a = tl.load(A + off_h)
    b = tl.load(B + off_h)
    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row_base = bh.to(tl.int64) * n_ctx
    k = _load(K + off_b * skb + off_h * skh + cols[:, None] * skn + offs_d[None, :], cols[:, None], n_ctx,
              d_ok[None, :], True, EVEN_D)  # (BN, D)  # fmt: skip
    v = _load(V + off_b * svb + off_h * svh + cols[:, None] * svn + offs_d[None, :], cols[:, None], n_ctx,
              d_ok[None, :], True, EVEN_D)  # (BN, D)  # fmt: skip
    kn2 = tl.load(KN2 + row_base + cols, mask=cols < n_ctx, other=0.0)  # (BN,)
    key_bias = kn2 * (b * 1.4426950408889634)
    q_base = Q + off_b * sqb + off_h * sqh
    do_base = DO + off_b * sdb + off_h * sdh
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
    q_lse = LSE + row_base
    q_delta = DELTA + row_base
    a2 = a * 1.4426950408889634
    dk_acc, dv, colsum = _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, q_base, do_base, q_lse, q_delta,
                                     sqn, sdn, a2, cols, offs_d, d_ok, lo, hi, n_ctx,
                                     BLOCK_M, True, CAUSAL, EVEN_D, PRECISION)  # fmt: skip
    dk_acc, dv, colsum = _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, q_base, do_base, q_lse, q_delta,
                                     sqn, sdn, a2, cols, offs_d, d_ok, hi, n_even, n_ctx,
                                     BLOCK_M, False, CAUSAL, EVEN_D, PRECISION)  # fmt: skip
    dk_acc, dv, colsum = _dkdv_inner(dk_acc, dv, colsum, k, v, key_bias, q_base, do_base, q_lse, q_delta,
                                     sqn, sdn, a2, cols, offs_d, d_ok, tail, n_ctx, n_ctx,
                                     BLOCK_M, True, CAUSAL, EVEN_D, PRECISION)  # fmt: skip
    kf = k.to(tl.float32)
    dk = a * dk_acc - (2.0 * b) * colsum[:, None] * kf
    col_ok = cols < n_ctx
    tl.store(DA_ROWS + row_base + cols, tl.sum(dk_acc * kf, 1), mask=col_ok)
    tl.store(DB_ROWS + row_base + cols, -colsum * kn2, mask=col_ok)
    out = bh.to(tl.int64) * n_ctx * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq_acc, q, do, lse, delta, k_base, v_base, kn2_base, skn, svn, a2, b2, offs_m, offs_d, d_ok,
              lo, hi, n_ctx, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_D: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BN,)
        kT = _load(k_base + cols[None, :] * skn + offs_d[:, None], cols[None, :], n_ctx, d_ok[:, None],
                   MASKED, EVEN_D)  # (D, BN)  # fmt: skip
        vT = _load(v_base + cols[None, :] * svn + offs_d[:, None], cols[None, :], n_ctx, d_ok[:, None],
                   MASKED, EVEN_D)  # (D, BN)  # fmt: skip
        if MASKED:
            kn2 = tl.load(kn2_base + cols, mask=cols < n_ctx, other=0.0)
        else:
            kn2 = tl.load(kn2_base + cols)
        s = tl.dot(q, kT, input_precision=PRECISION) * a2 - (kn2 * b2)[None, :]  # (BM, BN)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_keep(offs_m[:, None], cols[None, :], n_ctx, CAUSAL), p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq_acc = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq_acc, input_precision=PRECISION)
    return dq_acc


@triton.jit
def _attn_bwd_dq(Q, K, V, A, B, DO, LSE, DELTA, KN2, DQ,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, n_heads, n_ctx,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # one program: a block of BLOCK_M queries, looping over key blocks. DQ contiguous (B, H, N, D).
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = bh % n_heads
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    a = tl.load(A + off_h)
    b2 = tl.load(B + off_h) * 1.4426950408889634
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < n_ctx
    row_base = bh.to(tl.int64) * n_ctx
    q = _load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqn + offs_d[None, :], offs_m[:, None],
              n_ctx, d_ok[None, :], True, EVEN_D)  # (BM, D)  # fmt: skip
    do = _load(DO + off_b * sdb + off_h * sdh + offs_m[:, None] * sdn + offs_d[None, :], offs_m[:, None],
               n_ctx, d_ok[None, :], True, EVEN_D)  # (BM, D)  # fmt: skip
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq_acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if CAUSAL:
        lo = start_m * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, n_ctx)
    else:
        lo = (n_ctx // BLOCK_N) * BLOCK_N
        hi = n_ctx
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    a2 = a * 1.4426950408889634
    dq_acc = _dq_inner(dq_acc, q, do, lse, delta, k_base, v_base, KN2 + row_base, skn, svn, a2, b2,
                       offs_m, offs_d, d_ok, 0, lo, n_ctx, BLOCK_N, False, CAUSAL, EVEN_D, PRECISION)  # fmt: skip
    dq_acc = _dq_inner(dq_acc, q, do, lse, delta, k_base, v_base, KN2 + row_base, skn, svn, a2, b2,
                       offs_m, offs_d, d_ok, lo, hi, n_ctx, BLOCK_N, True, CAUSAL, EVEN_D, PRECISION)  # fmt: skip
    out = row_base * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (a * dq_acc).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim (16 and 32 use the 64 lists).
# fwd and dq: BLOCK_M % BLOCK_N == 0; dkdv: BLOCK_N % BLOCK_M == 0 (the causal diagonal is split there).
# The first config that fits shared memory is the one used when autotuning is off.

_GPU_CONFIGS = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        256: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 16, 4, 1)],
    },
    "dkdv": {
        64: [(32, 128, 4, 4), (64, 128, 8, 3), (32, 64, 4, 3)],
        128: [(64, 128, 8, 2), (32, 64, 4, 3), (32, 128, 8, 3)],
        256: [(32, 64, 4, 1), (16, 32, 4, 1)],
    },
    "dq": {
        64: [(128, 32, 4, 4), (128, 64, 8, 3), (64, 32, 4, 3)],
        128: [(128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
        256: [(64, 32, 4, 1), (32, 16, 4, 1)],
    },
}
# tiny tiles for the CPU interpreter: several blocks, ragged tails and split diagonals at small N
_INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
_SMEM_LIMIT = 200 * 1024
TUNING_KEY = ["n_ctx", "HEAD_DIM", "CAUSAL"]  # autotuned per sequence length, head size and causality


def _smem_bytes(kind: str, bm: int, bn: int, stages: int, d_pad: int, elem: int) -> int:
    # rough: resident tiles plus `stages` buffers of the streamed tiles
    resident, streamed = {"fwd": (bm, 2 * bn), "dkdv": (2 * bn, 2 * bm), "dq": (2 * bm, 2 * bn)}[kind]
    return elem * d_pad * (resident + stages * streamed)


def _make_prune(kind: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs[:1]
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        elem = named_args["Q"].element_size()
        table = _GPU_CONFIGS[kind][max(d_pad, 64)]
        fits = [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in table
            and _smem_bytes(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, d_pad, elem)
            <= _SMEM_LIMIT
        ]
        fits = fits or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return fits if AUTOTUNE else fits[:1]

    return prune


def _tuned(kernel, kind: str):
    if INTERPRET:
        specs = [_INTERPRET_CONFIGS[kind]]
    else:
        specs = list(dict.fromkeys(s for table in _GPU_CONFIGS[kind].values() for s in table))
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]
    return triton.autotune(
        configs=configs,
        key=TUNING_KEY,
        prune_configs_by={"early_config_prune": _make_prune(kind)},
    )(kernel)


_fwd_kernel = _tuned(_attn_fwd, "fwd")
_dkdv_kernel = _tuned(_attn_bwd_dkdv, "dkdv")
_dq_kernel = _tuned(_attn_bwd_dq, "dq")


# ----------------------------------------------------------------------------------------------------
# launchers, registered as torch.library custom ops (with fake shapes and autograd) so that
# torch.compile keeps them in the graph as opaque calls: no graph breaks, and autotuning runs as usual


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # every buffer the kernels write; tests replace this to poison them (unwritten elements show up)
    return torch.empty(shape, dtype=dtype, device=device)


def _dims(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    return dict(HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), PRECISION=precision)


@torch.library.custom_op("ablate::rbf_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    causal: bool,
    pre_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (o, lse, the key norms): the norms (B, H, N) when pre_norm, kept for the backward; else empty
    B, H, N, D = q.shape
    dims = _dims(q)
    o = _alloc((B, H, N, D), q.dtype, q.device)
    lse = _alloc((B, H, N), torch.float32, q.device)  # base-2 log-sum-exp per row
    kn2 = q.new_empty((0,), dtype=torch.float32)
    if pre_norm:
        kn2 = _alloc((B, H, N), torch.float32, q.device)
        block = 16 if INTERPRET else 64
        _key_norms[(triton.cdiv(N, block), B * H)](
            k, kn2, *k.stride()[:3], H, N, N, HEAD_DIM=D, D_PAD=dims["D_PAD"], BLOCK=block
        )
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, a, b, o, lse, kn2, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, N, CAUSAL=causal, PRE_NORM=pre_norm, **dims,
    )  # fmt: skip
    return o, lse, kn2


@torch.library.custom_op("ablate::rbf_attention_bwd", mutates_args=())
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
    dims = _dims(q)
    delta = _alloc((B, H, N), torch.float32, q.device)  # (B, H, N)
    norms = kn2.numel() == 0  # the forward kept none (ABLATE_KEY_NORM=loop): the preprocess writes them
    if norms:
        kn2 = _alloc((B, H, N), torch.float32, q.device)
    block = 16 if INTERPRET else 64
    _bwd_preprocess[(triton.cdiv(N, block), B * H)](
        o, do, k, delta, kn2, *o.stride()[:3], *do.stride()[:3], *k.stride()[:3], H, N, N,
        HEAD_DIM=D, D_PAD=dims["D_PAD"], BLOCK=block, NORMS=norms,
    )  # fmt: skip
    dq, dk, dv = (_alloc((B, H, N, D), q.dtype, q.device) for _ in range(3))
    da_rows, db_rows = (_alloc((B, H, N), torch.float32, q.device) for _ in range(2))  # summed below
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], H, N)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)
    _dkdv_kernel[grid](
        q, k, v, a, b, do, lse, delta, kn2, dk, dv, da_rows, db_rows, *strides, CAUSAL=causal, **dims
    )
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    _dq_kernel[grid](q, k, v, a, b, do, lse, delta, kn2, dq, *strides, CAUSAL=causal, **dims)
    return dq, dk, dv, da_rows.sum((0, 2)), db_rows.sum((0, 2))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, a, b, causal, pre_norm):
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    kn2 = q.new_empty(q.shape[:3] if pre_norm else (0,), dtype=torch.float32)
    return o, q.new_empty(q.shape[:3], dtype=torch.float32), kn2


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, a, b, o, lse, kn2, causal):
    grads = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return (*grads, torch.empty_like(a), torch.empty_like(b))


def register_autograd(fwd_op, bwd_op) -> None:
    """Differentiate a fused attention op (q, k, v, a, b, causal, *flags) -> (o, lse, *kept) through its
    backward op (do, q, k, v, a, b, o, lse, *kept, causal) -> (dq, dk, dv, da, db). kept: what else the
    forward leaves for the backward (the fused ops here: the key norms, which the backward then skips).
    lse and kept get no gradient, and none is made for them: autograd would otherwise hand the backward a
    zero-filled tensor for each (4 bytes a query or key and head, held at the backward's peak)."""

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, a, b, causal = inputs[:6]
        o, *stats = output
        ctx.save_for_backward(q, k, v, a, b, o, *stats)
        ctx.causal, ctx.flags = causal, len(inputs) - 6  # causal and the flags get no gradient
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)  # do is o's gradient, which the backward is only run for

    def backward(ctx, do, *_stats_grads):  # _stats_grads: None
        do = do if do.stride(-1) == 1 else do.contiguous()
        return (*bwd_op(do, *ctx.saved_tensors, ctx.causal), None, *[None] * ctx.flags)

    fwd_op.register_autograd(backward, setup_context=setup_context)


register_autograd(_fwd_op, _bwd_op)


# ----------------------------------------------------------------------------------------------------
# public entry point


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    causal: bool = True,
) -> torch.Tensor:
    """Fused softmax(a*q.k - b*||k||^2) v. q, k, v: (B, H, N, D), one of fp16/bf16/fp32, 16 <= D <= 256;
    a, b: (H,). Returns (B, H, N, D) in q's dtype; differentiable in q, k, v, a and b."""
    return _attention(q, k, v, a, b, causal, PRE_NORM)


def _attention(q, k, v, a, b, causal: bool, pre_norm: bool) -> torch.Tensor:
    inputs = checked_inputs("triton", unsupported_reason(q, k, v, a, b), q, k, v, a, b)
    return _fwd_op(*inputs, causal, pre_norm)[0]


def checked_inputs(backend: str, reason: str | None, q, k, v, a, b) -> tuple[torch.Tensor, ...]:
    """The op's inputs: q, k, v with unit last stride, a and b as contiguous float32; a clear error when
    `reason` (the backend's unsupported_reason) says the kernels cannot run them."""
    if reason:
        raise ValueError(f"{backend} attention: {reason}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v, a.float().contiguous(), b.float().contiguous()


def unsupported_reason(q, k, v, a, b) -> str | None:
    """Why the fused kernel cannot run these inputs, or None when it can."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return f"q, k, v must share one (B, H, N, D) shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        return (
            f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not 16 <= q.shape[-1] <= 256:
        return f"head dim must be in [16, 256]; got {q.shape[-1]}"
    if a.shape != (q.shape[1],) or b.shape != (q.shape[1],):
        return f"a and b must have shape ({q.shape[1]},); got {tuple(a.shape)}, {tuple(b.shape)}"
    devices = {t.device for t in (q, k, v, a, b)}
    if len(devices) != 1:
        return f"all inputs must be on one device; got {sorted(map(str, devices))}"
    if q.device.type != "cuda" and not INTERPRET:
        return f"needs a CUDA device (or TRITON_INTERPRET=1); got {q.device}"
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch * heads must be <= 65535; got {q.shape[0] * q.shape[1]}"
    return None
