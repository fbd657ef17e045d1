"""Hopper (sm90) forward of softmax(a*q.k - b*||k||^2) v in Gluon, with ping-pong between warp groups.

Why: the tl.dot kernels of triton_attn_tma.py run the softmax, the exp2 and the matmuls of a tile mostly
one after another (README, "A forward with explicit wgmma waits"). Here, as in FlashAttention-3, each
program runs three warp-specialised partitions (gl.warp_specialize):

- two consumer warp groups, each with its own 64-row query tile of one (batch, head), take turns at the
  tensor cores: a consumer waits for its turn (an mbarrier), issues the next key tile's q.k and the
  previous tile's P.V, passes the turn to the other, and runs its softmax while the other's matmuls
  run. Within a consumer the waits are explicit: q.k is waited for before the softmax, P.V only before
  the rescale;
- one loader warp moves K and V tiles by TMA into a ring of STAGES buffers, refilling a stage once both
  consumers have released it (an mbarrier that counts two arrivals).

Registers are reallocated per partition (setmaxnreg): the consumers get CONSUMER_REGS, the loader
LOADER_REGS. Same math and outputs as triton_attn_tma's forward (base-2 scores, the key norms from
triton_attn._key_norms, a base-2 log-sum-exp per row), so triton_attn_tma's backward takes its output.
q, k and v are read through 2-D descriptors over (B*H*N, D): a tile running past a head's last key reads
the next head's rows (zeros past the tensor), which the mask on the scores removes.

Status: measured on an H200, not dispatched. Against triton_attn_tma's forward it is 0.88-0.90x the time at
D 128 and 1.10-1.16x at D 64 (README, "Ping-pong between warp groups"), so no backend runs it yet. Gluon
has no interpreter: `python -m kernels.gluon_attn check` checks it on an sm90 GPU against float64 math,
`... bench` times it against SDPA-cuDNN and triton-tma; tests/test_kernels.py compiles it for sm90 without
a GPU. Written against Triton 3.6 (the GPU machine's) and compiling with 3.9, whose TMA load is named
async_load.
"""

from __future__ import annotations

import sys

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
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

LOG2E = 1.4426950408889634  # scores live in base 2

# (BLOCK_M per consumer, BLOCK_N, STAGES, CONSUMER_REGS, LOADER_REGS) per head dim, as benchmarked
CONFIGS = {
    64: [(64, 128, 3, 232, 24), (64, 128, 2, 240, 24), (64, 128, 4, 240, 24)],
    128: [(64, 128, 2, 232, 24), (64, 128, 2, 240, 24)],
}

if IMPORT_ERROR is None:
    _LOG2E = gl.constexpr(LOG2E)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # 3.9 / 3.6 name

    @gluon.jit
    def _softmax_step(s, kn2, m_i, l_i, start_n, rows, offs_n, a2, b2, mask_from, n_ctx,
                      CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, p_layout: gl.constexpr,
                      dtype: gl.constexpr):  # fmt: skip
        # one key tile's raw scores q.k (BM, BN) and key norms (BN,) -> P (in the register layout that
        # P.V's wgmma reads), the factor that rescales the running sums, the new row max and row sum
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
    def _consumer(desc_q, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, empty, my_turn, other_turn,
                  A, B, O, LSE, KN2, sob, soh, son, n_heads, n_ctx, q_start, n_tiles, bh,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        # one warp group: the 64 query rows from q_start, over the key tiles the loader brings
        W: gl.constexpr = gl.num_warps()
        BLOCK_M: gl.constexpr = q_smem.shape[0]
        D: gl.constexpr = q_smem.shape[1]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, D, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        off_b = bh // n_heads
        off_h = bh % n_heads
        row0 = bh * n_ctx
        a2 = gl.load(A + off_h) * _LOG2E
        b2 = gl.load(B + off_h) * _LOG2E
        if CAUSAL:
            mask_from = q_start
        else:
            mask_from = n_ctx
        mbarrier.expect(q_bar, desc_q.block_type.nbytes)
        _tma_load(desc_q, [row0 + q_start, 0], q_bar, q_smem)
        rows = q_start + gl.arange(0, BLOCK_M, layout=rows_s)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        kn2_base = KN2 + bh.to(gl.int64) * n_ctx
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
        mbarrier.wait(q_bar, 0)

        # turn 0: tile 0's scores, then its P (nothing to rescale yet)
        mbarrier.wait(my_turn, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(other_turn)
        kn2 = gl.load(kn2_base + offs_n, mask=offs_n < n_ctx, other=0.0)
        s = warpgroup_mma_wait(0, deps=(s,))
        p, alpha, m_i, l_i = _softmax_step(s, kn2, m_i, l_i, 0, rows, offs_n, a2, b2, mask_from, n_ctx,
                                           CAUSAL, BLOCK_N, p_layout, dtype)  # fmt: skip
        # turn j: q.k of tile j and P.V of tile j - 1 issued, the turn passed on, tile j's softmax while
        # P.V runs, then the rescale and tile j - 1's stage released to the loader
        for j in range(1, n_tiles):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(my_turn, j & 1)
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)  # fmt: skip
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            mbarrier.arrive(other_turn)
            cols = j * BLOCK_N + offs_n
            kn2 = gl.load(kn2_base + cols, mask=cols < n_ctx, other=0.0)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            p, alpha, m_i, l_i = _softmax_step(s, kn2, m_i, l_i, j * BLOCK_N, rows, offs_n, a2, b2,
                                               mask_from, n_ctx, CAUSAL, BLOCK_N, p_layout, dtype)  # fmt: skip
            acc = warpgroup_mma_wait(0, deps=(acc_tok,))
            mbarrier.arrive(empty.index(prev))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        last = (n_tiles - 1) % STAGES
        mbarrier.wait(my_turn, n_tiles & 1)
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        mbarrier.arrive(other_turn)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))
        mbarrier.arrive(empty.index(last))

        acc = acc / gl.expand_dims(gl.convert_layout(l_i, rows_o), 1)
        gl.store(LSE + bh.to(gl.int64) * n_ctx + rows, m_i + gl.log2(l_i), mask=rows < n_ctx)
        rows_out = q_start + gl.arange(0, BLOCK_M, layout=rows_o)
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = (O + off_b.to(gl.int64) * sob + off_h * soh + gl.expand_dims(rows_out, 1) * son
                  + gl.expand_dims(offs_d, 0))  # fmt: skip
        gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(rows_out < n_ctx, 1))

    @gluon.jit
    def _loader(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, empty, row0, n_tiles, STAGES: gl.constexpr):
        # one warp: K and V tiles into the ring, each stage once both consumers have released it (the
        # first pass waits on the phase before a fresh barrier's, which has completed)
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        for t in range(n_tiles):
            s = t % STAGES
            mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(s), desc_k.block_type.nbytes)
            _tma_load(desc_k, [row0 + t * BLOCK_N, 0], k_ready.index(s), k_smem.index(s))
            mbarrier.expect(v_ready.index(s), desc_v.block_type.nbytes)
            _tma_load(desc_v, [row0 + t * BLOCK_N, 0], v_ready.index(s), v_smem.index(s))

    @gluon.jit
    def _attn_fwd(desc_q, desc_k, desc_v, A, B, O, LSE, KN2, sob, soh, son, n_heads, n_ctx,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                  LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        # one program: 2 * BLOCK_M queries of one (batch, head), the longest causal rows first. desc_*:
        # 2-D descriptors over (B*H*N, D); KN2, LSE (B, H, N) float32; O (B, H, N, D), strides sob, soh, son
        BLOCK_M: gl.constexpr = desc_q.block_type.shape[0]
        D: gl.constexpr = desc_q.block_type.shape[1]
        BLOCK_N: gl.constexpr = desc_k.block_type.shape[0]
        dtype: gl.constexpr = desc_q.dtype
        pair = gl.num_programs(0) - 1 - gl.program_id(0)
        bh = gl.program_id(1)
        q0 = pair * 2 * BLOCK_M
        if CAUSAL:  # both consumers run the second one's tiles (the first's extra rows are masked)
            hi = gl.minimum(q0 + 2 * BLOCK_M, n_ctx)
        else:
            hi = n_ctx
        n_tiles = (hi + BLOCK_N - 1) // BLOCK_N
        q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, D], desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_v.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bars.index(i), count=1)
            mbarrier.init(turns.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        fence_async_shared()
        mbarrier.arrive(turns.index(0))  # the first consumer takes the first turn
        gl.warp_specialize(
            [
                (_consumer, (desc_q, q_smem.index(0), q_bars.index(0), k_smem, v_smem, k_ready, v_ready, empty,
                             turns.index(0), turns.index(1), A, B, O, LSE, KN2, sob, soh, son, n_heads, n_ctx,
                             q0, n_tiles, bh, CAUSAL, STAGES)),
                (_consumer, (desc_q, q_smem.index(1), q_bars.index(1), k_smem, v_smem, k_ready, v_ready, empty,
                             turns.index(1), turns.index(0), A, B, O, LSE, KN2, sob, soh, son, n_heads, n_ctx,
                             q0 + BLOCK_M, n_tiles, bh, CAUSAL, STAGES)),
                (_loader, (desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, empty, bh * n_ctx, n_tiles,
                           STAGES)),
            ],
            [4, 1],
            [CONSUMER_REGS, LOADER_REGS],
        )  # fmt: skip


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A 2-D descriptor over t's (B*H*N, D) rows (reshape copies where they do not flatten), tiles of
    `rows` rows in the swizzled layout wgmma reads."""
    flat = t.reshape(-1, t.shape[-1])
    dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[t.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([rows, t.shape[-1]], dtype)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, t.shape[-1]], layout)


def launch_args(q, k, v, a, b, o, lse, kn2, causal: bool, config: tuple) -> tuple[tuple, dict, tuple]:
    """(args, constexprs, grid) of one launch of _attn_fwd."""
    B, H, N, _ = q.shape
    block_m, block_n, stages, consumer_regs, loader_regs = config
    args = (_descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), a, b, o, lse, kn2,
            *o.stride()[:3], H, N)  # fmt: skip
    meta = dict(
        CAUSAL=causal, STAGES=stages, CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs, num_warps=4
    )
    return args, meta, (triton.cdiv(N, 2 * block_m), B * H)


def forward(q, k, v, a, b, causal: bool, config: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) for (B, H, N, D) bf16/fp16 q, k, v on an sm90 GPU, D 64 or 128; lse is the base-2 log-sum-
    exp per row (B, H, N), as triton_attn_tma's forward writes it."""
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    kn2 = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    base._key_norms[(triton.cdiv(N, 64), B * H)](k, kn2, *k.stride()[:3], H, N, HEAD_DIM=D, D_PAD=D, BLOCK=64)
    args, meta, grid = launch_args(q, k, v, a, b, o, lse, kn2, causal, config or CONFIGS[D][0])
    _attn_fwd[grid](*args, **meta)
    return o, lse


def _check() -> bool:
    from kernels import reference

    ok = True
    for n, d, causal in (
        (64, 64, True),
        (257, 64, True),
        (257, 128, False),
        (1000, 128, True),
        (2048, 64, False),
    ):
        batch, heads = 2, 3
        q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        a = torch.rand(heads, device="cuda") * 0.2 + 0.05
        b = torch.rand(heads, device="cuda") * 0.1
        want = reference.attention_reference(*(t.double() for t in (q, k, v, a, b)), causal=causal)
        for config in CONFIGS[d]:
            o, _ = forward(q, k, v, a, b, causal, config)
            torch.cuda.synchronize()
            err = ((o.double() - want).abs().max() / want.abs().max()).item()
            ok &= err < 1e-2
            print("check", n, d, causal, config, f"{err:.2e}", "ok" if err < 1e-2 else "FAIL", flush=True)
    return ok


def _bench_shape(n: int, d: int) -> str:
    # kernels.bench's shapes, rbf inputs and SDPA-cuDNN runner: causal forward ms and TFLOP/s
    from torch.nn.attention import SDPBackend
    from triton.testing import do_bench

    from kernels import bench, triton_attn_tma

    batch = bench.TOKENS // n
    (q, k, v), a, b, _ = bench._inputs(batch, n, d, torch.bfloat16, "rbf")
    q, k, v = (t.detach() for t in (q, k, v))
    cudnn = bench._sdpa(SDPBackend.CUDNN_ATTENTION)
    t_cudnn = do_bench(lambda: cudnn(q, k, v, a, b))
    t_tma = do_bench(lambda: triton_attn_tma._fwd_op(q, k, v, a, b, True))
    t_ws = {c: do_bench(lambda c=c: forward(q, k, v, a, b, True, c)) for c in CONFIGS[d]}
    best = min(t_ws.values())
    flops = 2 * batch * bench.HEADS * n * n * d
    return (
        f"bench bf16 N {n} D {d}: cudnn {t_cudnn:.3f} ({flops / t_cudnn / 1e9:.0f}) "
        f"tma {t_tma:.3f} ({flops / t_tma / 1e9:.0f}) ws "
        + ", ".join(f"{c}: {t:.3f}" for c, t in t_ws.items())
        + f" | best {best / t_cudnn:.2f}x cudnn {best / t_tma:.2f}x tma ({flops / best / 1e9:.0f} TF)"
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1:] == ["check"]:
        sys.exit(0 if _check() else 1)
    for n, d in ((4096, 64), (16384, 64), (4096, 128), (16384, 128)):
        print(_bench_shape(n, d), flush=True)
