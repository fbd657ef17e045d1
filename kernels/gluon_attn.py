"""Hopper (sm90) softmax(a*q.k - b*||k||^2) v in Gluon, forward and backward, with ping-pong between warp
groups: the `gluon` attention backend.

Why: the tl.dot kernels of triton_attn_tma.py run the softmax, the exp2 and the matmuls of a tile mostly
one after another ("A forward with explicit wgmma waits"; quoted titles in this file are sections of
kernels/README.md, where the measurements behind it are written up). Here, as in FlashAttention-3, each
program runs three warp-specialised partitions (gl.warp_specialize; four in the one-kernel backward):

- two consumer warp groups (three in the forward at D 64) take turns at the tensor cores: a consumer waits
  for its turn (an mbarrier), issues its matmuls, passes the turn to the next and runs its element-wise
  work while the others' matmuls run. Within a consumer the waits are explicit: the source waits for the
  matmuls that accumulate (P.V in the forward, dV and dK or dQ in the backward) only after the next
  tile's element-wise work, though in the forward ptxas places the wait before the softmax ("A
  consumer's softmax against its own P.V");
- one loader warp moves tiles by TMA into rings of STAGES buffers, refilling a stage once every consumer
  has released it (an mbarrier that counts their arrivals). The forward's k and v rings are released
  apart, k once every consumer's scores are in and v once their P.V has run (FlashAttention-3's separate
  K and V pipelines): with one release per stage, after P.V, the loader started a k tile's load about
  when a consumer waited for it ("The forward's k and v released apart").

The forward's consumers own 64 query rows each (a program's rows counted back from row N, so that rows
below 0, where N is not a multiple, fall in the program with the fewest causal keys) and the loader brings
k and v tiles, with each k tile its bias tile: a prepass (_key_bias) writes c = -(b / |a|) ||k||^2 per key
(-b ||k||^2 where a = 0) in three bf16 parts, which one more wgmma adds to q.k, and |a| log2(e) (log2(e)
where a = 0) scales the sum inside the exp2's argument, so that the element-wise work per score is
dot-product attention's ("The key bias in the score matmul"; computing the bias tiles in the
loader's warp group instead, from the k tiles in shared memory, made every forward 1.5-11.5% slower:
"The key bias computed by the loader"). Heads with a < 0 (a = 0) negate (zero) their q tile in shared
memory once, so that one loop serves every head ("One forward loop for every sign of a"). At D 64
three consumers (192 query rows a program, as FlashAttention-3's hdim-64 tiles) hide more of each one's
element-wise work behind the others' matmuls than two did ("Three forward consumers at D 64").
Causal, a consumer computes the key tiles up to its own last row and only takes its turns in the program's
later ones ("Forward consumers stop at their own rows").

The backward is one kernel: each consumer owns 64 keys, the loader brings q and dO tiles (and with each q tile
its rows' log-sum-exp, read in place from the forward's, and delta, which triton_attn._bwd_preprocess writes
in rows padded for TMA), and per query tile a consumer runs S^T, dP^T, dV and dK, and half of dQ: both
consumers store dS^T to shared memory and consumer c computes dQ's head-dim half c over both consumers' keys,
so dQ's accumulator is (64, D/2) and no share is summed (FlashAttention-3's hdim-128 split). A consumer stores
its half in the order of the registers that hold it (_fragment_order) and a writer warp adds both halves into
a float32 accumulator laid out the same way, by TMA reduce-add (cp.reduce.async.bulk.tensor);
_dq_from_fragments, a plain Triton kernel, then writes dq in natural order. At D 64 the backward is
persistent (_attn_bwd_p): one program per multiprocessor takes work items (the other kernel's programs) from
an atomic counter, and its loader brings the next item's key tiles into a second slot while the consumers
finish the last item ("A persistent backward at D 64"). The accumulator covers ACC_BYTES
of (batch, head) rows at a time, so peak memory stays near triton-tma's backward.

Registers are reallocated per partition (setmaxnreg): CONSUMER_REGS for a consumer, LOADER_REGS for the
loader (and the writer); with A_REGS a consumer keeps its own tiles in registers as the A operand of its
score matmuls. Same math and outputs as triton_attn_tma's to rounding (base-2 scores, the key norms computed
once per key by the forward's prepass and kept for the backward, a base-2 log-sum-exp per row, per-key da
and db rows summed on the host).
Tiles are read through rank-4 descriptors over each (B, H, N, D) tensor with its own strides, so rows past
N read as zeros per head and a qkv projection's views are read in place.

Status: on sm90 (bf16, fp16) the backend runs the Gluon forward from N 4096 at D 64 and N 1024 at D 128
(FWD_MIN_LEN; persistent at D 128, _attn_fwd_p), triton_attn_tma's forward below, where that one is
faster, and the one-kernel backward at both; the backward launches its compiled kernels directly
(_compiled), since through the JIT their host time bounded it at N 4096. An H200 measured its
forward+backward (rbf and penalty, the same kernels) at 0.96-1.00x SDPA-cuDNN's time at N 16384, D 64,
1.00-1.02x at N 16384, D 128, 0.99-1.06x at N 4096, D 128 and 1.00-1.05x at N 4096, D 64 (triton-tma:
1.28-1.43x; "The eight rows a third time", "A persistent forward at D 128", "The persistent
forward's work in pairs", "The eight rows with five repeats"; cuDNN's own rows vary by up to 15% between
repeats). Short of parity at N 4096, mostly in the forward: its kernel alone is 3.5-3.6% behind cuDNN's
and the key-bias prepass adds 3.5-4.2% ("The forward's gap at N 4096, kernel by kernel"); its work
per key tile costs cuDNN's or less, but each program pays about 6,000 cycles of its own and 1.3 us before
the next one starts on its multiprocessor ("Where a forward program's time goes"); the persistent
forward removes that at D 128, while at D 64 its key tiles ran slower by as much, in the consumers' own
work rather than in waits, mostly their exp2s queueing longer ("A persistent forward at D 128",
"The persistent forward at D 64 again", "Where the persistent forward's extra cycles go", "The forward's
gap at N 4096, kernel by kernel").
Gluon has no interpreter: `python -m kernels.gluon_attn check` checks every config on an sm90 GPU against
float64 math, `... bench` times them against SDPA-cuDNN and triton-tma; tests/test_kernels.py compiles
the kernels for sm90 without a GPU and tests/test_kernels_gpu.py checks the backend on one. Written
against Triton 3.6 (the GPU machine's) and compiling with 3.9, whose TMA load is named async_load and
whose reduce-add async_atomic_add.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin
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
from kernels import triton_attn_tma

LOG2E = 1.4426950408889634  # scores live in base 2

# per kernel and head dim, as benchmarked; the first is the default. fwd: (query rows per consumer, key tile,
# STAGES, CONSUMER_REGS, LOADER_REGS, A_REGS, CONSUMERS, persistent); bwd: (query tile, keys per consumer,
# STAGES, ..., A_REGS[, persistent]), two consumers; the backward persistent (_attn_bwd_p) only at D 64, where
# two slots of key tiles fit in shared memory (166 of 227 KB; "A persistent backward at D 64"), the
# forward (_attn_fwd_p) only at D 128, where it measured faster ("A persistent forward at D 128"; at
# D 64 it is no faster at N 4096 and 5% slower at N 16384, with two or three consumers and two or three
# stages: "The persistent forward at D 64 again").
# The backend takes the head dims of "bwd". Three forward consumers fit only at D 64: with the loader's warp
# group they share 512 registers a thread, 160 each (no spills with Triton 3.6, 104-120 bytes a thread with
# 3.9; "Three forward consumers at D 64", "One forward loop for every sign of a")
CONFIGS = {
    "fwd": {
        64: [(64, 128, 2, 160, 24, False, 3, False), (64, 128, 2, 232, 24, False, 2, False)],
        128: [(64, 128, 2, 240, 24, False, 2, True), (64, 128, 2, 240, 24, False, 2, False)],
    },
    "bwd": {
        64: [(64, 64, 3, 240, 24, False, True), (64, 64, 3, 240, 24, False), (64, 64, 4, 240, 24, False),
             (64, 64, 2, 240, 24, False)],
        128: [(64, 64, 2, 240, 24, False), (64, 64, 3, 240, 24, False)],
    },
}  # fmt: skip
# the backend's forward is the Gluon one from this many keys at a head dim, triton_attn_tma's below, where
# that one was faster (H200: at D 64 N 1024 0.58 against 0.62 ms, at D 128 N 256 0.53 against 0.56;
# "The key bias in the score matmul")
FWD_MIN_LEN = {64: 4096, 128: 1024}

if IMPORT_ERROR is None:
    _LOG2E = gl.constexpr(LOG2E)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # 3.9 / 3.6 name
    # a barrier of the threads that run it; inside a warp_specialize partition, of that partition's warps
    _warp_group_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # 3.9 / 3.6 name

    @builtin
    def _tma_add_36(tensor_desc, coord, src, _semantic=None):
        # TMA's reduce-add of a shared-memory tile into global memory (cp.reduce.async.bulk.tensor): Triton
        # 3.6's Gluon builder has the op but no wrapper; 3.8 on call it async_atomic_add
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_REDUCE_ADD, tensor_desc.handle, coord, src.handle)

    _REDUCE_ADD = __import__("triton._C.libtriton", fromlist=["ir"]).ir.DESCRIPTOR_REDUCE_KIND.ADD
    _tma_add = getattr(tma, "async_atomic_add", None) or _tma_add_36
    # the tiles' shared-memory layout: rows of 128 or 256 bytes (D 64 or 128 in 16 bits), 128-byte swizzle,
    # as wgmma reads them and as TMA writes a descriptor's (1, 1, rows, D) block
    _TILE_LAYOUT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # the one-kernel backward's float32 dQ tiles in fragment order (_fragment_order), unswizzled, as TMA
    # reads them
    _DQ_LAYOUT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    # per-row float32 values that arrive by TMA with a tile, (STAGES, C, cols) (_rows_descriptor): the
    # backward's log-sum-exp and delta (C = 2); unswizzled, so row-major
    _ROWS_LAYOUT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    # the forward's bias tiles (_key_bias): rows of 16 bf16 (32 bytes), as wgmma reads them
    _BIAS_LAYOUT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)

    @builtin
    def _as_rows(smem, _semantic=None):
        # such a (STAGES, C, cols) buffer as STAGES * C rows that a consumer reads one at a time (a view of
        # the same bytes; Triton 3.6 names the method _reinterpret, 3.9 reinterpret)
        stages, c, cols = (int(getattr(x, "value", x)) for x in smem.shape)
        rows = gl.SwizzledSharedLayout(1, 1, 1, [0])
        return _semantic.memdesc_reinterpret(smem, smem.dtype, [stages * c, cols], rows)

    @builtin
    def _function(fn, _semantic=None):
        # a gluon.jit function handed to another as an argument (which makes it a constexpr there) as
        # gl.warp_specialize takes its partitions' functions
        return getattr(fn, "value", fn)

    @gluon.jit
    def _fragment_order(x):
        # a consumer's (64, HALF) wgmma result -> (HALF / 4, 256) in the order of the registers that hold it:
        # row 16 w + 8 h + r, column 8 i + c (warp w, lane 4 r + c / 2) goes to row h HALF / 8 + i, column
        # 64 w + 8 r + c, so that each of a warp's stores writes 256 contiguous bytes (into the swizzled
        # (64, HALF) tile at D 128 a store took 6.5 shared-memory wavefronts, 2 here); _dq_from_fragments
        # undoes it
        gl.static_assert(x.shape[0] == 64)
        HALF: gl.constexpr = x.shape[1]
        x = gl.permute(gl.reshape(x, [4, 2, 8, HALF // 8, 8]), (1, 3, 0, 2, 4))
        return gl.reshape(x, [HALF // 4, 256])

    @gluon.jit
    def _load_tile(desc, bh, n_heads, row, bar, smem):
        # rows row.. of head bh of a (B, H, N, D) tensor into the 2-D buffer smem (zeros past N); arrives on bar
        ROWS: gl.constexpr = smem.shape[0]
        D: gl.constexpr = smem.shape[1]
        _tma_load(desc, [bh // n_heads, bh % n_heads, row, 0], bar, smem.reshape([1, 1, ROWS, D]))

    @gluon.constexpr_function
    def _wgmma_layout(warps, cols):
        # registers of a warp group's wgmma result with `cols` columns (64 rows a warp group, 16 a warp)
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, cols, 16])

    @gluon.constexpr_function
    def _operand_layout(parent):
        # registers of a 16-bit A operand of a wgmma whose result has layout `parent`
        return gl.DotOperandLayout(operand_index=0, parent=parent, k_width=2)

    @gluon.jit
    def _a_operand(smem, parent: gl.constexpr, IN_REGS: gl.constexpr):
        # a consumer's own tile as the A operand of its score matmuls: read from shared memory by each
        # wgmma, or loaded once into registers (a wgmma reading only B from shared memory needs half the
        # shared-memory bandwidth at the small N of these tiles)
        if IN_REGS:
            return smem.load(_operand_layout(parent))
        else:
            return smem

    @gluon.jit
    def _score_matmuls(a1, a2, ring1, ring2, ready1, ready2, my_turn, j, STAGES: gl.constexpr, zero):
        # a backward consumer's turn j: once it has the turn and stage j % STAGES of both rings has arrived,
        # issues a1 @ ring1[stage]^T and a2 @ ring2[stage]^T (S^T and dP^T); returns their tokens
        stage = j % STAGES
        mbarrier.wait(my_turn, j & 1)
        mbarrier.wait(ready1.index(stage), (j // STAGES) & 1)
        tok1 = warpgroup_mma(a1, ring1.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.wait(ready2.index(stage), (j // STAGES) & 1)
        tok2 = warpgroup_mma(a2, ring2.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
        return tok1, tok2

    @gluon.jit
    def _masked(s, cols, rows, start_n, mask_from, n_ctx, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
        # -inf above the diagonal (causal) or past N (not causal), only in the tiles that reach it. A forward
        # program's rows end at row N - 1 (_fwd_work), so the diagonal's keys are all below N
        if start_n + BLOCK_N > mask_from:
            if CAUSAL:
                keep = gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1)
            else:
                keep = gl.expand_dims(cols, 0) < n_ctx
            s = gl.where(keep, s, float("-inf"))
        return s

    @gluon.jit
    def _softmax_step(s, m_i, l_i, start_n, rows, offs_n, scale, mask_from, n_ctx, CAUSAL: gl.constexpr,
                      BLOCK_N: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr):  # fmt: skip
        # one key tile's scores (BM, BN) -> P (in the register layout that P.V's wgmma reads), the factor
        # that rescales the running sums, the new row max and row sum. The scores came from the matmuls as
        # sign(a) q.k + c (_consumer, _key_bias), and scale = |a| log2(e) > 0 (log2(e) where a = 0) scales
        # them inside the exp2's argument, as in dot-product attention: one floating-point operation a score
        # fewer than adding a key bias here, and the row max of the unscaled scores is the scaled ones'. Part
        # of the exp2s by a polynomial, or the rescale skipped while the row maxes hold, measured slower
        # ("The softmax's instructions")
        cols = start_n + offs_n
        s = _masked(s, cols, rows, start_n, mask_from, n_ctx, CAUSAL, BLOCK_N)
        m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
        p = gl.exp2(s * scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_i

    @gluon.jit
    def _fwd_tiles(q_a, ones, k_smem, v_smem, bias_smem, k_ready, v_ready, k_empty, v_empty, my_turn, other_turn,
                   scale, rows, mask_from, n_ctx, my_tiles, t0, g0, CAUSAL: gl.constexpr,
                   STAGES: gl.constexpr):  # fmt: skip
        # a forward consumer's first my_tiles key tiles of a work item -> (acc, row max, row sum), in turns
        # t0..t0 + my_tiles of the consumer's (a program's count of them so far: the parity of a turn's
        # barrier phase) over the program's key tiles g0.. (their ring stage and phase)
        W: gl.constexpr = gl.num_warps()
        BLOCK_M: gl.constexpr = rows.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        dtype: gl.constexpr = k_smem.dtype
        s_layout: gl.constexpr = _wgmma_layout(W, BLOCK_N)
        o_layout: gl.constexpr = _wgmma_layout(W, D)
        p_layout: gl.constexpr = _operand_layout(o_layout)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
        # turn 0: tile 0's scores, then its P (nothing to rescale yet)
        mbarrier.wait(my_turn, t0 & 1)
        mbarrier.wait(k_ready.index(g0 % STAGES), (g0 // STAGES) & 1)
        s = warpgroup_mma(
            q_a, k_smem.index(g0 % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        s = warpgroup_mma(ones, bias_smem.index(g0 % STAGES).permute((1, 0)), s, is_async=True)
        mbarrier.arrive(other_turn)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(g0 % STAGES))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, rows, offs_n, scale, mask_from, n_ctx, CAUSAL, BLOCK_N,
                                           p_layout, dtype)  # fmt: skip
        # turn j: q.k of tile j (with its key bias) and P.V of tile j - 1 issued and the turn passed on; tile
        # j's k stage released once its scores are in, its softmax while P.V runs, then tile j - 1's v stage
        # released and the output rescaled
        for j in range(1, my_tiles):
            g = g0 + j
            stage = g % STAGES
            prev = (g - 1) % STAGES
            mbarrier.wait(my_turn, (t0 + j) & 1)
            mbarrier.wait(k_ready.index(stage), (g // STAGES) & 1)
            s_tok = warpgroup_mma(q_a, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)  # fmt: skip
            s_tok = warpgroup_mma(ones, bias_smem.index(stage).permute((1, 0)), s_tok, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            mbarrier.arrive(other_turn)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(stage))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j * BLOCK_N, rows, offs_n, scale, mask_from, n_ctx,
                                               CAUSAL, BLOCK_N, p_layout, dtype)  # fmt: skip
            acc = warpgroup_mma_wait(0, deps=(acc_tok,))
            mbarrier.arrive(v_empty.index(prev))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        last = g0 + my_tiles - 1
        mbarrier.wait(my_turn, (t0 + my_tiles) & 1)
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(last % STAGES), acc, is_async=True)
        mbarrier.arrive(other_turn)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))
        mbarrier.arrive(v_empty.index(last % STAGES))
        return acc, m_i, l_i

    @gluon.jit
    def _pass_turns(k_ready, v_ready, k_empty, v_empty, my_turn, other_turn, my_tiles, n_tiles, t0, g0,
                    STAGES: gl.constexpr):  # fmt: skip
        # a forward consumer's turns over the item's key tiles my_tiles.. whose keys all lie past its rows:
        # every consumer takes n_tiles + 1 turns an item and releases every stage once it has arrived (so that
        # each release counts for its own tile)
        for j in range(my_tiles, n_tiles):
            g = g0 + j
            mbarrier.wait(my_turn, (t0 + j + 1) & 1)
            mbarrier.arrive(other_turn)
            mbarrier.wait(k_ready.index(g % STAGES), (g // STAGES) & 1)
            mbarrier.arrive(k_empty.index(g % STAGES))
            mbarrier.wait(v_ready.index(g % STAGES), (g // STAGES) & 1)
            mbarrier.arrive(v_empty.index(g % STAGES))

    @gluon.jit
    def _fwd_work(item, n_blocks, n_ctx, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        # forward work item -> (its (batch, head) row, first query row, key tiles): ROWS query rows counted
        # back from row N (block item % n_blocks: the longest causal rows first), so that the rows below 0
        # where N is not a multiple (read as zeros by TMA, never stored) fall in the block of the first rows,
        # the one with the fewest causal keys
        q0 = n_ctx - (item % n_blocks + 1) * ROWS
        if CAUSAL:  # every consumer takes the turns of the last one's tiles
            hi = q0 + ROWS
        else:
            hi = n_ctx
        return item // n_blocks, q0, (hi + BLOCK_N - 1) // BLOCK_N

    @gluon.jit
    def _consumer_rows(
        q_start, n_tiles, n_ctx, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr
    ):
        # a forward consumer's rows from q_start -> (the first key the causal mask applies to, the key tiles
        # it computes: causal, those up to its last row, at least one, as rows below 0 have none)
        if CAUSAL:
            return q_start, gl.maximum(gl.minimum((q_start + BLOCK_M + BLOCK_N - 1) // BLOCK_N, n_tiles), 1)
        else:
            return n_ctx, n_tiles

    @gluon.jit
    def _signed_q(q_smem, a, s_layout: gl.constexpr):
        # the scores' sign(a) q.k: a consumer's q tile negated (a < 0) or zeroed (a = 0) in place, once, so that
        # one copy of the loop serves every head; every warp's stores made visible to wgmma before any reads
        if a <= 0:
            q = q_smem.load(_operand_layout(s_layout))
            q_smem.store((q * gl.where(a < 0, -1.0, 0.0)).to(q_smem.dtype))
            fence_async_shared()
            _warp_group_barrier()

    @gluon.jit
    def _store_rows(acc, m_i, l_i, O, LSE, sob, soh, son, bh, n_heads, n_ctx, q_start):
        # a forward consumer's 64 rows from q_start of (batch, head) row bh: o = acc / l and the base-2
        # log-sum-exp; rows below 0 (the block of the first rows: _fwd_work) and past N are not stored
        BLOCK_M: gl.constexpr = acc.shape[0]
        D: gl.constexpr = acc.shape[1]
        o_layout: gl.constexpr = acc.type.layout
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        acc = acc / gl.expand_dims(gl.convert_layout(l_i, rows_o), 1)
        rows = q_start + gl.arange(0, BLOCK_M, layout=l_i.type.layout)
        gl.store(LSE + bh.to(gl.int64) * n_ctx + rows, m_i + gl.log2(l_i), mask=(rows >= 0) & (rows < n_ctx))
        rows_out = q_start + gl.arange(0, BLOCK_M, layout=rows_o)
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = (O + (bh // n_heads).to(gl.int64) * sob + (bh % n_heads) * soh + gl.expand_dims(rows_out, 1) * son
                  + gl.expand_dims(offs_d, 0))  # fmt: skip
        gl.store(
            o_ptrs, acc.to(O.dtype.element_ty), mask=gl.expand_dims((rows_out >= 0) & (rows_out < n_ctx), 1)
        )

    @gluon.jit
    def _consumer(program, C: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr, A_REGS: gl.constexpr):
        # consumer C of a forward program (_attn_fwd), one warp group: the 64 query rows from q0 + 64 C (its
        # tile q_all[C], which it loads itself), over the key tiles the loader brings (k_smem, v_smem and per
        # stage their bias tile, bias_smem, which `ones` adds to the scores); its turn at the tensor cores
        # comes from the consumer before it, and it passes the turn to the next (a ring: turns[C]). program:
        # what _attn_fwd hands every consumer
        (desc_q, q_all, q_bars, turns, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, A, O, LSE, ones,
         bias_smem, sob, soh, son, n_heads, n_ctx, q0, n_tiles, bh) = program  # fmt: skip
        W: gl.constexpr = gl.num_warps()
        CONSUMERS: gl.constexpr = q_all.shape[0]
        BLOCK_M: gl.constexpr = q_all.shape[1]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        s_layout: gl.constexpr = _wgmma_layout(W, BLOCK_N)
        q_smem = q_all.index(C)
        my_turn = turns.index(C)
        other_turn = turns.index((C + 1) % CONSUMERS)
        q_start = q0 + C * BLOCK_M
        a = gl.load(A + bh % n_heads)
        scale = gl.where(a == 0, 1.0, gl.abs(a)) * _LOG2E
        mask_from, my_tiles = _consumer_rows(q_start, n_tiles, n_ctx, BLOCK_M, BLOCK_N, CAUSAL)
        mbarrier.expect(q_bars.index(C), desc_q.block_type.nbytes)
        _load_tile(desc_q, bh, n_heads, q_start, q_bars.index(C), q_smem)
        rows = q_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        mbarrier.wait(q_bars.index(C), 0)
        _signed_q(q_smem, a, s_layout)
        q_a = _a_operand(q_smem, s_layout, A_REGS)
        acc, m_i, l_i = _fwd_tiles(q_a, ones, k_smem, v_smem, bias_smem, k_ready, v_ready, k_empty, v_empty, my_turn,
                                   other_turn, scale, rows, mask_from, n_ctx, my_tiles, 0, 0, CAUSAL,
                                   STAGES)  # fmt: skip
        _pass_turns(k_ready, v_ready, k_empty, v_empty, my_turn, other_turn, my_tiles, n_tiles, 0, 0, STAGES)
        _store_rows(acc, m_i, l_i, O, LSE, sob, soh, son, bh, n_heads, n_ctx, q_start)

    @gluon.jit
    def _loader(desc_k, desc_v, desc_bias, k_smem, v_smem, bias_smem, k_ready, v_ready, k_empty, v_empty, bh,
                n_heads, n_tiles, g0, STAGES: gl.constexpr):  # fmt: skip
        # the forward's loading of n_tiles key tiles of (batch, head) row bh: tile t of k (with its bias tile)
        # and of v into stage (g0 + t) % STAGES of their rings (g0: the key tiles loaded before), each once
        # every consumer has released it (the first pass waits on the phase before a fresh barrier's, which
        # has completed)
        ROWS: gl.constexpr = k_smem.shape[1]
        for t in range(n_tiles):
            s = (g0 + t) % STAGES
            phase = (((g0 + t) // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(s), phase)
            mbarrier.expect(k_ready.index(s), desc_k.block_type.nbytes + desc_bias.block_type.nbytes)
            _load_tile(desc_k, bh, n_heads, t * ROWS, k_ready.index(s), k_smem.index(s))
            _tma_load(
                desc_bias, [bh, t * ROWS, 0], k_ready.index(s), bias_smem.index(s).reshape([1, ROWS, 16])
            )
            mbarrier.wait(v_empty.index(s), phase)
            mbarrier.expect(v_ready.index(s), desc_v.block_type.nbytes)
            _load_tile(desc_v, bh, n_heads, t * ROWS, v_ready.index(s), v_smem.index(s))

    @gluon.jit
    def _fwd_rings(STAGES: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr,
                   BLOCK_N: gl.constexpr, dtype: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        # a forward program's key rings and their barriers: k, v and bias tiles in STAGES stages, the `ones`
        # A operand that adds a bias tile's first three columns to the scores ((BLOCK_M, 16), ones there),
        # the consumers' own barriers and turns, and per stage k_ready, v_ready, k_empty, v_empty (released
        # by every consumer)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], _TILE_LAYOUT)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], _TILE_LAYOUT)
        bias_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, 16], _BIAS_LAYOUT)
        ones_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [num_warps, 1], [1, 0])
        bias_cols = gl.arange(0, 16, layout=gl.SliceLayout(0, ones_layout))
        ones = gl.where(gl.expand_dims(bias_cols, 0) < 3, 1.0, 0.0)
        ones = gl.allocate_shared_memory(
            gl.bfloat16,
            [BLOCK_M, 16],
            _BIAS_LAYOUT,
            (ones + gl.zeros([BLOCK_M, 16], gl.float32, ones_layout)).to(gl.bfloat16),
        )
        own, turns, k_ready, v_ready, k_empty = _barriers(STAGES, CONSUMERS)
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(v_empty.index(i), count=CONSUMERS)
        fence_async_shared()
        return k_smem, v_smem, bias_smem, ones, own, turns, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _partitions(consumer: gl.constexpr, loader: gl.constexpr, program, loads, CAUSAL: gl.constexpr,
                    STAGES: gl.constexpr, A_REGS: gl.constexpr, CONSUMERS: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):  # fmt: skip
        # a forward program's warp-specialised partitions: CONSUMERS consumer warp groups (consumer(program, C,
        # ...); the first runs in the program's own warps) and a loader warp (loader(*loads))
        if CONSUMERS == 3:
            gl.warp_specialize(
                [
                    (_function(consumer), (program, 0, CAUSAL, STAGES, A_REGS)),
                    (_function(consumer), (program, 1, CAUSAL, STAGES, A_REGS)),
                    (_function(consumer), (program, 2, CAUSAL, STAGES, A_REGS)),
                    (_function(loader), loads),
                ],
                [4, 4, 1],
                [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_function(consumer), (program, 0, CAUSAL, STAGES, A_REGS)),
                    (_function(consumer), (program, 1, CAUSAL, STAGES, A_REGS)),
                    (_function(loader), loads),
                ],
                [4, 1],
                [CONSUMER_REGS, LOADER_REGS],
            )

    @gluon.jit
    def _attn_fwd(desc_q, desc_k, desc_v, desc_bias, A, O, LSE, sob, soh, son, n_heads, n_ctx, n_blocks,
                  n_items, CAUSAL: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                  LOADER_REGS: gl.constexpr, A_REGS: gl.constexpr, CONSUMERS: gl.constexpr,
                  num_warps: gl.constexpr):  # fmt: skip
        # one program per work item (_fwd_work; program (block, (batch, head) row): the longest causal rows
        # first): CONSUMERS * BLOCK_M queries of one (batch, head). desc_q, desc_k, desc_v: descriptors over (B,
        # H, N, D) (_descriptor), desc_bias over the bias tiles (_key_bias); LSE (B, H, N) float32; O (B, H, N,
        # D), strides sob, soh, son. n_items: _attn_fwd_p's, unused
        BLOCK_M: gl.constexpr = desc_q.block_type.shape[2]
        D: gl.constexpr = desc_q.block_type.shape[3]
        BLOCK_N: gl.constexpr = desc_k.block_type.shape[2]
        bh, q0, n_tiles = _fwd_work(gl.program_id(1) * n_blocks + gl.program_id(0), n_blocks, n_ctx,
                                    CONSUMERS * BLOCK_M, BLOCK_N, CAUSAL)  # fmt: skip
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [CONSUMERS, BLOCK_M, D], _TILE_LAYOUT)
        k_smem, v_smem, bias_smem, ones, q_bars, turns, k_ready, v_ready, k_empty, v_empty = _fwd_rings(
            STAGES, CONSUMERS, BLOCK_M, D, BLOCK_N, desc_q.dtype, num_warps
        )
        program = (desc_q, q_smem, q_bars, turns, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, A, O, LSE, ones,
                   bias_smem, sob, soh, son, n_heads, n_ctx, q0, n_tiles, bh)  # fmt: skip
        loads = (desc_k, desc_v, desc_bias, k_smem, v_smem, bias_smem, k_ready, v_ready, k_empty, v_empty, bh,
                 n_heads, n_tiles, 0, STAGES)  # fmt: skip
        _partitions(
            _consumer, _loader, program, loads, CAUSAL, STAGES, A_REGS, CONSUMERS, CONSUMER_REGS, LOADER_REGS
        )

    # ------------------------------------------------------------------------------------------------
    # the persistent forward (D 128): one program per multiprocessor over the work items in a static order
    # (_fwd_item: pairs of one head's longest and shortest causal rows, so that every program has the same
    # work and they move through the heads together). The loader writes each item's number into shared
    # memory (two slots, items) one item ahead, then brings the item's q tiles (two slots) and key tiles (the
    # rings run on across items: g0 counts a program's key tiles, t0 a consumer's turns). A consumer reads
    # the next item's number and head scalar before it stores this item's outputs, so that a program's
    # start (1.3 us between programs on a multiprocessor, H200) and its first loads are paid once
    # ("A persistent forward at D 128", "The persistent forward's work in pairs")

    @gluon.jit
    def _fwd_item(v, n_blocks, n_items):
        # the persistent forward's schedule: program p's slot v is half v % 2 of pair p + (v // 2) * programs,
        # a head's pair j being its blocks j and n_blocks - 1 - j (_fwd_work), the longer first: every pair
        # holds about one full row of key tiles, so the programs need no work counter to stay even
        # ("The persistent forward's work in pairs"); where n_blocks is odd, the middle pair's second half is
        # empty. -> (the item, n_items once past the last pair; 1 where the slot is empty, else 0)
        per_head = (n_blocks + 1) // 2
        pair = gl.program_id(0) + (v // 2) * gl.num_programs(0)
        half = v % 2
        j = pair % per_head
        item = (pair // per_head) * n_blocks + j + half * (n_blocks - 1 - 2 * j)
        past = (pair >= (n_items // n_blocks) * per_head).to(gl.int32)
        empty = ((half == 1) & (2 * j == n_blocks - 1)).to(gl.int32)
        return item + past * (n_items - item), empty * (1 - past)

    @gluon.jit
    def _next_item(v, n_blocks, n_items):
        # (the program's item at slot v, or at v + 1 where slot v is empty; the slot after it)
        item, empty = _fwd_item(v, n_blocks, n_items)
        after, _ = _fwd_item(v + 1, n_blocks, n_items)
        return item + empty * (after - item), v + 1 + empty

    @gluon.jit
    def _put_item(items, ready, empty, i, item):
        # the loader's i-th work item number into row i % 2 of items, once every consumer has read the item
        # that row held before
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        mbarrier.wait(empty.index(i % 2), ((i // 2) & 1) ^ 1)
        items.index(i % 2).store(gl.full([32], item, gl.int32, layout))
        mbarrier.arrive(ready.index(i % 2))

    @gluon.jit
    def _consumer_p(
        program, C: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr, A_REGS: gl.constexpr
    ):
        # consumer C of the persistent forward: _consumer's work per item, its q tile q_all[slot * CONSUMERS +
        # C] (slot: the item's count % 2, brought by the loader)
        (q_all, q_ready, q_empty, turns, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, items, item_ready,
         item_empty, A, O, LSE, ones, bias_smem, sob, soh, son, n_heads, n_ctx, n_blocks,
         n_items) = program  # fmt: skip
        W: gl.constexpr = gl.num_warps()
        CONSUMERS: gl.constexpr = turns.shape[0]
        BLOCK_M: gl.constexpr = q_all.shape[1]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        my_turn = turns.index(C)
        other_turn = turns.index((C + 1) % CONSUMERS)
        s_layout: gl.constexpr = _wgmma_layout(W, BLOCK_N)
        item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
        item = _item_of(items, 0, item_ready, item_empty, 0, item_layout)
        a = gl.load(A + (item // n_blocks) % n_heads)
        i = 0
        t0 = 0
        g0 = 0
        while item < n_items:
            bh, q0, n_tiles = _fwd_work(item, n_blocks, n_ctx, CONSUMERS * BLOCK_M, BLOCK_N, CAUSAL)
            q_start = q0 + C * BLOCK_M
            scale = gl.where(a == 0, 1.0, gl.abs(a)) * _LOG2E
            mask_from, my_tiles = _consumer_rows(q_start, n_tiles, n_ctx, BLOCK_M, BLOCK_N, CAUSAL)
            slot = i % 2
            q_smem = q_all.index(slot * CONSUMERS + C)
            rows = q_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            mbarrier.wait(q_ready.index(slot), (i // 2) & 1)
            _signed_q(q_smem, a, s_layout)
            q_a = _a_operand(q_smem, s_layout, A_REGS)
            acc, m_i, l_i = _fwd_tiles(q_a, ones, k_smem, v_smem, bias_smem, k_ready, v_ready, k_empty, v_empty,
                                       my_turn, other_turn, scale, rows, mask_from, n_ctx, my_tiles, t0, g0,
                                       CAUSAL, STAGES)  # fmt: skip
            mbarrier.arrive(q_empty.index(slot))
            i += 1
            nxt = _item_of(items, i % 2, item_ready, item_empty, i, item_layout)
            a = gl.load(A + (nxt // n_blocks) % n_heads)
            _store_rows(acc, m_i, l_i, O, LSE, sob, soh, son, bh, n_heads, n_ctx, q_start)
            _pass_turns(
                k_ready, v_ready, k_empty, v_empty, my_turn, other_turn, my_tiles, n_tiles, t0, g0, STAGES
            )
            t0 += n_tiles + 1
            g0 += n_tiles
            item = nxt

    @gluon.jit
    def _loader_p(desc_q, desc_k, desc_v, desc_bias, q_all, q_ready, q_empty, k_smem, v_smem, bias_smem, k_ready,
                  v_ready, k_empty, v_empty, items, item_ready, item_empty, n_heads, n_ctx, n_blocks, n_items,
                  CAUSAL: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        # the persistent forward's loader, one warp: the program's work items (_next_item), each item's
        # number written one item ahead and n_items ending the program; per item its consumers' q tiles into
        # slot i % 2 once the consumers are done with the item before last, then its key tiles (_loader)
        CONSUMERS: gl.constexpr = q_all.shape[0] // 2
        BLOCK_M: gl.constexpr = q_all.shape[1]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        item, v = _next_item(0, n_blocks, n_items)
        nxt, v = _next_item(v, n_blocks, n_items)
        _put_item(items, item_ready, item_empty, 0, item)
        i = 0
        g = 0
        while item < n_items:
            _put_item(items, item_ready, item_empty, i + 1, nxt)
            bh, q0, n_tiles = _fwd_work(item, n_blocks, n_ctx, CONSUMERS * BLOCK_M, BLOCK_N, CAUSAL)
            slot = i % 2
            mbarrier.wait(q_empty.index(slot), ((i // 2) & 1) ^ 1)
            mbarrier.expect(q_ready.index(slot), CONSUMERS * desc_q.block_type.nbytes)
            for c in gl.static_range(CONSUMERS):
                _load_tile(desc_q, bh, n_heads, q0 + c * BLOCK_M, q_ready.index(slot),
                           q_all.index(slot * CONSUMERS + c))  # fmt: skip
            _loader(desc_k, desc_v, desc_bias, k_smem, v_smem, bias_smem, k_ready, v_ready, k_empty, v_empty, bh,
                    n_heads, n_tiles, g, STAGES)  # fmt: skip
            g += n_tiles
            i += 1
            item = nxt
            nxt, v = _next_item(v, n_blocks, n_items)

    @gluon.jit(do_not_specialize=["n_items"])
    def _attn_fwd_p(desc_q, desc_k, desc_v, desc_bias, A, O, LSE, sob, soh, son, n_heads, n_ctx, n_blocks,
                    n_items, CAUSAL: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    LOADER_REGS: gl.constexpr, A_REGS: gl.constexpr, CONSUMERS: gl.constexpr,
                    num_warps: gl.constexpr):  # fmt: skip
        # the persistent forward over n_items = n_blocks * (B * H) work items (_fwd_work: _attn_fwd's
        # programs) in _fwd_item's order; _attn_fwd's arguments
        BLOCK_M: gl.constexpr = desc_q.block_type.shape[2]
        D: gl.constexpr = desc_q.block_type.shape[3]
        BLOCK_N: gl.constexpr = desc_k.block_type.shape[2]
        # two items' q tiles
        q_all = gl.allocate_shared_memory(desc_q.dtype, [2 * CONSUMERS, BLOCK_M, D], _TILE_LAYOUT)
        k_smem, v_smem, bias_smem, ones, _own, turns, k_ready, v_ready, k_empty, v_empty = _fwd_rings(
            STAGES, CONSUMERS, BLOCK_M, D, BLOCK_N, desc_q.dtype, num_warps
        )
        items = gl.allocate_shared_memory(gl.int32, [2, 32], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        # per slot (an item's count % 2): its q tiles are in (q_ready), every consumer is done with them
        # (q_empty), its item number is in (item_ready), every consumer has read it (item_empty)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        item_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        item_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=CONSUMERS)
            mbarrier.init(item_ready.index(i), count=1)
            mbarrier.init(item_empty.index(i), count=CONSUMERS)
        fence_async_shared()
        program = (q_all, q_ready, q_empty, turns, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, items,
                   item_ready, item_empty, A, O, LSE, ones, bias_smem, sob, soh, son, n_heads, n_ctx, n_blocks,
                   n_items)  # fmt: skip
        loads = (desc_q, desc_k, desc_v, desc_bias, q_all, q_ready, q_empty, k_smem, v_smem, bias_smem, k_ready,
                 v_ready, k_empty, v_empty, items, item_ready, item_empty, n_heads, n_ctx, n_blocks, n_items,
                 CAUSAL, STAGES)  # fmt: skip
        _partitions(
            _consumer_p,
            _loader_p,
            program,
            loads,
            CAUSAL,
            STAGES,
            A_REGS,
            CONSUMERS,
            CONSUMER_REGS,
            LOADER_REGS,
        )

    # ------------------------------------------------------------------------------------------------
    # backward, one kernel (FlashAttention-3's schedule): a program owns 2 * KEYS keys of one (batch, head),
    # KEYS per consumer, and the loader brings the q and dO tiles from the first one that sees them, each q
    # tile with its rows' log-sum-exp and delta (into shared memory, as FlashAttention-3 does; read from
    # global memory in the element-wise part they cost the D 128 kernel 168 bytes of register spills a
    # thread: "Log-sum-exp, delta and key norms by TMA"). Per query tile a consumer issues S^T and
    # dP^T in its turn, hands the turn over and runs the element-wise part (P^T, dS^T) while the other's
    # matmuls run; then dV and dK accumulate in registers, and dQ, which sums over both consumers' keys, is
    # split by head-dim halves: both consumers store dS^T to shared memory, and consumer c computes
    # dQ[:, half c] = dS k[:, half c] over all 2 * KEYS keys (two wgmma). A consumer holds its half until it
    # has issued the next tile's S^T and dP^T, and stores it while they run ("dQ handed over during
    # the next tile's matmuls"); a writer warp adds both halves, stored in fragment order, into a float32
    # (1, rows, fragment_rows, 256) accumulator by TMA reduce-add (cp.reduce.async.bulk.tensor).

    @gluon.jit
    def _bwd_consumer(desc_k, desc_v, k_all, v_smem, kv_bar, q_smem, do_smem, q_ready, do_ready, empty,
                      my_turn, other_turn, ds_all, ds_ready, dq_smem, dq_full, dq_free, A, B, stats, KN2,
                      DK, DV, DA_ROWS, DB_ROWS, n_heads, n_ctx, k_start, m_lo, n_tiles, bh, C: gl.constexpr,
                      CAUSAL: gl.constexpr, STAGES: gl.constexpr, A_REGS: gl.constexpr):  # fmt: skip
        # consumer C: keys k_start.. (its tile k_all[C], v_smem), query tiles m_lo.. (n_tiles). ds_all: dS^T
        # of both consumers, two buffers each (tile j: 2 * consumer + j % 2); dq_smem[C]: its dQ half for
        # the writer
        W: gl.constexpr = gl.num_warps()
        k_smem = k_all.index(C)
        KEYS: gl.constexpr = k_smem.shape[0]
        D: gl.constexpr = k_smem.shape[1]
        HALF: gl.constexpr = D // 2
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        s_layout: gl.constexpr = _wgmma_layout(W, BLOCK_M)  # the transposed scores (KEYS, BLOCK_M)
        mbarrier.expect(kv_bar, desc_k.block_type.nbytes + desc_v.block_type.nbytes)
        _load_tile(desc_k, bh, n_heads, k_start, kv_bar, k_smem)
        _load_tile(desc_v, bh, n_heads, k_start, kv_bar, v_smem)
        a, b, base, cols, kn2, key_bias, mask_below = _key_params(A, B, KN2, n_heads, n_ctx, k_start, bh, True,
                                                                  KEYS, CAUSAL, s_layout)  # fmt: skip
        mbarrier.wait(kv_bar, 0)
        # dQ's B operands: both key tiles' columns of half C
        k_halves = (k_all.index(0).slice(C * HALF, HALF, dim=1), k_all.index(1).slice(C * HALF, HALF, dim=1))
        dq, dk, dv, colsum = _bwd_tiles(k_smem, v_smem, k_halves, q_smem, do_smem, q_ready, do_ready, empty, my_turn,
                                        other_turn, ds_all, ds_ready, dq_smem, dq_full, dq_free, stats, a,
                                        key_bias, m_lo, cols, mask_below, n_ctx, n_tiles, 0, C, CAUSAL, STAGES,
                                        A_REGS)  # fmt: skip
        _hand_dq(dq, dq_smem.index(C), dq_full.index(C), dq_free.index(C), n_tiles - 1)
        _store_key_grads(
            dk, dv, colsum, k_smem, a, b, kn2, base, cols, k_start, n_ctx, DK, DV, DA_ROWS, DB_ROWS
        )

    @gluon.jit
    def _bwd_tiles(k_smem, v_smem, k_halves, q_smem, do_smem, q_ready, do_ready, empty, my_turn, other_turn, ds_all,
                   ds_ready, dq_smem, dq_full, dq_free, stats, a, key_bias, m_lo, cols, mask_below, n_ctx, n_tiles,
                   g0, C: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                   A_REGS: gl.constexpr):  # fmt: skip
        # a backward consumer's loop over its query tiles m_lo.. (n_tiles), which are the program's tiles
        # g0.. of the q and dO rings, of the turns and of the dS and dQ buffers -> (the last tile's dQ half,
        # not yet handed over, dK's and dV's accumulators, the column sums of dS^T)
        W: gl.constexpr = gl.num_warps()
        KEYS: gl.constexpr = k_smem.shape[0]
        D: gl.constexpr = k_smem.shape[1]
        HALF: gl.constexpr = D // 2
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        dtype: gl.constexpr = k_smem.dtype
        s_layout: gl.constexpr = _wgmma_layout(W, BLOCK_M)
        o_layout: gl.constexpr = _wgmma_layout(W, D)
        op_layout: gl.constexpr = _operand_layout(o_layout)
        a2 = a * _LOG2E
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        s_zero = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
        dq_zero = gl.zeros([BLOCK_M, HALF], gl.float32, _wgmma_layout(W, HALF))
        dk = gl.zeros([KEYS, D], gl.float32, o_layout)
        dv = gl.zeros([KEYS, D], gl.float32, o_layout)
        colsum = gl.zeros([KEYS], gl.float32, gl.SliceLayout(1, s_layout))
        k_a = _a_operand(k_smem, s_layout, A_REGS)
        v_a = _a_operand(v_smem, s_layout, A_REGS)
        k_half0, k_half1 = k_halves
        dq = dq_zero
        for j in range(n_tiles):
            g = g0 + j
            stage = g % STAGES
            buf = g % 2
            s_tok, dp_tok = _score_matmuls(k_a, v_a, q_smem, do_smem, q_ready, do_ready, my_turn, g, STAGES,
                                           s_zero)  # fmt: skip
            mbarrier.arrive(other_turn)
            if j > 0:  # tile j - 1's dQ half goes to the writer while S^T and dP^T run
                _hand_dq(dq, dq_smem.index(C), dq_full.index(C), dq_free.index(C), g - 1)
            s, dp = warpgroup_mma_wait(0, deps=(s_tok, dp_tok))
            p, ds, colsum = _bwd_elementwise(s, dp, j, key_bias, colsum, a2, stats.index(2 * stage),
                                             stats.index(2 * stage + 1), m_lo, offs_m,
                                             cols, mask_below, n_ctx, CAUSAL, dtype)  # fmt: skip
            # the other consumer read buffer buf at tile g - 2, before it passed the turn of tile g - 1
            ds_all.index(2 * C + buf).store(ds)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(buf))
            p = gl.convert_layout(p, op_layout)
            ds = gl.convert_layout(ds, op_layout)
            dv_tok = warpgroup_mma(p, do_smem.index(stage), dv, is_async=True)
            dk_tok = warpgroup_mma(ds, q_smem.index(stage), dk, is_async=True)
            mbarrier.wait(ds_ready.index(buf), (g // 2) & 1)  # both consumers' dS^T of tile g are in
            dq_tok = warpgroup_mma(ds_all.index(buf).permute((1, 0)), k_half0, dq_zero, use_acc=False,
                                   is_async=True)  # fmt: skip
            dq_tok = warpgroup_mma(ds_all.index(2 + buf).permute((1, 0)), k_half1, dq_tok, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq_tok,)) * a
            dv, dk, p, ds = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p, ds))
            mbarrier.arrive(empty.index(stage))
        return dq, dk, dv, colsum

    @gluon.jit
    def _hand_dq(dq, dq_smem, dq_full, dq_free, j):
        # a consumer's dQ half of query tile j to the writer: into dq_smem in fragment order once the writer
        # has freed it (the first wait is on the phase before a fresh barrier's, which has completed)
        mbarrier.wait(dq_free, (j & 1) ^ 1)
        dq_smem.store(_fragment_order(dq))
        fence_async_shared()
        mbarrier.arrive(dq_full)

    @gluon.jit
    def _key_params(A, B, KN2, n_heads, n_ctx, k_start, bh, valid, KEYS: gl.constexpr, CAUSAL: gl.constexpr,
                    s_layout: gl.constexpr):  # fmt: skip
        # what a key-owning backward consumer needs besides its tiles: its head's a and b, the row offset of
        # its head, its key columns and their norms (read where valid) and base-2 norm bias (in the layout of
        # the transposed scores s_layout), and the query row below which tiles cross the diagonal (rows past
        # N are masked too)
        a = gl.load(A + bh % n_heads)
        b = gl.load(B + bh % n_heads)
        base = bh.to(gl.int64) * n_ctx
        cols = k_start + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
        kn2 = gl.load(KN2 + base + cols, mask=(cols < n_ctx) & valid, other=0.0)
        key_bias = gl.expand_dims(kn2 * (b * _LOG2E), 1)
        if CAUSAL:
            mask_below = k_start + KEYS
        else:
            mask_below = 0
        return a, b, base, cols, kn2, key_bias, mask_below

    @gluon.jit
    def _store_key_grads(dk, dv, colsum, k_smem, a, b, kn2, base, cols, k_start, n_ctx, DK, DV, DA_ROWS,
                         DB_ROWS):  # fmt: skip
        # dv; dk = a dk_acc - 2 b colsum k, da_j = k_j . dk_acc_j, db_j = -colsum_j ||k_j||^2 (dv first, so
        # that its registers are free for k's)
        KEYS: gl.constexpr = k_smem.shape[0]
        D: gl.constexpr = k_smem.shape[1]
        o_layout: gl.constexpr = dk.type.layout
        keys = k_start + gl.arange(0, KEYS, layout=gl.SliceLayout(1, o_layout))
        key_ok = gl.expand_dims(keys < n_ctx, 1)
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        out = (base + gl.expand_dims(keys, 1)) * D + gl.expand_dims(offs_d, 0)
        gl.store(DV + out, dv.to(k_smem.dtype), mask=key_ok)
        kf = k_smem.load(o_layout).to(gl.float32)
        gl.store(DA_ROWS + base + keys, gl.sum(dk * kf, 1), mask=keys < n_ctx)
        gl.store(DB_ROWS + base + cols, -colsum * kn2, mask=cols < n_ctx)
        colsum_o = gl.expand_dims(gl.convert_layout(colsum, gl.SliceLayout(1, o_layout)), 1)
        dk = a * dk - (2.0 * b) * colsum_o * kf
        gl.store(DK + out, dk.to(k_smem.dtype), mask=key_ok)

    @gluon.jit
    def _bwd_elementwise(s, dp, j, key_bias, colsum, a2, lse_smem, delta_smem, m_lo, offs_m, cols,
                          mask_below, n_ctx, CAUSAL: gl.constexpr, dtype: gl.constexpr):  # fmt: skip
        # query tile j's transposed scores and dP (KEYS, BLOCK_M) and its rows' log-sum-exp and delta (rows
        # of shared memory, each read when needed) -> P^T and dS^T in dtype (the scores' register layout),
        # and the running column sums of dS^T
        BLOCK_M: gl.constexpr = offs_m.shape[0]
        start_m = m_lo + j * BLOCK_M
        rows = start_m + offs_m
        lse = lse_smem.load(offs_m.type.layout)
        p = gl.exp2(s * a2 - key_bias - gl.expand_dims(lse, 0))
        if (start_m < mask_below) | (start_m + BLOCK_M > n_ctx):
            keep = gl.expand_dims(rows, 0) < n_ctx
            if CAUSAL:
                keep = keep & (gl.expand_dims(rows, 0) >= gl.expand_dims(cols, 1))
            p = gl.where(keep, p, 0.0)
        delta = delta_smem.load(offs_m.type.layout)
        ds = p * (dp - gl.expand_dims(delta, 0))
        colsum += gl.sum(ds, 1)
        return p.to(dtype), ds.to(dtype), colsum

    @gluon.jit
    def _bwd_loader(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, stats_smem, q_ready, do_ready,
                    empty, bh, n_heads, row0, n_tiles, STAGES: gl.constexpr):  # fmt: skip
        # the backward's loader: _load_query_tile for the program's query tiles
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        for t in range(n_tiles):
            _load_query_tile(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, stats_smem, q_ready, do_ready,
                             empty, bh, n_heads, row0 + t * BLOCK_M, t, STAGES)  # fmt: skip

    @gluon.jit
    def _load_query_tile(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, stats_smem, q_ready, do_ready,
                         empty, bh, n_heads, row, t, STAGES: gl.constexpr):  # fmt: skip
        # the program's query tile t (rows row..): _loader's q and dO tiles into stage t % STAGES once both
        # consumers have released it, and with the q tile its rows' log-sum-exp and delta (a (1, 1, BLOCK_M)
        # block of each, zeros past N) into rows 2 s and 2 s + 1 of stats_smem
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        s = t % STAGES
        mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(q_ready.index(s), desc_q.block_type.nbytes + 2 * desc_lse.block_type.nbytes)
        _load_tile(desc_q, bh, n_heads, row, q_ready.index(s), q_smem.index(s))
        lse_rows = stats_smem.index(2 * s).reshape([1, 1, BLOCK_M])
        delta_rows = stats_smem.index(2 * s + 1).reshape([1, 1, BLOCK_M])
        _tma_load(desc_lse, [bh, 0, row], q_ready.index(s), lse_rows)
        _tma_load(desc_delta, [bh, 0, row], q_ready.index(s), delta_rows)
        mbarrier.expect(do_ready.index(s), desc_do.block_type.nbytes)
        _load_tile(desc_do, bh, n_heads, row, do_ready.index(s), do_smem.index(s))

    @gluon.jit
    def _dq_writer(desc_dq, dq_smem, dq_full, dq_free, row, t_lo, n_tiles):
        # one warp: _add_dq for the program's query tiles
        for j in range(n_tiles):
            _add_dq(desc_dq, dq_smem, dq_full, dq_free, row, t_lo + j, j)

    @gluon.jit
    def _add_dq(desc_dq, dq_smem, dq_full, dq_free, row, tile, g):
        # the program's g-th query tile (tile `tile` of its row): adds its two dQ halves (each (CHUNK, 256) in
        # fragment order) into row `row` of the float32 (1, rows, fragment_rows, 256) accumulator by TMA, then
        # frees them
        CHUNK: gl.constexpr = dq_smem.shape[1]
        for c in gl.static_range(2):
            mbarrier.wait(dq_full.index(c), g & 1)
            chunk = (tile * 2 + c) * CHUNK
            _tma_add(desc_dq, [0, row, chunk, 0], dq_smem.index(c).reshape([1, 1, CHUNK, 256]))
        tma.store_wait(0)
        for c in gl.static_range(2):
            mbarrier.arrive(dq_free.index(c))

    @gluon.jit
    def _bwd_work(item, n_blocks, n_ctx, KEYS: gl.constexpr, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
        # backward work item -> (its row of the launch, first key, first query row, query tiles): keys
        # block * 2 KEYS.. of row item // n_blocks, block item % n_blocks (the program order of _attn_bwd's
        # grid: a row's blocks together, the most query tiles first)
        row = item // n_blocks
        k0 = (item % n_blocks) * 2 * KEYS
        if CAUSAL:  # the first query tile that sees these keys
            m_lo = (k0 // BLOCK_M) * BLOCK_M
        else:
            m_lo = 0
        return row, k0, m_lo, (n_ctx - m_lo + BLOCK_M - 1) // BLOCK_M

    # ------------------------------------------------------------------------------------------------
    # the persistent backward (D 64): one program per multiprocessor over work items (an item: what one
    # program of _attn_bwd does), taken one at a time from an atomic counter by the loader, which writes
    # each item's number into shared memory (two slots, items) for the consumers and the writer. The loader
    # brings each item's k and v tiles into one of two slots, so that the next item's keys (and its first
    # query tiles) arrive while the consumers finish the last one; the consumers read the next item's key
    # norms before they store the last one's gradients. Rings, turns and dS and dQ buffers run on across
    # items (g counts a program's query tiles).

    @gluon.jit
    def _item_of(items, slot, ready, empty, i, layout: gl.constexpr):
        # the program's i-th work item, once the loader has written it into row `slot` of items (every
        # element holds it); the row released after the read
        mbarrier.wait(ready.index(slot), (i // 2) & 1)
        item = gl.max(items.index(slot).load(layout), 0)
        mbarrier.arrive(empty.index(slot))
        return item

    @gluon.jit
    def _bwd_consumer_p(k_all, v_all, kv_ready, kv_empty, items, item_ready, item_empty, q_smem, do_smem, q_ready,
                        do_ready, empty, my_turn, other_turn, ds_all, ds_ready, dq_smem, dq_full, dq_free, A, B,
                        stats, KN2, DK, DV, DA_ROWS, DB_ROWS, n_heads, n_ctx, n_blocks, n_items, bh0,
                        C: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                        A_REGS: gl.constexpr):  # fmt: skip
        # consumer C of the persistent backward: _bwd_consumer's work per item, its keys' tiles in
        # k_all[2 slot + C], v_all[2 slot + C] (slot: the item's count % 2)
        W: gl.constexpr = gl.num_warps()
        KEYS: gl.constexpr = k_all.shape[1]
        D: gl.constexpr = k_all.shape[2]
        HALF: gl.constexpr = D // 2
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        s_layout: gl.constexpr = _wgmma_layout(W, BLOCK_M)
        item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
        item = _item_of(items, 0, item_ready, item_empty, 0, item_layout)
        row, k0, m_lo, n_tiles = _bwd_work(item, n_blocks, n_ctx, KEYS, BLOCK_M, CAUSAL)
        k_start = k0 + C * KEYS
        a, b, base, cols, kn2, key_bias, mask_below = _key_params(A, B, KN2, n_heads, n_ctx, k_start, bh0 + row,
                                                                  item < n_items, KEYS, CAUSAL,
                                                                  s_layout)  # fmt: skip
        i = 0
        g0 = 0
        while item < n_items:
            slot = i % 2
            k_smem = k_all.index(2 * slot + C)
            mbarrier.wait(kv_ready.index(slot), (i // 2) & 1)
            k_halves = (k_all.index(2 * slot).slice(C * HALF, HALF, dim=1),
                        k_all.index(2 * slot + 1).slice(C * HALF, HALF, dim=1))  # fmt: skip
            dq, dk, dv, colsum = _bwd_tiles(k_smem, v_all.index(2 * slot + C), k_halves, q_smem, do_smem, q_ready,
                                            do_ready, empty, my_turn, other_turn, ds_all, ds_ready, dq_smem,
                                            dq_full, dq_free, stats, a, key_bias, m_lo, cols, mask_below, n_ctx,
                                            n_tiles, g0, C, CAUSAL, STAGES, A_REGS)  # fmt: skip
            _hand_dq(dq, dq_smem.index(C), dq_full.index(C), dq_free.index(C), g0 + n_tiles - 1)
            g0 += n_tiles
            i += 1
            # the next item, and its keys' parameters read while this item's gradients are stored
            nxt = _item_of(items, i % 2, item_ready, item_empty, i, item_layout)
            row_n, k0_n, m_lo_n, n_tiles_n = _bwd_work(nxt, n_blocks, n_ctx, KEYS, BLOCK_M, CAUSAL)
            params = _key_params(A, B, KN2, n_heads, n_ctx, k0_n + C * KEYS, bh0 + row_n, nxt < n_items, KEYS,
                                 CAUSAL, s_layout)  # fmt: skip
            _store_key_grads(
                dk, dv, colsum, k_smem, a, b, kn2, base, cols, k_start, n_ctx, DK, DV, DA_ROWS, DB_ROWS
            )
            mbarrier.arrive(kv_empty.index(slot))
            item = nxt
            m_lo = m_lo_n
            n_tiles = n_tiles_n
            k_start = k0_n + C * KEYS
            a, b, base, cols, kn2, key_bias, mask_below = params

    @gluon.jit
    def _bwd_loader_p(desc_q, desc_do, desc_lse, desc_delta, desc_k, desc_v, q_smem, do_smem, stats_smem, k_all,
                      v_all, q_ready, do_ready, empty, kv_ready, kv_empty, items, item_ready, item_empty, COUNTER,
                      n_heads, n_ctx, n_blocks, n_items, bh0, CAUSAL: gl.constexpr,
                      STAGES: gl.constexpr):  # fmt: skip
        # the persistent backward's loader, one warp: per work item (the program's id first, then one from
        # COUNTER at a time) its number into items, its four key tiles (k and v of both consumers) into slot
        # i % 2 once the consumers are done with the item before last, then its query tiles; after the last
        # item, n_items (the end)
        KEYS: gl.constexpr = k_all.shape[1]
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        item = gl.program_id(0)
        i = 0
        g = 0
        while item < n_items:
            slot = i % 2
            row, k0, m_lo, n_tiles = _bwd_work(item, n_blocks, n_ctx, KEYS, BLOCK_M, CAUSAL)
            bh = bh0 + row
            mbarrier.wait(item_empty.index(slot), ((i // 2) & 1) ^ 1)
            items.index(slot).store(gl.full([32], item, gl.int32, item_layout))
            mbarrier.arrive(item_ready.index(slot))
            mbarrier.wait(kv_empty.index(slot), ((i // 2) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(slot), 2 * desc_k.block_type.nbytes + 2 * desc_v.block_type.nbytes)
            for c in gl.static_range(2):
                _load_tile(
                    desc_k, bh, n_heads, k0 + c * KEYS, kv_ready.index(slot), k_all.index(2 * slot + c)
                )
                _load_tile(
                    desc_v, bh, n_heads, k0 + c * KEYS, kv_ready.index(slot), v_all.index(2 * slot + c)
                )
            for t in range(n_tiles):
                _load_query_tile(desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, stats_smem, q_ready,
                                 do_ready, empty, bh, n_heads, m_lo + t * BLOCK_M, g + t, STAGES)  # fmt: skip
            g += n_tiles
            item = gl.num_programs(0) + gl.atomic_add(COUNTER, 1)
            i += 1
        slot = i % 2
        mbarrier.wait(item_empty.index(slot), ((i // 2) & 1) ^ 1)
        items.index(slot).store(gl.full([32], n_items, gl.int32, item_layout))
        mbarrier.arrive(item_ready.index(slot))

    @gluon.jit
    def _dq_writer_p(desc_dq, dq_smem, dq_full, dq_free, items, item_ready, item_empty, n_ctx, n_blocks, n_items,
                     KEYS: gl.constexpr, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):  # fmt: skip
        # the persistent backward's writer, one warp: _add_dq for each item's query tiles
        item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        item = _item_of(items, 0, item_ready, item_empty, 0, item_layout)
        i = 0
        g = 0
        while item < n_items:
            row, _k0, m_lo, n_tiles = _bwd_work(item, n_blocks, n_ctx, KEYS, BLOCK_M, CAUSAL)
            for j in range(n_tiles):
                _add_dq(desc_dq, dq_smem, dq_full, dq_free, row, m_lo // BLOCK_M + j, g + j)
            g += n_tiles
            i += 1
            item = _item_of(items, i % 2, item_ready, item_empty, i, item_layout)

    @gluon.jit(do_not_specialize=["n_items", "bh0"])  # one compiled kernel serves every launch (_compiled)
    def _attn_bwd_p(desc_q, desc_k, desc_v, desc_do, desc_dq, desc_lse, desc_delta, A, B, KN2, DK, DV, DA_ROWS,
                    DB_ROWS, COUNTER, n_heads, n_ctx, n_blocks, n_items, bh0, CAUSAL: gl.constexpr,
                    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                    A_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        # the persistent backward over the n_items = n_blocks * rows work items of (batch, head) rows bh0..;
        # COUNTER: an int32 zero of this launch's own
        BLOCK_M: gl.constexpr = desc_q.block_type.shape[2]
        D: gl.constexpr = desc_q.block_type.shape[3]
        KEYS: gl.constexpr = desc_k.block_type.shape[2]
        dtype: gl.constexpr = desc_q.dtype
        k_all = gl.allocate_shared_memory(dtype, [4, KEYS, D], _TILE_LAYOUT)  # per slot, both consumers'
        v_all = gl.allocate_shared_memory(dtype, [4, KEYS, D], _TILE_LAYOUT)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], _TILE_LAYOUT)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], _TILE_LAYOUT)
        stats_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGES, 1, BLOCK_M], _ROWS_LAYOUT)
        stats = _as_rows(stats_smem)
        ds_all = gl.allocate_shared_memory(dtype, [4, KEYS, BLOCK_M], _TILE_LAYOUT)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, D // 8, 256], _DQ_LAYOUT)
        items = gl.allocate_shared_memory(gl.int32, [2, 32], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        # per slot: its key tiles are in (kv_ready), both consumers are done with them (kv_empty), its item
        # number is in (item_ready), both consumers and the writer have read it (item_empty)
        kv_ready, turns, q_ready, do_ready, empty = _barriers(STAGES, 2)
        kv_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        item_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        item_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        dq_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(kv_empty.index(i), count=2)
            mbarrier.init(item_ready.index(i), count=1)
            mbarrier.init(item_empty.index(i), count=3)
            mbarrier.init(ds_ready.index(i), count=2)
            mbarrier.init(dq_full.index(i), count=1)
            mbarrier.init(dq_free.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize(
            [
                (_bwd_consumer_p, (k_all, v_all, kv_ready, kv_empty, items, item_ready, item_empty, q_smem, do_smem,
                                   q_ready, do_ready, empty, turns.index(0), turns.index(1), ds_all, ds_ready,
                                   dq_smem, dq_full, dq_free, A, B, stats, KN2, DK, DV, DA_ROWS, DB_ROWS,
                                   n_heads, n_ctx, n_blocks, n_items, bh0, 0, CAUSAL, STAGES, A_REGS)),
                (_bwd_consumer_p, (k_all, v_all, kv_ready, kv_empty, items, item_ready, item_empty, q_smem, do_smem,
                                   q_ready, do_ready, empty, turns.index(1), turns.index(0), ds_all, ds_ready,
                                   dq_smem, dq_full, dq_free, A, B, stats, KN2, DK, DV, DA_ROWS, DB_ROWS,
                                   n_heads, n_ctx, n_blocks, n_items, bh0, 1, CAUSAL, STAGES, A_REGS)),
                (_bwd_loader_p, (desc_q, desc_do, desc_lse, desc_delta, desc_k, desc_v, q_smem, do_smem, stats_smem,
                                 k_all, v_all, q_ready, do_ready, empty, kv_ready, kv_empty, items, item_ready,
                                 item_empty, COUNTER, n_heads, n_ctx, n_blocks, n_items, bh0, CAUSAL, STAGES)),
                (_dq_writer_p, (desc_dq, dq_smem, dq_full, dq_free, items, item_ready, item_empty, n_ctx, n_blocks,
                                n_items, KEYS, BLOCK_M, CAUSAL)),
            ],
            [4, 1, 1],
            [CONSUMER_REGS, LOADER_REGS, LOADER_REGS],
        )  # fmt: skip

    @gluon.jit(do_not_specialize=["bh0"])  # one compiled kernel serves every launch of a backward (_compiled)
    def _attn_bwd(desc_q, desc_k, desc_v, desc_do, desc_dq, desc_lse, desc_delta, A, B, KN2, DK, DV, DA_ROWS,
                  DB_ROWS, n_heads, n_ctx, bh0, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                  CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, A_REGS: gl.constexpr,
                  num_warps: gl.constexpr):  # fmt: skip
        # one program: keys program_id(0) * 2 * KEYS.. of (batch, head) bh0 + program_id(1), whose dQ rows are
        # that row of the accumulator; partitions: two consumers, the q/dO loader and the dQ writer
        # (LOADER_REGS registers too)
        BLOCK_M: gl.constexpr = desc_q.block_type.shape[2]
        D: gl.constexpr = desc_q.block_type.shape[3]
        KEYS: gl.constexpr = desc_k.block_type.shape[2]
        dtype: gl.constexpr = desc_q.dtype
        n_blocks = gl.num_programs(0)
        row, k0, m_lo, n_tiles = _bwd_work(gl.program_id(0) + gl.program_id(1) * n_blocks, n_blocks, n_ctx, KEYS,
                                           BLOCK_M, CAUSAL)  # fmt: skip
        bh = bh0 + row
        k_smem = gl.allocate_shared_memory(dtype, [2, KEYS, D], _TILE_LAYOUT)
        v_smem = gl.allocate_shared_memory(dtype, [2, KEYS, D], _TILE_LAYOUT)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], _TILE_LAYOUT)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], _TILE_LAYOUT)
        # per stage, the query tile's log-sum-exp and delta (with its q tile, by TMA)
        stats_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGES, 1, BLOCK_M], _ROWS_LAYOUT)
        stats = _as_rows(stats_smem)
        ds_all = gl.allocate_shared_memory(dtype, [4, KEYS, BLOCK_M], _TILE_LAYOUT)
        # dQ's halves in fragment order
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, D // 8, 256], _DQ_LAYOUT)
        kv_bars, turns, q_ready, do_ready, empty = _barriers(STAGES, 2)
        # per dS buffer: both consumers' dS^T are in; per dQ half: it is in, the writer has freed it
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        dq_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
            mbarrier.init(dq_full.index(i), count=1)
            mbarrier.init(dq_free.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize(
            [
                (_bwd_consumer, (desc_k, desc_v, k_smem, v_smem.index(0), kv_bars.index(0), q_smem, do_smem,
                                 q_ready, do_ready, empty, turns.index(0), turns.index(1), ds_all, ds_ready,
                                 dq_smem, dq_full, dq_free, A, B, stats, KN2, DK, DV, DA_ROWS, DB_ROWS,
                                 n_heads, n_ctx, k0, m_lo, n_tiles, bh, 0, CAUSAL, STAGES, A_REGS)),
                (_bwd_consumer, (desc_k, desc_v, k_smem, v_smem.index(1), kv_bars.index(1), q_smem, do_smem,
                                 q_ready, do_ready, empty, turns.index(1), turns.index(0), ds_all, ds_ready,
                                 dq_smem, dq_full, dq_free, A, B, stats, KN2, DK, DV, DA_ROWS, DB_ROWS,
                                 n_heads, n_ctx, k0 + KEYS, m_lo, n_tiles, bh, 1, CAUSAL, STAGES, A_REGS)),
                (_bwd_loader, (desc_q, desc_do, desc_lse, desc_delta, q_smem, do_smem, stats_smem, q_ready,
                               do_ready, empty, bh, n_heads, m_lo, n_tiles, STAGES)),
                (_dq_writer, (desc_dq, dq_smem, dq_full, dq_free, row, m_lo // BLOCK_M,
                              n_tiles)),
            ],
            [4, 1, 1],
            [CONSUMER_REGS, LOADER_REGS, LOADER_REGS],
        )  # fmt: skip

    @gluon.jit
    def _barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        # the mbarriers of a ping-pong program: one per consumer for its own tiles, one per consumer for its
        # turn (the first consumer's turn already given), and the ring's ready (two tensors) and empty ones
        # (released by every consumer)
        own = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        ready_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ready_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(CONSUMERS):
            mbarrier.init(own.index(i), count=1)
            mbarrier.init(turns.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready_a.index(i), count=1)
            mbarrier.init(ready_b.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        fence_async_shared()
        mbarrier.arrive(turns.index(0))
        return own, turns, ready_a, ready_b, empty


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A descriptor over t's (B, H, N, D) with its own strides (TMA-ready: triton_attn_tma._tma_ready), tiles of
    (1, 1, rows, D) in the swizzled layout wgmma reads."""
    dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[t.dtype]
    block = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def _meta(causal: bool, config: tuple) -> dict:
    stages, consumer_regs, loader_regs, a_regs = config[2:6]
    return dict(
        CAUSAL=causal,
        STAGES=stages,
        CONSUMER_REGS=consumer_regs,
        LOADER_REGS=loader_regs,
        A_REGS=a_regs,
        num_warps=4,
    )


@triton.jit
def _key_bias(K, A, B, BIAS, KN2, skb, skh, skn, n_heads, n_ctx, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # per key j of (batch, head) row bh, with n = ||k_j||^2: c = -(b / |a|) n (-b n where the head's a = 0) into
    # BIAS (B * H, N, 16) bf16, as three parts whose sum is c to about float32's precision (columns 0-2; zeros
    # in the others). The forward adds them to sign(a) q.k in the score matmul and scales the sum by |a|
    # (1 where a = 0) in the exp2's argument, as dot-product attention scales its scores: a q.k - b n.
    # n itself into KN2 (B, H, N) float32, for the backward
    bh = tl.program_id(1)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = bh % n_heads
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + off_b * skb + off_h * skh + rows[:, None] * skn + offs_d[None, :], mask=rows[:, None] < n_ctx,
                other=0.0).to(tl.float32)  # fmt: skip
    n = tl.sum(k * k, 1)
    a = tl.abs(tl.load(A + off_h))
    c = -(n * (tl.load(B + off_h) / tl.where(a == 0, 1.0, a)))
    hi = c.to(tl.bfloat16)
    rest = c - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    cols = tl.arange(0, 16)[None, :]
    parts = tl.where(
        cols == 0, hi[:, None], tl.where(cols == 1, mid[:, None], tl.where(cols == 2, lo[:, None], 0.0))
    )
    row = bh.to(tl.int64) * n_ctx + rows
    tl.store(BIAS + row[:, None] * 16 + cols, parts.to(tl.bfloat16), mask=rows[:, None] < n_ctx)
    tl.store(KN2 + row, n, mask=rows < n_ctx)


def fwd_launch(q, k, v, a, o, lse, bias, causal: bool, config: tuple, programs: int) -> tuple:
    """(kernel, args, constexprs, grid) of the forward's launch: _attn_fwd_p over at most `programs` programs
    (one per pair of work items, _fwd_item) where the config says persistent, else _attn_fwd; bias:
    _key_bias's, bf16 (B * H, N, 16)."""
    B, H, N, _ = q.shape
    block_m, block_n = config[:2]
    n_blocks = triton.cdiv(N, config[6] * block_m)
    bias_block = [1, block_n, 16]
    desc_bias = TensorDescriptor(bias, list(bias.shape), list(bias.stride()), bias_block,
                                 gl.NVMMASharedLayout.get_default_for(bias_block, gl.bfloat16))  # fmt: skip
    args = (_descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), desc_bias, a, o, lse,
            *o.stride()[:3], H, N, n_blocks, n_blocks * B * H)  # fmt: skip
    meta = {**_meta(causal, config), "CONSUMERS": config[6]}
    if config[7]:
        return _attn_fwd_p, args, meta, (min(programs, triton.cdiv(n_blocks, 2) * B * H),)
    return _attn_fwd, args, meta, (n_blocks, B * H)


# the one-kernel backward's float32 dQ accumulator holds at most this many bytes (the rows of 1024 programs
# at D 64, of 512 at D 128): longer problems run as several launches over consecutive (batch, head) rows,
# each converting its rows to dq, so that peak memory stays near triton-tma's backward
ACC_BYTES = 32 << 20
# ... split between this many CUDA streams, whose launches alternate: one launch's last programs run beside
# the next one's first, where a single stream leaves the GPU idle at every launch's tail
ACC_STREAMS = 2
_side_streams: dict = {}


def _streams(device: torch.device) -> list:
    # the current stream and ACC_STREAMS - 1 side streams of device, made once
    side = _side_streams.setdefault(device, [])
    while len(side) < ACC_STREAMS - 1:
        side.append(torch.cuda.Stream(device))
    return [torch.cuda.current_stream(device), *side[: ACC_STREAMS - 1]]


def bwd_launch(
    do, q, k, v, a, b, rows_in, grads, causal: bool, config: tuple, bh0: int = 0, counter=None
) -> tuple:
    """(kernel, args, constexprs, grid) of one launch of _attn_bwd (or, where config says so, of the persistent
    _attn_bwd_p, with counter, an int32 zero 16-byte aligned) over the (batch, head) rows bh0.. that grads'
    first, a zeroed float32 (1, rows, fragment_rows(N, D), 256) dQ accumulator, holds (_dq_from_fragments
    makes it their dq). bh0 is the last of args, so that a launch over other rows of the same accumulator
    changes it and the grid's rows only (rows_launch).
    rows_in: (lse, delta, kn2) as backward has them: each (batch, head) row's base-2 log-sum-exp and
    delta, float32 (B * H, 1, row length) with rows 16-byte aligned (row length N or padded_len(N)), and its
    key norms (B, H, N); grads: that accumulator, dk, dv (contiguous (B, H, N, D)) and the per-key da, db rows
    (B, H, N) float32."""
    H, N, D = q.shape[1:]
    lse, delta, kn2 = rows_in
    acc, dk, dv, da_rows, db_rows = grads
    rows, keys = config[:2]
    block = [1, 1, D // 8, 256]  # one query tile's dQ half in fragment order, unswizzled
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=4)
    dq_desc = TensorDescriptor(acc, list(acc.shape), list(acc.stride()), block, layout)
    args = (_descriptor(q, rows), _descriptor(k, keys), _descriptor(v, keys), _descriptor(do, rows), dq_desc,
            _rows_descriptor(lse, N, rows), _rows_descriptor(delta, N, rows), a, b, kn2, dk, dv, da_rows,
            db_rows, H, N, bh0)  # fmt: skip
    grid = (triton.cdiv(N, 2 * keys), acc.shape[1])  # _attn_bwd's; rows_launch makes the persistent one's
    if not persistent(config):
        return _attn_bwd, args, _meta(causal, config), grid
    n_items = grid[0] * grid[1]
    return _attn_bwd_p, (*args[:-3], counter, H, N, grid[0], n_items, bh0), _meta(causal, config), grid


def rows_launch(args: tuple, grid: tuple, config: tuple, n: int, bh0: int, counter, programs: int) -> tuple:
    """(grid, args) of a launch over the n (batch, head) rows bh0.., from bwd_launch's args and grid: the
    persistent kernel's at most `programs` programs (one per multiprocessor) with its own counter."""
    if not persistent(config):
        return (grid[0], n), (*args[:-1], bh0)
    n_items = grid[0] * n
    return (min(n_items, programs), 1), (*args[:-6], counter, *args[-5:-2], n_items, bh0)


def persistent(config: tuple) -> bool:
    """Whether a backward config runs the persistent kernel (its seventh element; False where absent)."""
    return len(config) > 6 and bool(config[6])


def padded_len(n: int) -> int:
    """Row length of the per-row float32 values the backward reads by TMA (delta, and the log-sum-exp
    where N is not a multiple of 4): N rounded up to 4, so that each row starts 16-byte aligned, as a TMA
    descriptor's strides must."""
    return triton.cdiv(n, 4) * 4


def _rows_descriptor(t: torch.Tensor, n: int, block: int) -> TensorDescriptor:
    """A descriptor over float32 (rows, C, padded_len(n)) per-row values, tiles of (1, C, block) in
    _ROWS_LAYOUT; columns past n read as zeros."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
    return TensorDescriptor(t, [t.shape[0], t.shape[1], n], list(t.stride()), [1, t.shape[1], block], layout)


def _tma_rows(t: torch.Tensor) -> torch.Tensor:
    """t, float32 (rows, 1, N), itself where TMA can read its rows (contiguous, 16-byte aligned: N a multiple
    of 4), else a copy with rows of padded_len(N)."""
    if t.is_contiguous() and t.shape[-1] % 4 == 0 and t.data_ptr() % 16 == 0:
        return t
    rows = t.new_empty((t.shape[0], 1, padded_len(t.shape[-1])))
    rows[..., : t.shape[-1]] = t
    return rows


def fragment_rows(n: int, d: int) -> int:
    """Rows of 256 float32 that the dQ accumulator holds per (batch, head): per 64-row query tile, its two
    head-dim halves, each (d / 8, 256) in _fragment_order."""
    return triton.cdiv(n, 64) * d // 4


@triton.jit
def _dq_from_fragments(ACC, DQ, n_ctx, HEAD_DIM: tl.constexpr):
    # program (t, r): query tile t of accumulator row r, (64, HEAD_DIM) float32 in _fragment_order per
    # head-dim half -> rows 64 t.. of dq row r (rows below n_ctx), 8 columns (32 contiguous bytes) at a
    # time; leaves the tile zeroed for the accumulator's next launch
    t = tl.program_id(0)
    r = tl.program_id(1)
    GROUPS: tl.constexpr = HEAD_DIM // 16  # of 8 columns per half
    rows = tl.arange(0, 64)[:, None, None]  # 16 w + 8 h + r
    group = tl.arange(0, HEAD_DIM // 8)[None, :, None]  # GROUPS half + i
    cols = tl.arange(0, 8)[None, None, :]  # c
    chunk_row = (group // GROUPS * 2 + rows // 8 % 2) * GROUPS + group % GROUPS  # half, h, i
    tile = ACC + (r * tl.num_programs(0) + t).to(tl.int64) * 64 * HEAD_DIM
    src = tile + chunk_row * 256 + rows // 16 * 64 + rows % 8 * 8 + cols
    x = tl.load(src)
    # the zeros may be stored in another layout than the load's (the compiler's choice), so by other threads:
    # every thread's load first
    tl.debug_barrier()
    tl.store(src, tl.zeros_like(x))
    m = t * 64 + rows
    dq = DQ + (r.to(tl.int64) * n_ctx + m) * HEAD_DIM + group * 8 + cols
    tl.store(dq, x.to(DQ.dtype.element_ty), mask=m < n_ctx)


def forward(q, k, v, a, b, causal: bool, config: tuple | None = None) -> tuple:
    """(o, lse, kn2) for (B, H, N, D) bf16/fp16 q, k, v on an sm90 GPU, D with CONFIGS["fwd"] (64, 128); lse is
    the base-2 log-sum-exp per row and kn2 the key norms ||k||^2, both float32 (B, H, N), as triton_attn_tma's
    forward writes them (the backward reads both)."""
    B, H, N, D = q.shape
    o = base._alloc((B, H, N, D), q.dtype, q.device)
    lse, kn2 = (base._alloc((B, H, N), torch.float32, q.device) for _ in range(2))
    bias = base._alloc((B * H, N, 16), torch.bfloat16, q.device)
    _key_bias[(triton.cdiv(N, 64), B * H)](k, a, b, bias, kn2, *k.stride()[:3], H, N, HEAD_DIM=D, BLOCK=64)
    config = config or CONFIGS["fwd"][D][0]
    kernel, args, meta, grid = fwd_launch(q, k, v, a, o, lse, bias, causal, config, _programs(q.device))
    kernel[grid](*args, **meta)
    return o, lse, kn2


def _programs(device: torch.device) -> int:
    """A persistent kernel's programs on `device`: one per multiprocessor (1 off the GPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _compiled(kernel, args: tuple, meta: dict, grid: tuple):
    """kernel compiled for args and meta (kernel.warmup: found in the JIT's cache or built, not launched), as
    run(grid, args, stream), a launch of that compiled kernel on a raw CUDA stream handle (None: the current
    stream). It skips what kernel[grid] does per launch before the launch itself (binding and specialising
    every argument, the cache lookup): about 45 of the 70 us of host time that the backward's launch took at
    N 4096 (H200 host, Triton 3.6). The args of a later launch must specialise as the first ones: the same
    dtypes and descriptors' blocks, pointers as aligned, and ints equal unless marked do_not_specialize."""
    compiled = kernel.warmup(*args, grid=grid, **meta)
    constexprs = tuple(meta[name] for name in kernel.arg_names[len(args) :])

    def run(grid: tuple, args: tuple, stream) -> None:
        compiled[(*grid, 1)](*args, *constexprs, stream=stream)

    return run


def backward(do, q, k, v, a, b, o, lse, kn2, causal: bool, config: tuple | None = None) -> tuple:
    """(dq, dk, dv, da, db) of triton_attn_tma's forward (or forward above) with output o, base-2 lse and key
    norms kn2, by _attn_bwd or the persistent _attn_bwd_p (config: one of CONFIGS["bwd"][D], default the
    first), over as many (batch, head) rows at a time as ACC_BYTES allows."""
    B, H, N, D = q.shape
    # the per-key da and db rows in one buffer, so that one reduction sums both over the keys first (a
    # contiguous reduction; summing over (B, N) at once took 26 us a call at N 4096, D 64 on an H200), then
    # each over the batch into a tensor of its own (a custom op's outputs may not alias one another)
    key_rows = base._alloc((2, B, H, N), torch.float32, q.device)
    da_rows, db_rows = key_rows.unbind(0)
    delta = base._alloc((B * H, 1, padded_len(N)), torch.float32, q.device)
    base._bwd_preprocess[(triton.cdiv(N, 64), B * H)](
        o, do, k, delta, kn2, *o.stride()[:3], *do.stride()[:3], *k.stride()[:3], H, N, delta.shape[-1],
        HEAD_DIM=D, D_PAD=D, BLOCK=64, NORMS=False,
    )  # fmt: skip
    lse = _tma_rows(lse.reshape(B * H, 1, N))
    config = config or CONFIGS["bwd"][D][0]
    dq, dk, dv = (base._alloc((B, H, N, D), q.dtype, q.device) for _ in range(3))
    streams = _streams(q.device) if q.is_cuda else [None]
    step = max(1, min(B * H, ACC_BYTES // len(streams) // (fragment_rows(N, D) * 256 * 4)))
    # one per stream, zeroed here and by each conversion to dq after
    acc = torch.zeros((len(streams), step, fragment_rows(N, D), 256), dtype=torch.float32, device=q.device)
    dq_rows = dq.view(B * H, N, D)
    # each stream's launch arguments built once, descriptors included, and both kernels compiled once: at
    # N 4096 the host time of the launches bounds the backward's rate. Every launch specialises as the
    # first: its accumulator and dq rows start 16-byte aligned like theirs, and bh0 is not specialised.
    grads = [(acc[lane : lane + 1], dk, dv, da_rows, db_rows) for lane in range(len(streams))]
    # the persistent kernel's work counters, one per launch, 16 bytes apart (as the first one is aligned),
    # and its programs
    counters, programs = None, 1
    if persistent(config):
        counters = torch.zeros(4 * triton.cdiv(B * H, step), dtype=torch.int32, device=q.device)
        programs = _programs(q.device)
    launches = [
        bwd_launch(do, q, k, v, a, b, (lse, delta, kn2), g, causal, config, 0, counters) for g in grads
    ]
    run_bwd = _compiled(*launches[0])
    to_dq = (acc[0], dq_rows[:step], N)
    run_to_dq = _compiled(_dq_from_fragments, to_dq, {"HEAD_DIM": D}, (triton.cdiv(N, 64), step))
    for stream in streams[1:]:
        stream.wait_stream(streams[0])
    handles = [stream and stream.cuda_stream for stream in streams]
    for i, bh0 in enumerate(range(0, B * H, step)):
        lane = i % len(streams)
        n = min(step, B * H - bh0)
        _, args, _, grid = launches[lane]
        counter = None if counters is None else counters[4 * i :]
        run_bwd(*rows_launch(args, grid, config, n, bh0, counter, programs), handles[lane])
        run_to_dq((triton.cdiv(N, 64), n), (acc[lane, :n], dq_rows[bh0 : bh0 + n], N), handles[lane])
    for stream in streams[1:]:
        streams[0].wait_stream(stream)
    per_row = key_rows.sum(-1)  # (2, B, H)
    return dq, dk, dv, per_row[0].sum(0), per_row[1].sum(0)


# ----------------------------------------------------------------------------------------------------
# the "gluon" backend: torch.library custom ops (opaque to torch.compile), differentiated as triton_attn's


@torch.library.custom_op("ablate::rbf_attention_gluon_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.shape[-1] not in CONFIGS["fwd"] or q.shape[-2] < FWD_MIN_LEN.get(q.shape[-1], 0):
        return triton_attn_tma._fwd_op(q, k, v, a, b, causal)
    q, k, v = (triton_attn_tma._tma_ready(t) for t in (q, k, v))
    return forward(q, k, v, a, b, causal)


@torch.library.custom_op("ablate::rbf_attention_gluon_bwd", mutates_args=())
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
    do, q, k, v = (triton_attn_tma._tma_ready(t) for t in (do, q, k, v))
    return backward(do, q, k, v, a, b, o, lse, kn2, causal)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, a, b, causal):
    return triton_attn_tma._fwd_fake(q, k, v, a, b, causal)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, a, b, o, lse, kn2, causal):
    return triton_attn_tma._bwd_fake(do, q, k, v, a, b, o, lse, kn2, causal)


base.register_autograd(_fwd_op, _bwd_op)


def gluon_attention(q, k, v, a, b, *, causal: bool = True) -> torch.Tensor:
    """Fused softmax(a*q.k - b*||k||^2) v by the ping-pong kernels (below FWD_MIN_LEN keys after triton-tma's
    forward; the backward is the one-kernel one at both head dims). q, k, v: (B, H, N, D) bf16 or fp16, D 64 or
    128; a, b: (H,). Needs an sm90 GPU. Differentiable in q, k, v, a and b."""
    inputs = base.checked_inputs("gluon", unsupported_reason(q, k, v, a, b), q, k, v, a, b)
    return _fwd_op(*inputs, causal)[0]


def unsupported_reason(q, k, v, a, b) -> str | None:
    """Why the Gluon kernels cannot run these inputs, or None when they can."""
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if base.INTERPRET:
        return "the Gluon kernels have no interpreter (TRITON_INTERPRET=1 is set)"
    if q.device.type != "cuda":
        return f"the Gluon kernels need an sm90 GPU; got {q.device}"
    reason = base.unsupported_reason(q, k, v, a, b)
    if reason:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Gluon kernels take bfloat16 or float16; got {q.dtype}"
    if q.shape[-1] not in CONFIGS["bwd"]:
        return f"the Gluon kernels take head dim {' or '.join(map(str, CONFIGS['bwd']))}; got {q.shape[-1]}"
    capability = torch.cuda.get_device_capability(q.device)
    if capability != (9, 0):
        return (
            f"the Gluon kernels use Hopper's wgmma and need an sm90 GPU; got sm{capability[0]}{capability[1]}"
        )
    return None


def _check(dtypes=(torch.bfloat16, torch.float16)) -> bool:
    # every config of the two kernels against float64 math: o, and dq, dk, dv, da, db (relative to the
    # largest element of each); in fp16 the first config of each
    from kernels import reference

    ok = True
    for dtype in dtypes:
        for n, d, causal in (
            (64, 64, True),
            (257, 64, True),
            (257, 128, False),
            (1000, 128, True),
            (2048, 64, False),
        ):
            batch, heads = 2, 3
            q, k, v, do = (torch.randn(batch, heads, n, d, device="cuda", dtype=dtype) for _ in range(4))
            a = torch.rand(heads, device="cuda") * 0.2 + 0.05
            b = torch.rand(heads, device="cuda") * 0.1
            exact = [t.double().requires_grad_() for t in (q, k, v, a, b)]
            want_o = reference.attention_reference(*exact, causal=causal)
            want = torch.autograd.grad(want_o, exact, do.double())
            first = dtype != torch.bfloat16
            results = []
            tma_saved = triton_attn_tma._fwd_op(q, k, v, a, b, causal)  # (o, lse, kn2)
            saved = tma_saved  # the backward's input where no Gluon forward runs
            for config in CONFIGS["fwd"].get(d, [])[: 1 if first else None]:
                saved = forward(q, k, v, a, b, causal, config)
                results.append(("fwd", config, [_rel(saved[0], want_o)], [1e-2]))
            tma_grads = triton_attn_tma._bwd_op(do, q, k, v, a, b, *tma_saved, causal)
            # gradients within 2e-2, or within 1.25x triton-tma's error on the same inputs
            limits = [max(2e-2, 1.25 * _rel(g, w)) for g, w in zip(tma_grads, want, strict=True)]
            for config in CONFIGS["bwd"][d][: 1 if first else None]:
                grads = backward(do, q, k, v, a, b, *saved, causal, config)
                errs = [_rel(g, w) for g, w in zip(grads, want, strict=True)]
                results.append(("bwd", config, errs, limits))
            for kind, config, errs, bounds in results:
                good = all(e < bound for e, bound in zip(errs, bounds, strict=True))
                ok &= good
                print("check", str(dtype)[6:], n, d, causal, kind, config, " ".join(f"{e:.1e}" for e in errs),
                      "ok" if good else "FAIL", flush=True)  # fmt: skip
    return ok


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _bench_shape(n: int, d: int) -> str:
    # kernels.bench's shapes, rbf inputs and SDPA-cuDNN runner: causal forward and backward ms (TFLOP/s:
    # the forward 2*B*H*N^2*D, the backward 2.5x that, as kernels.bench counts them)
    from torch.nn.attention import SDPBackend
    from triton.testing import do_bench

    from kernels import bench

    batch = bench.TOKENS // n
    (q, k, v), a, b, do = bench._inputs(batch, n, d, torch.bfloat16, "rbf")
    cudnn = bench._sdpa(SDPBackend.CUDNN_ATTENTION)
    out = cudnn(q, k, v, a, b)
    cudnn_bwd = do_bench(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
    q, k, v = (t.detach() for t in (q, k, v))
    cudnn_fwd = do_bench(lambda: cudnn(q, k, v, a, b))
    tma_fwd = do_bench(lambda: triton_attn_tma._fwd_op(q, k, v, a, b, True))
    saved = triton_attn_tma._fwd_op(q, k, v, a, b, True)
    tma_bwd = do_bench(lambda: triton_attn_tma._bwd_op(do, q, k, v, a, b, *saved, True))
    fwd = {c: do_bench(lambda c=c: forward(q, k, v, a, b, True, c)) for c in CONFIGS["fwd"].get(d, [])}
    fwd = fwd or {"triton-tma": tma_fwd}
    bwd = {c: do_bench(lambda c=c: backward(do, q, k, v, a, b, *saved, True, c)) for c in CONFIGS["bwd"][d]}
    flops = 2 * batch * bench.HEADS * n * n * d
    tf = lambda ms, x=1.0: f"{ms:.3f} ({x * flops / ms / 1e9:.0f})"  # noqa: E731
    best_f, best_b = min(fwd.values()), min(bwd.values())
    lines = [
        f"bench bf16 N {n} D {d} fwd: cudnn {tf(cudnn_fwd)} tma {tf(tma_fwd)} ping-pong "
        + ", ".join(f"{c}: {t:.3f}" for c, t in fwd.items()),
        f"bench bf16 N {n} D {d} bwd: cudnn {tf(cudnn_bwd, 2.5)} tma {tf(tma_bwd, 2.5)} ping-pong "
        + ", ".join(f"{c}: {t:.3f}" for c, t in bwd.items()),
        f"bench bf16 N {n} D {d} best: fwd {tf(best_f)} {best_f / cudnn_fwd:.2f}x cudnn {best_f / tma_fwd:.2f}x tma;"
        f" bwd {tf(best_b, 2.5)} {best_b / cudnn_bwd:.2f}x cudnn {best_b / tma_bwd:.2f}x tma; fwd+bwd"
        f" {(best_f + best_b) / (cudnn_fwd + cudnn_bwd):.2f}x cudnn,"
        f" tma {(tma_fwd + tma_bwd) / (cudnn_fwd + cudnn_bwd):.2f}x cudnn",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1:] == ["check"]:
        sys.exit(0 if _check() else 1)
    for n, d in ((4096, 64), (16384, 64), (4096, 128), (16384, 128)):
        print(_bench_shape(n, d), flush=True)
