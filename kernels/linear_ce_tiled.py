"""The LM head and its cross-entropy with no logits in memory: every logit tile lives on chip only.

linear_ce.py writes the (N x V) logits once (bf16) and reads them back; at the seed size that buffer is
1.6 GB for V = 50257 and its traffic dominates. Here each kernel recomputes the logit tiles it needs
from h (N x D), W (V x D) and b (V) with tl.dot, in float32:

    forward   per row block and vocab chunk: online max / sum of exp over the chunk's tiles and the
              target's logit; the chunks' partials are combined into lse per row (a few torch ops)
              loss_i = lse_i - z_i,target_i
    dh        per row block: dh = sum over vocab tiles of G W, with G = (softmax - onehot) * grad_i
    dW, db    per vocab block (and row chunk, when V has too few blocks to fill the GPU): dW = sum over
              row blocks of G^T h, db = sum of G over rows; row chunks' float32 partials are summed

G is never written out. The backward recomputes the logits twice (once for dh, once for dW), so the
loss costs about three logits matmuls plus the two gradient matmuls, against one plus two for
linear_ce.py, in exchange for no N x V traffic. Math as in linear_ce.py: the matmuls run in h's dtype
(W and b are cast to it), the softmax in float32, every target must be in [0, V) (one outside gives a
NaN loss; there is no ignore index).

Tiles: BLOCK_M rows x BLOCK_N vocab entries, autotuned on the GPU; the reduction dimension D is one
BLOCK_K = D tile up to D = 256 (h's tile is loaded once per program) and a loop over 64-wide tiles
beyond, where dh and dW are also split into 256-wide column blocks (each recomputing the logits).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.linear_ce import unsupported_reason
from kernels.triton_attn import INTERPRET

AUTOTUNE = os.environ.get("ABLATE_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
# D up to MAX_K is one tile; beyond it, K_TILE-wide tiles in a loop and D_OUT-wide output blocks
MAX_K, K_TILE, D_OUT = (16, 16, 16) if INTERPRET else (256, 64, 256)
CHUNK_MULTIPLE = 16 if INTERPRET else 256  # vocab chunks are whole tiles for every BLOCK_N
TARGET_PROGRAMS = 512  # forward: split the vocab until about this many programs run (H200: 132 SMs)


# ----------------------------------------------------------------------------------------------------
# tile helpers


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols, stride):
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _logits(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION):
    """(BLOCK_M, BLOCK_N) float32 tile h[rows] @ W[cols]^T, over D in BLOCK_K-wide steps."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = _load_tile(h_ptr, rows, ks, N, D, stride_h)
        w = _load_tile(w_ptr, cols, ks, V, D, stride_w)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grad_tile(z, lse, target, scale, cols, valid):
    """G = (softmax - onehot) * scale on a logits tile, zero outside the valid entries."""
    g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    return tl.where(valid, g * scale[:, None], 0.0)


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, bias_ptr, target_ptr,  # (N, D), (V, D), (V,) or a dummy, (N,) int64
    max_ptr, sumexp_ptr, ztarget_ptr,  # (splits, N) float32 partials of each vocab chunk
    N, V, D, chunk, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, SINGLE_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    target = tl.load(target_ptr + rows, mask=rows < N, other=-1)
    v_start = split * chunk
    v_end = tl.minimum(v_start + chunk, V)
    ks = tl.arange(0, BLOCK_K)
    if SINGLE_K:
        h = _load_tile(h_ptr, rows, ks, N, D, stride_h)  # (BLOCK_M, BLOCK_K), resident
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    z_target = tl.zeros([BLOCK_M], tl.float32)
    for start in range(v_start, v_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        if SINGLE_K:
            w = _load_tile(w_ptr, cols, ks, V, D, stride_w)  # (BLOCK_N, BLOCK_K)
            z = tl.dot(h, tl.trans(w), input_precision=PRECISION)
        else:
            z = _logits(
                h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION
            )
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=cols < v_end, other=0.0).to(tl.float32)[None, :]
        z = tl.where((cols < v_end)[None, :], z, float("-inf"))  # every tile has a valid column
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(max_ptr + out, m, mask=rows < N)
    tl.store(sumexp_ptr + out, s, mask=rows < N)
    tl.store(ztarget_ptr + out, z_target, mask=rows < N)


@triton.jit
def _dh_kernel(
    h_ptr, w_ptr, bias_ptr, target_ptr, lse_ptr, grad_ptr,  # grad: (N,) float32, d loss / d loss_i
    dh_ptr,  # (N, D)
    N, V, D, stride_h, stride_w, stride_dh,
    HAS_BIAS: tl.constexpr, SINGLE_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's columns of dh
    target = tl.load(target_ptr + rows, mask=rows < N, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    scale = tl.load(grad_ptr + rows, mask=rows < N, other=0.0)
    if SINGLE_K:  # BLOCK_K == BLOCK_D covers D
        h = _load_tile(h_ptr, rows, dcols, N, D, stride_h)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, V, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        w_out = _load_tile(w_ptr, cols, dcols, V, D, stride_w)  # (BLOCK_N, BLOCK_D)
        if SINGLE_K:
            z = tl.dot(h, tl.trans(w_out), input_precision=PRECISION)
        else:
            z = _logits(
                h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION
            )
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
        g = _grad_tile(z, lse, target, scale, cols, (cols < V)[None, :])
        acc = tl.dot(g.to(w_out.dtype), w_out, acc, input_precision=PRECISION)
    mask = (rows < N)[:, None] & (dcols < D)[None, :]
    dh = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + dcols[None, :]
    tl.store(dh, acc.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_kernel(
    h_ptr, w_ptr, bias_ptr, target_ptr, lse_ptr, grad_ptr,
    dw_ptr, db_ptr,  # (splits, V, D) and (splits, V) sums over each row chunk; db may be a dummy
    N, V, D, row_chunk, stride_h, stride_w, stride_dw, stride_split,
    HAS_BIAS: tl.constexpr, SINGLE_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's columns of dW
    split = tl.program_id(2)
    row_start = split * row_chunk
    row_end = tl.minimum(row_start + row_chunk, N)
    if SINGLE_K:
        w = _load_tile(w_ptr, cols, dcols, V, D, stride_w)  # (BLOCK_N, BLOCK_D), resident
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        target = tl.load(target_ptr + rows, mask=rows < row_end, other=-1)
        lse = tl.load(lse_ptr + rows, mask=rows < row_end, other=0.0)
        scale = tl.load(grad_ptr + rows, mask=rows < row_end, other=0.0)
        h_out = _load_tile(h_ptr, rows, dcols, row_end, D, stride_h)  # (BLOCK_M, BLOCK_D)
        if SINGLE_K:
            z = tl.dot(h_out, tl.trans(w), input_precision=PRECISION)
        else:
            z = _logits(
                h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION
            )
        if HAS_BIAS:
            z += bias[None, :]
        g = _grad_tile(z, lse, target, scale, cols, (rows < row_end)[:, None] & (cols < V)[None, :])
        acc = tl.dot(tl.trans(g.to(h_out.dtype)), h_out, acc, input_precision=PRECISION)
        db += tl.sum(g, axis=0)
    mask = (cols < V)[:, None] & (dcols < D)[None, :]
    dw = dw_ptr + split.to(tl.int64) * stride_split + cols.to(tl.int64)[:, None] * stride_dw + dcols[None, :]
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:  # noqa: SIM102 - a compile-time branch around a run-time one
        if tl.program_id(1) == 0:  # the other column blocks computed the same db
            tl.store(db_ptr + split * V + cols, db.to(db_ptr.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------------------------------
# autotune configs: BLOCK_M x BLOCK_N tiles, pruned to those that fit in registers and shared memory;
# the interpreter runs one tiny config (several blocks and ragged tails at small N)

_GPU_SPECS = [(m, n, w, s) for m in (64, 128) for n in (64, 128, 256) for w in (4, 8) for s in (2, 3, 4)]
_INTERPRET_SPECS = [(16, 16, 1, 1)]
_SMEM_LIMIT = 227 * 1024  # bytes per program on Hopper
# float32 values per thread: the logits tile counts three times (its exp and masks live beside it), the
# accumulator once. Within this, ptxas (sm_90, D = 256 and 1024, bf16) allocated at most 254 registers
# without spilling; the configs beyond it spilled.
_REGISTER_LIMIT = 224


def _footprint(kind: str, bm: int, bn: int, bk: int, bd: int, single_k: bool, stages: int) -> tuple:
    """(float32 values per warp-group, shared-memory elements) of one program, roughly."""
    regs = 3 * bm * bn + {"fwd": 0, "dh": bm * bd, "dw": bn * bd}[kind]
    if kind == "dw":  # G^T for the dot with h goes through registers and shared memory once more
        regs += (
            bm * bn
        )  # (ptxas spilled in every dW config but 128 x 64, 8 warps; a few dozen bytes at 64 x 64)
    if single_k:  # one operand resident, the other streamed through `stages` buffers
        resident = {"fwd": bm, "dh": bm, "dw": bn}[kind] * bk
        streamed = {"fwd": bn * bk, "dh": bn * bd, "dw": bm * bd}[kind]
    else:  # both streamed in K tiles, plus the backward's output-column tile
        resident = 0
        streamed = (bm + bn) * bk + {"fwd": 0, "dh": bn * bd, "dw": bm * bd}[kind]
    if kind == "dw":
        resident += bm * bn
    return regs, resident + stages * streamed


def _make_prune(kind: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs[:1]
        meta = {**named_args, **kwargs}
        elem = named_args["h_ptr"].element_size()

        def fits(c) -> bool:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            regs, smem = _footprint(
                kind, bm, bn, meta["BLOCK_K"], meta.get("BLOCK_D", 0), meta["SINGLE_K"], c.num_stages
            )
            return regs <= _REGISTER_LIMIT * 32 * c.num_warps and smem * elem <= _SMEM_LIMIT

        kept = [c for c in configs if fits(c)]
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept if AUTOTUNE else kept[:1]

    return prune


def _tuned(kernel, kind: str):
    specs = _INTERPRET_SPECS if INTERPRET else _GPU_SPECS
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]
    return triton.autotune(
        configs=configs, key=["V", "D"], prune_configs_by={"early_config_prune": _make_prune(kind)}
    )(kernel)


_fwd_tuned = _tuned(_fwd_kernel, "fwd")
_dh_tuned = _tuned(_dh_kernel, "dh")
_dw_tuned = _tuned(_dw_kernel, "dw")


# ----------------------------------------------------------------------------------------------------
# launchers, as torch.library custom ops (fake shapes, autograd): opaque single calls under torch.compile


def _k_blocks(h: torch.Tensor) -> tuple[dict, int]:
    """The reduction tiling's constexprs for h's D and dtype, and BLOCK_D (dh and dW column blocks)."""
    d = h.shape[1]
    d_pad = max(16, triton.next_power_of_2(d))
    single = d_pad <= MAX_K
    return dict(
        SINGLE_K=single,
        BLOCK_K=d_pad if single else K_TILE,
        PRECISION="ieee" if h.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
    ), (d_pad if single else D_OUT)


def vocab_chunk(n: int, v: int) -> int:
    """Vocab entries per forward program: split V until about TARGET_PROGRAMS programs run (128-row blocks)."""
    if INTERPRET:
        return 2 * CHUNK_MULTIPLE  # several chunks and several tiles per chunk at test sizes
    splits = max(
        1, min(triton.cdiv(v, 4 * CHUNK_MULTIPLE), triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, 128)))
    )
    return triton.cdiv(triton.cdiv(v, splits), CHUNK_MULTIPLE) * CHUNK_MULTIPLE


def row_chunk(n: int, v: int) -> int:
    """Rows per dW program: split N when there are too few vocab blocks to fill the GPU (V = 8192)."""
    if INTERPRET:
        return 2 * CHUNK_MULTIPLE  # N = 64 takes two chunks
    splits = max(
        1, min(triton.cdiv(n, 4 * CHUNK_MULTIPLE), triton.cdiv(TARGET_PROGRAMS // 2, triton.cdiv(v, 128)))
    )
    return triton.cdiv(triton.cdiv(n, splits), CHUNK_MULTIPLE) * CHUNK_MULTIPLE


@torch.library.custom_op("ablate::linear_cross_entropy_tiled", mutates_args=())
def _tiled_fwd_op(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp, both (N,) float32."""
    n, d = h.shape
    v = weight.shape[0]
    chunk = vocab_chunk(n, v)
    splits = triton.cdiv(v, chunk)
    m, s, z_target = torch.empty(3, splits, n, dtype=torch.float32, device=h.device)  # (splits, N) each
    blocks, _ = _k_blocks(h)

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_M"]), splits

    _fwd_tuned[grid](
        h, weight, bias if bias is not None else h, targets, m, s, z_target,
        n, v, d, chunk, h.stride(0), weight.stride(0), HAS_BIAS=bias is not None, **blocks,
    )  # fmt: skip
    m_row = m.max(dim=0).values  # (N,)
    lse = m_row + (s * torch.exp(m - m_row)).sum(dim=0).log()
    in_range = (targets >= 0) & (targets < v)  # a bad target's z_target is 0: make its loss NaN
    loss = torch.where(in_range, lse - z_target.sum(dim=0), float("nan"))
    return loss, lse


@_tiled_fwd_op.register_fake
def _tiled_fwd_fake(h, weight, bias, targets):
    return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)


@torch.library.custom_op("ablate::linear_cross_entropy_tiled_backward", mutates_args=())
def _tiled_bwd_op(
    grad_rows: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows[i] * loss_i w.r.t. h, weight and bias (empty without a bias)."""
    n, d = h.shape
    v = weight.shape[0]
    grad_rows = grad_rows.float().contiguous()
    blocks, block_d = _k_blocks(h)
    chunk = row_chunk(n, v)
    splits = triton.cdiv(n, chunk)
    dh = torch.empty_like(h)
    partial = torch.float32 if splits > 1 else weight.dtype  # summed over the row chunks below
    dw = torch.empty(splits, v, d, dtype=partial, device=h.device)  # (splits, V, D)
    db = torch.empty(splits, v, dtype=partial, device=h.device) if bias is not None else dw  # (splits, V)
    common = (bias if bias is not None else h, targets, lse, grad_rows)
    sizes = dict(HAS_BIAS=bias is not None, BLOCK_D=block_d, **blocks)

    def row_grid(meta):
        return triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_d)

    def vocab_grid(meta):
        return triton.cdiv(v, meta["BLOCK_N"]), triton.cdiv(d, block_d), splits

    _dh_tuned[row_grid](h, weight, *common, dh, n, v, d, h.stride(0), weight.stride(0), dh.stride(0), **sizes)
    _dw_tuned[vocab_grid](
        h, weight, *common, dw, db, n, v, d, chunk, h.stride(0), weight.stride(0), dw.stride(1),
        dw.stride(0), **sizes,
    )  # fmt: skip
    dw = dw[0] if splits == 1 else dw.sum(dim=0).to(weight.dtype)
    if bias is None:
        return dh, dw, h.new_empty(0)
    db = db[0] if splits == 1 else db.sum(dim=0).to(bias.dtype)
    return dh, dw, db


@_tiled_bwd_op.register_fake
def _tiled_bwd_fake(grad_rows, h, weight, bias, targets, lse):
    db = torch.empty_like(bias) if bias is not None else h.new_empty(0)
    return torch.empty_like(h), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output) -> None:
    h, weight, bias, targets = inputs
    _, lse = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(h, weight, bias, targets, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, _grad_lse):
    h, weight, bias, targets, lse = ctx.saved_tensors
    dh, dw, db = _tiled_bwd_op(grad_loss, h, weight, bias if ctx.has_bias else None, targets, lse)
    return dh, dw, db if ctx.has_bias else None, None


_tiled_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_tiled(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of (h @ weight.T + bias) against targets, without the logits in memory.

    h: (N, D), weight: (V, D), bias: (V,) or None, targets: (N,) int64. Same value and gradients as
    `kernels.linear_cross_entropy` (linear_ce.py): the matmuls run in h's dtype (weight and bias are cast
    to it), the softmax in float32; a target outside [0, V) makes the loss NaN (no ignore index). The
    backward recomputes the logits tile by tile from h, weight and the saved log-sum-exp.
    """
    reason = unsupported_reason(h, weight, targets)
    if reason:
        raise ValueError(f"linear_cross_entropy_tiled: {reason}")
    w = weight.to(h.dtype).contiguous()
    b = bias.to(h.dtype).contiguous() if bias is not None else None
    loss, _lse = _tiled_fwd_op(h.contiguous(), w, b, targets.contiguous())
    return loss.mean()
