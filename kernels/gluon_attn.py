"""Hopper (sm90) forward of softmax(a*q.k - b*||k||^2) v written in Gluon, Triton's lower-level dialect.

Why Gluon: the tl.dot kernels of triton_attn_tma.py wait for each wgmma right after issuing it, so the
softmax of one key tile never runs while the tensor cores work on another (README, "triton-tma"). Here
the waits are explicit (FlashAttention-3's overlap within a warp group): each loop step issues the next
key tile's q.k and this tile's P.V back to back, waits for q.k only, and runs the next tile's softmax
while P.V is still in flight. K and V tiles arrive by TMA into a ring of STAGES buffers: a stage is
refilled with the tile STAGES ahead as soon as P.V has read it.

Same math and outputs as triton_attn_tma's forward: scores in base 2, the key norms from
triton_attn._key_norms and a base-2 log-sum-exp per row, so that the backward kernels of
triton_attn_tma.py take this forward's output unchanged. q, k and v are read through 2-D descriptors over
(B*H*N, D): a tile that runs past a head's last key reads the next head's rows (zeros past the tensor),
which the mask on the scores removes. Head dims 64 and 128, fp16 and bf16 (unsupported_reason says why
not otherwise). Gluon has no interpreter: this runs on an sm90 GPU only.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon's Hopper API as of Triton 3.6 (the GPU benchmark machine's)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    IMPORT_ERROR: str | None = None
except ImportError as err:  # pragma: no cover - depends on the installed Triton
    IMPORT_ERROR = f"this Triton ({triton.__version__}) has no Gluon Hopper API: {err}"

from kernels import triton_attn as base

LOG2E = 1.4426950408889634  # log2(e): scores live in base 2
_LOG2E = gl.constexpr(LOG2E) if IMPORT_ERROR is None else None
HEAD_DIMS = (64, 128)

# (BLOCK_M, BLOCK_N, num_warps, STAGES) per head dim, fastest first (kernels/bench_gluon.py); BLOCK_M is
# 64 rows per warp group of 4 warps
CONFIGS = {
    64: [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    128: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3)],
}


if IMPORT_ERROR is None:

    @gluon.jit
    def _softmax_step(s, kn2, m_i, l_i, start_n, rows, offs_n, a2, b2, mask_from, n_ctx,
                      CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr,
                      dtype: gl.constexpr):  # fmt: skip
        # one key tile's raw scores q.k (BM, BN) in float32 and key norms (BN,) -> P (in the register
        # layout that P.V's wgmma reads), the factor that rescales the running sums, the new row max and
        # row sum
        cols = start_n + offs_n
        s = s * a2 - gl.expand_dims(kn2 * b2, 0)
        if start_n + BLOCK_N > mask_from:  # the causal diagonal or the ragged tail
            keep = gl.expand_dims(cols, 0) < n_ctx
            if CAUSAL:
                keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1))
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_i

    @gluon.jit
    def _load_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, row, stage, pred):
        bar_k = k_bars.index(stage)
        mbarrier.expect(bar_k, desc_k.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(desc_k, [row, 0], bar_k, k_smem.index(stage), pred=pred)
        bar_v = v_bars.index(stage)
        mbarrier.expect(bar_v, desc_v.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(desc_v, [row, 0], bar_v, v_smem.index(stage), pred=pred)

    @gluon.jit
    def _attn_fwd(desc_q, desc_k, desc_v, A, B, O, LSE, KN2, sob, soh, son, n_heads, n_ctx,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        # one program: BLOCK_M queries of one (batch, head), looping over its key tiles. desc_*: 2-D
        # descriptors over (B*H*N, D); KN2, LSE (B, H, N) float32; O (B, H, N, D) with strides sob, soh, son
        BLOCK_M: gl.constexpr = desc_q.block_type.shape[0]
        D: gl.constexpr = desc_q.block_type.shape[1]
        BLOCK_N: gl.constexpr = desc_k.block_type.shape[0]
        dtype: gl.constexpr = desc_q.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        # the longest causal rows first, so that the short ones fill the last wave
        start_m = gl.num_programs(0) - 1 - gl.program_id(0)
        bh = gl.program_id(1)
        off_b = bh // n_heads
        off_h = bh % n_heads
        row0 = bh * n_ctx  # this head's first row in the (B*H*N, D) view
        q_start = start_m * BLOCK_M
        a2 = gl.load(A + off_h) * _LOG2E
        b2 = gl.load(B + off_h) * _LOG2E
        if CAUSAL:
            hi = gl.minimum(q_start + BLOCK_M, n_ctx)
            mask_from = q_start
        else:
            hi = n_ctx
            mask_from = n_ctx
        n_tiles = (hi + BLOCK_N - 1) // BLOCK_N

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)

        mbarrier.expect(q_bar, desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [row0 + q_start, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            _load_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, row0 + i * BLOCK_N, i, i < n_tiles)

        rows = q_start + gl.arange(0, BLOCK_M, layout=rows_s)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        kn2_base = KN2 + bh.to(gl.int64) * n_ctx
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)

        # tile 0: its scores, then its P (nothing to rescale yet)
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        kn2 = gl.load(kn2_base + offs_n, mask=offs_n < n_ctx, other=0.0)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, alpha, m_i, l_i = _softmax_step(s, kn2, m_i, l_i, 0, rows, offs_n, a2, b2, mask_from, n_ctx,
                                           CAUSAL, BLOCK_N, p_layout, dtype)  # fmt: skip
        # step j: issue q.k of tile j and P.V of tile j - 1, wait for q.k, softmax of tile j while P.V
        # runs, wait for P.V, rescale, refill the freed stage
        for j in range(1, n_tiles):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bars.index(stage), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)  # fmt: skip
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            cols = j * BLOCK_N + offs_n  # the key norms' load, issued while both matmuls run
            kn2 = gl.load(kn2_base + cols, mask=cols < n_ctx, other=0.0)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            p, alpha, m_i, l_i = _softmax_step(s, kn2, m_i, l_i, j * BLOCK_N, rows, offs_n, a2, b2,
                                               mask_from, n_ctx, CAUSAL, BLOCK_N, p_layout, dtype)  # fmt: skip
            acc = warpgroup_mma_wait(0, deps=(acc_tok,))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
            nxt = j - 1 + STAGES  # tile j - 1's stage is free: load tile nxt into it
            _load_kv(
                desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, row0 + nxt * BLOCK_N, prev, nxt < n_tiles
            )
        last = (n_tiles - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_tiles - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))

        l_o = gl.convert_layout(l_i, rows_o)
        acc = acc / gl.expand_dims(l_o, 1)
        row_ok = rows < n_ctx
        gl.store(LSE + bh.to(gl.int64) * n_ctx + rows, m_i + gl.log2(l_i), mask=row_ok)
        rows_out = q_start + gl.arange(0, BLOCK_M, layout=rows_o)
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = (O + off_b.to(gl.int64) * sob + off_h * soh + gl.expand_dims(rows_out, 1) * son
                  + gl.expand_dims(offs_d, 0))  # fmt: skip
        gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(rows_out < n_ctx, 1))


def _gl_dtype(dtype: torch.dtype):
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A 2-D descriptor over t's (B*H*N, D) rows (a contiguous copy where t's rows do not flatten), tiles
    of `rows` rows in the swizzled layout wgmma reads."""
    flat = t.reshape(-1, t.shape[-1])
    if flat.stride(-1) != 1 or flat.data_ptr() % 16:
        flat = flat.contiguous()
    layout = gl.NVMMASharedLayout.get_default_for([rows, t.shape[-1]], _gl_dtype(t.dtype))
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, t.shape[-1]], layout)


def forward(q, k, v, a, b, causal: bool, config: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) for (B, H, N, D) q, k, v on an sm90 GPU; lse is the base-2 log-sum-exp per row (B, H, N),
    as triton_attn_tma's forward writes it. `config` is (BLOCK_M, BLOCK_N, num_warps, STAGES)."""
    B, H, N, D = q.shape
    block_m, block_n, warps, stages = config or CONFIGS[D][0]
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    kn2 = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    base._key_norms[(triton.cdiv(N, 64), B * H)](k, kn2, *k.stride()[:3], H, N, HEAD_DIM=D, D_PAD=D, BLOCK=64)
    grid = (triton.cdiv(N, block_m), B * H)
    _attn_fwd[grid](
        _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), a, b, o, lse, kn2,
        *o.stride()[:3], H, N, CAUSAL=causal, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return o, lse


def unsupported_reason(q, k, v, a, b) -> str | None:
    """Why the Gluon forward cannot run these inputs, or None when it can."""
    if IMPORT_ERROR:
        return IMPORT_ERROR
    reason = base.unsupported_reason(q, k, v, a, b)
    if reason:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Gluon kernel is for fp16 and bf16; got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the Gluon kernel takes head dims {HEAD_DIMS}; got {q.shape[-1]}"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "the Gluon kernel needs an sm90 GPU (Hopper)"
    return None
