"""Experiment: a one-kernel backward whose key blocks add dS k into a float32 dq accumulator by TMA bulk
reduce (Triton's desc.atomic_add, cp.reduce.async.bulk on sm90), instead of a dq kernel recomputing S and
dP. `python -m kernels.tma_reduce_dq` on an sm90 GPU checks it against triton_attn_tma's two kernels
(bf16) and times both against SDPA-cuDNN's backward; the shipped kernels run at their first config."""

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import triton_attn as base
from kernels import triton_attn_tma as tt
from kernels.triton_attn import _keep


@triton.jit
def _inner(
    dk_acc,
    dv,
    colsum,
    k,
    v,
    key_bias,
    desc_q,
    desc_do,
    desc_dq,
    lse_base,
    delta_base,
    off_b,
    off_h,
    a2,
    cols,
    lo,
    hi,
    n_ctx,
    BLOCK_M: tl.constexpr,
    D_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in tl.range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = desc_q.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, D_PAD)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < n_ctx, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < n_ctx, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * a2 - key_bias[:, None]
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            pT = tl.where(_keep(rows[None, :], cols[:, None], n_ctx, CAUSAL), pT, 0.0)
        do = desc_do.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, D_PAD)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        ds = dsT.to(q.dtype)
        dk_acc = tl.dot(ds, q, dk_acc, input_precision=PRECISION)
        colsum += tl.sum(dsT, 1)
        dq = tl.dot(tl.trans(ds), k, input_precision=PRECISION)  # (BM, D) this key block's share of dS k
        desc_dq.atomic_add([off_b, off_h, start_m, 0], dq.reshape(1, 1, BLOCK_M, D_PAD))
    return dk_acc, dv, colsum


@triton.jit
def _dkdv_reduce(
    Q,
    K,
    V,
    DO,
    DQ,
    A,
    B,
    LSE,
    DELTA,
    KN2,
    DK,
    DV,
    DA_ROWS,
    DB_ROWS,
    n_heads,
    n_ctx,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    off_b = bh // n_heads
    off_h = bh % n_heads
    a = tl.load(A + off_h)
    b = tl.load(B + off_h)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_base = bh.to(tl.int64) * n_ctx
    k = K.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)
    v = V.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D_PAD)
    col_ok = cols < n_ctx
    kn2 = tl.load(KN2 + row_base + cols, mask=col_ok, other=0.0)
    key_bias = kn2 * (b * 1.4426950408889634)
    dk_acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    colsum = tl.zeros([BLOCK_N], tl.float32)
    n_even = (n_ctx // BLOCK_M) * BLOCK_M
    if CAUSAL:
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
    dk_acc, dv, colsum = _inner(
        dk_acc,
        dv,
        colsum,
        k,
        v,
        key_bias,
        Q,
        DO,
        DQ,
        lse_base,
        delta_base,
        off_b,
        off_h,
        a2,
        cols,
        lo,
        hi,
        n_ctx,
        BLOCK_M,
        D_PAD,
        True,
        CAUSAL,
        PRECISION,
    )
    dk_acc, dv, colsum = _inner(
        dk_acc,
        dv,
        colsum,
        k,
        v,
        key_bias,
        Q,
        DO,
        DQ,
        lse_base,
        delta_base,
        off_b,
        off_h,
        a2,
        cols,
        hi,
        n_even,
        n_ctx,
        BLOCK_M,
        D_PAD,
        False,
        CAUSAL,
        PRECISION,
    )
    dk_acc, dv, colsum = _inner(
        dk_acc,
        dv,
        colsum,
        k,
        v,
        key_bias,
        Q,
        DO,
        DQ,
        lse_base,
        delta_base,
        off_b,
        off_h,
        a2,
        cols,
        tail,
        n_ctx,
        n_ctx,
        BLOCK_M,
        D_PAD,
        True,
        CAUSAL,
        PRECISION,
    )
    kf = k.to(tl.float32)
    dk = a * dk_acc - (2.0 * b) * colsum[:, None] * kf
    tl.store(DA_ROWS + row_base + cols, tl.sum(dk_acc * kf, 1), mask=col_ok)
    tl.store(DB_ROWS + row_base + cols, -colsum * kn2, mask=col_ok)
    out = row_base * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


def _desc(t, rows, d_pad):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d_pad])


def launch_args(q, k, v, do, a, b, lse, cfg, causal=True):
    B, H, N, D = q.shape
    dims = base._dims(q)
    dp = dims["D_PAD"]
    bm, bn, w, s = cfg
    delta, kn2 = (torch.empty((B, H, N), dtype=torch.float32, device=q.device) for _ in range(2))
    dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(2))
    da_rows, db_rows = (torch.empty((B, H, N), dtype=torch.float32, device=q.device) for _ in range(2))
    dq_acc = torch.zeros((B, H, N, dp), dtype=torch.float32, device=q.device)
    args = (
        _desc(q, bm, dp),
        _desc(k, bn, dp),
        _desc(v, bn, dp),
        _desc(do, bm, dp),
        _desc(dq_acc, bm, dp),
        a,
        b,
        lse,
        delta,
        kn2,
        dk,
        dv,
        da_rows,
        db_rows,
        H,
        N,
    )
    kw = dict(CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **dims)
    return args, kw, (delta, kn2, dq_acc, dk, dv, da_rows, db_rows)


def backward(do, q, k, v, a, b, o, lse, cfg, causal=True):
    B, H, N, D = q.shape
    args, kw, (delta, kn2, dq_acc, dk, dv, da_rows, db_rows) = launch_args(
        q, k, v, do, a, b, lse, cfg, causal
    )
    dims = base._dims(q)
    base._bwd_preprocess[(triton.cdiv(N, 64), B * H)](
        o,
        do,
        k,
        delta,
        kn2,
        *o.stride()[:3],
        *do.stride()[:3],
        *k.stride()[:3],
        H,
        N,
        HEAD_DIM=D,
        D_PAD=dims["D_PAD"],
        BLOCK=64,
    )
    _dkdv_reduce[(triton.cdiv(N, cfg[1]), B * H)](*args, **kw)
    dq = (dq_acc[..., :D] * a.view(1, H, 1, 1)).to(q.dtype)
    return dq, dk, dv, da_rows.sum((0, 2)), db_rows.sum((0, 2))


CFGS = {
    64: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2)],
    128: [(32, 64, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2)],
}

if __name__ == "__main__":
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    torch.manual_seed(0)
    tt.AUTOTUNE = False  # the shipped kernels at their first config: no autotuning time here
    # check against the shipped two-kernel backward (float64 reference too at small N)
    for N, D in ((257, 64), (1024, 128), (2048, 64)):
        B, H = 2, 3
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        a = torch.rand(H, device="cuda") * 0.2 + 0.05
        b = torch.rand(H, device="cuda") * 0.1
        o, lse = tt._fwd_op(q, k, v, a, b, True)
        want = tt._bwd_op(do, q, k, v, a, b, o, lse, True)
        for cfg in CFGS[D]:
            got = backward(do, q, k, v, a, b, o, lse, cfg)
            errs = [
                ((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
                for g, w in zip(got, want)
            ]
            print("check", N, D, cfg, " ".join(f"{e:.1e}" for e in errs), flush=True)
    H = 16
    for N, D in ((4096, 64), (16384, 64), (4096, 128), (16384, 128)):
        B = 65536 // N
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        g = 1 / math.sqrt(D)
        a = torch.full((H,), 2 * g, device="cuda")
        b = torch.full((H,), g, device="cuda")
        o, lse = tt._fwd_op(q, k, v, a, b, True)
        t_two = do_bench(lambda: tt._bwd_op(do, q, k, v, a, b, o, lse, True))
        t_red = {c: do_bench(lambda c=c: backward(do, q, k, v, a, b, o, lse, c)) for c in CFGS[D]}
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            oc = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        t_cud = do_bench(lambda: torch.autograd.grad(oc, (qq, kk, vv), do, retain_graph=True))
        best = min(t_red.values())
        print(
            f"bench bf16 N {N} D {D}: cudnn bwd {t_cud:.3f} | two-kernel {t_two:.3f} ({t_two / t_cud:.2f}x, first configs) | reduce "
            + ", ".join(f"{c}: {t:.3f}" for c, t in t_red.items())
            + f" | best {best / t_cud:.2f}x cudnn, {best / t_two:.2f}x two-kernel",
            flush=True,
        )
