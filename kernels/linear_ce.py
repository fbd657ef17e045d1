"""The LM head and its cross-entropy with one logits buffer and no float32 copy of it.

The plain compiled loss spends most of a small model's step on the (tokens x vocab) logits: a copy of
the bias into the full output, the head's matmul on top of it, a float32 log-softmax pass, its backward
pass and a bias-gradient reduction (profiled on an H200: README, training throughput). Here the forward
does all of it at once:

    Z = h W^T + b                one matmul (b in cuBLAS's epilogue) into a bf16 buffer whose rows
                                 are padded to 64 columns
    lse, loss = row kernel       log-sum-exp of Z per row, in float32 (first pass over the row)
    G = softmax(Z) - onehot      written over Z in place by the same kernel (second pass, from the
                                 row's end, which the first pass read last and L2 likeliest holds)
    dh = G W,  [dW | db] = G^T [h | 1]     two matmuls; the bias gradient rides along as a column of ones

and keeps only dh, dW and db (small) for the backward, which scales them by the incoming gradient.
Without gradients (evaluation) only the first pass runs. Math per row: loss = lse - z_target,
G = softmax - onehot.

How Z is made and read is the op's `schedule` (the same math each way; "rows" ships):

    rows        cuBLAS writes Z + b (torch.addmm); one program per row reads it twice, with one exp
                per logit in the first pass (one running maximum per row) (BLOCK_V and NUM_WARPS: within
                2% of the fastest the loss benchmark measured on an H200: README, "Training throughput")
    persistent  the same, but a few programs per SM each walk many rows, so that the rows in flight
                fit in L2 and the second pass can read them from there
    epilogue    a Triton matmul writes Z + b and, per row and vocab tile, the tile's max and sum of exp
                (logits_matmul.py); the row kernel combines those and reads Z once, to write G

The row kernels' HBM traffic at the seed size (16384 x 50257, bf16 Z of 1.65 GB): "rows" reads Z twice
and writes G, 3 x 1.65 GB; "epilogue" 2 x 1.65 GB, and "persistent" too if its rows stay in L2.
`python -m kernels.bench_loss` compares them. On an H200 neither beat "rows" in a training step
(README, "Training throughput"): "persistent" matched it within 1%, "epilogue" gave 27% fewer tokens/s, its
Triton matmul losing to cuBLAS by more than the second read of Z costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.logits_matmul import logits_with_partials
from kernels.triton_attn import INTERPRET

PAD = 64  # logits row stride (and weight rows) padded to this many columns: aligned, fast matmuls
# the row kernel's tile and warps, read at each call: `python -m kernels.bench_loss --row-kernel BV,W`
# measures other values against these in one run
BLOCK_V = 128 if INTERPRET else 1024
NUM_WARPS = 4
# "persistent" and "epilogue": the persistent row kernel's tile, warps and programs per SM, read at each call
# (`python -m kernels.bench_loss --persistent BV,W,P` measures others). On an H200 at 16384 x 256 x 50257
# (2026-11-30) 4096/8/4 took 4.17 ms against 4.70 for 8192/16/2, 4.30 for 8192/8/2 and 4.67 for
# 16384/16/1 (and 4.35 for the "rows" schedule); README, "Training throughput".
PERSISTENT_BLOCK_V = 64 if INTERPRET else 4096
PERSISTENT_NUM_WARPS = 8
PROGRAMS_PER_SM = 4
BIAS_IN_MATMUL = True  # persistent: add b in cuBLAS's epilogue (False: in the row kernel, as "rows" does)
# every schedule: db as a column of ones in the dW matmul (N = D + 8: a wider tile's worth of work for 8
# columns, if cuBLAS tiles N by 128 or 256), or, False, dW alone (N = D) and db as G's column sums
DB_IN_DW_MATMUL = True
INTERPRET_PROGRAMS = 3  # the interpreter has no SMs: 3 programs, so each walks several rows


@triton.jit
def _ce_rows_kernel(
    z_ptr,  # (M, V_pad) logits with their bias in, gradient out (when WRITE_GRAD)
    target_ptr,  # (M,) int64
    loss_ptr,  # (M,) float32
    stride_row,
    V,
    V_pad,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_row
    lse = _lse_of_row(z_row, z_ptr, V, False, BLOCK_V)  # pass 1 (no bias pointer: b is in Z)
    target = _store_row_loss(z_row, z_ptr, target_ptr, loss_ptr, row, lse, V, False)
    if WRITE_GRAD:  # pass 2
        _write_row_grad(z_row, z_ptr, lse, target, V, V_pad, False, BLOCK_V)


@triton.jit
def _store_row_loss(z_row, bias_ptr, target_ptr, loss_ptr, row, lse, V, HAS_BIAS: tl.constexpr):
    """Store the row's loss lse - z_target (NaN for a target outside [0, V)); return the target."""
    target = tl.load(target_ptr + row)
    in_range = (target >= 0) & (target < V)  # never read outside the row; a bad target gives NaN
    z_target = tl.load(z_row + target, mask=in_range, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z_target += tl.load(bias_ptr + target, mask=in_range, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(in_range, lse - z_target, float("nan")))
    return target


@triton.jit
def _write_row_grad(z_row, bias_ptr, lse, target, V, V_pad, HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """G = softmax - onehot over the row, written over its logits; zeros in the padding columns.

    It walks the row from its end, which the first pass read last: those tiles are the likeliest to be
    still in L2."""
    offsets = tl.arange(0, BLOCK_V)
    tiles = tl.cdiv(V_pad, BLOCK_V)
    for i in range(tiles):
        cols = (tiles - 1 - i) * BLOCK_V + offsets
        valid = cols < V
        z = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0), 0.0)
        tl.store(z_row + cols, g.to(z_row.dtype.element_ty), mask=cols < V_pad)


@triton.jit
def _lse_of_row(z_row, bias_ptr, V, HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
    """log-sum-exp of one row: one running maximum (a block reduction per tile), sums of exp per lane."""
    offsets = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):  # the first tile has a valid column: m is finite after it
        cols = start + offsets
        valid = cols < V
        z = tl.load(z_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    return m + tl.log(tl.sum(s, axis=0))


@triton.jit
def _lse_of_partials(max_ptr, sumexp_ptr, row, N, TILES, BLOCK_T: tl.constexpr):
    """log-sum-exp of one row from its vocab tiles' (max, sum of exp) partials, each (TILES, N)."""
    tiles = tl.arange(0, BLOCK_T)
    valid = tiles < TILES
    m = tl.load(max_ptr + tiles * N + row, mask=valid, other=float("-inf"))
    s = tl.load(sumexp_ptr + tiles * N + row, mask=valid, other=0.0)
    m_row = tl.max(m, axis=0)
    return m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))


@triton.jit
def _ce_rows_persistent_kernel(
    z_ptr,  # (N, V_pad) logits in, gradient out (when WRITE_GRAD)
    bias_ptr,  # (V,) or a dummy
    max_ptr, sumexp_ptr,  # (TILES, N) float32 partials (FROM_PARTIALS) or dummies
    target_ptr,  # (N,) int64
    loss_ptr,  # (N,) float32
    stride_row, N, V, V_pad, TILES,
    HAS_BIAS: tl.constexpr, FROM_PARTIALS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Rows pid, pid + programs, ...: few programs, so the rows in flight can stay in L2 for the second pass."""
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        z_row = z_ptr + tl.cast(row, tl.int64) * stride_row  # (the interpreter's row is a Python int)
        if FROM_PARTIALS:
            lse = _lse_of_partials(max_ptr, sumexp_ptr, row, N, TILES, BLOCK_T)
        else:
            lse = _lse_of_row(z_row, bias_ptr, V, HAS_BIAS, BLOCK_V)
        target = _store_row_loss(z_row, bias_ptr, target_ptr, loss_ptr, row, lse, V, HAS_BIAS)
        if WRITE_GRAD:
            _write_row_grad(z_row, bias_ptr, lse, target, V, V_pad, HAS_BIAS, BLOCK_V)


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))


def _rows(h, w_pad, bias, targets, losses, v, with_grad):
    """Schedule "rows": Z = h W^T + b by cuBLAS (b in its epilogue), then one program per row."""
    z = _logits_with_bias(h, w_pad, bias, v)  # (n, v_pad)
    _row_pass(z, targets, losses, v, with_grad)
    return z


def _row_pass(z, targets, losses, v, with_grad) -> None:
    """The rows schedule's kernel over logits Z (bias included): losses, and G over Z when with_grad."""
    _ce_rows_kernel[(z.shape[0],)](
        z, targets, losses, z.stride(0), v, z.shape[1], WRITE_GRAD=with_grad, BLOCK_V=BLOCK_V,
        num_warps=NUM_WARPS,
    )  # fmt: skip


def _logits_with_bias(h, w_pad, bias, v):
    """Z = h W^T (+ b, added by cuBLAS in the matmul's epilogue), (n, v_pad)."""
    if bias is None:
        return h @ w_pad.t()
    return torch.addmm(torch.nn.functional.pad(bias, (0, w_pad.shape[0] - v)), h, w_pad.t())


def _persistent(h, w_pad, bias, targets, losses, v, with_grad):
    """Schedule "persistent": Z = h W^T + b by cuBLAS (b in its epilogue), then the persistent row kernel."""
    in_matmul = bias is not None and BIAS_IN_MATMUL
    z = _logits_with_bias(h, w_pad, bias if in_matmul else None, v)
    _persistent_rows(z, None if in_matmul else bias, None, targets, losses, v, with_grad)
    return z


def _epilogue(h, w_pad, bias, targets, losses, v, with_grad):
    """Schedule "epilogue": Z = h W^T + b and its per-tile softmax partials by one Triton matmul."""
    z, maxes, sumexps = logits_with_partials(h, w_pad[:v], bias, w_pad.shape[0])
    _persistent_rows(z, None, (maxes, sumexps), targets, losses, v, with_grad)
    return z


def _persistent_rows(z, bias, partials, targets, losses, v, with_grad) -> None:
    n = z.shape[0]
    if INTERPRET:
        programs = INTERPRET_PROGRAMS
    else:
        programs = torch.cuda.get_device_properties(z.device).multi_processor_count * PROGRAMS_PER_SM
    maxes, sumexps = partials if partials is not None else (losses, losses)
    tiles = maxes.shape[0] if partials is not None else 1
    _ce_rows_persistent_kernel[(min(n, programs),)](
        z, bias if bias is not None else z, maxes, sumexps, targets, losses, z.stride(0), n, v, z.shape[1],
        tiles, HAS_BIAS=bias is not None, FROM_PARTIALS=partials is not None, WRITE_GRAD=with_grad,
        BLOCK_V=PERSISTENT_BLOCK_V, BLOCK_T=triton.next_power_of_2(tiles), num_warps=PERSISTENT_NUM_WARPS,
    )  # fmt: skip


_SCHEDULES = {"rows": _rows, "persistent": _persistent, "epilogue": _epilogue}
SCHEDULES = tuple(_SCHEDULES)


@torch.library.custom_op("ablate::linear_cross_entropy", mutates_args=())
def _linear_ce_op(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    with_grad: bool,
    schedule: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed loss, and (when with_grad) its gradients w.r.t. h, weight and bias at scale 1."""
    n, c = h.shape
    v = weight.shape[0]
    w_pad = _padded_rows(weight, triton.cdiv(v, PAD) * PAD)  # padding rows are zero
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    z = _SCHEDULES[schedule](h, w_pad, bias, targets, losses, v, with_grad)  # (n, v_pad): G when with_grad
    empty = h.new_empty(0)
    if not with_grad:
        return losses.sum(), empty, empty.clone(), empty.clone()
    grad_h = z @ w_pad  # (n, c)
    if bias is None or not DB_IN_DW_MATMUL:
        grad_b = z[:, :v].sum(dim=0) if bias is not None else empty  # float32 sums, h's dtype out
        return losses.sum(), grad_h, (z.t() @ h)[:v].contiguous(), grad_b
    ones = torch.zeros(n, 8, dtype=h.dtype, device=h.device)  # 8 columns keep the matmul aligned
    ones[:, 0] = 1
    grad_wb = z.t() @ torch.cat((h, ones), dim=1)  # (v_pad, c + 8): [G^T h | G^T 1 | 0...]
    return losses.sum(), grad_h, grad_wb[:v, :c].contiguous(), grad_wb[:v, c].contiguous()


@_linear_ce_op.register_fake
def _linear_ce_fake(h, weight, bias, targets, with_grad, schedule):
    loss = h.new_empty((), dtype=torch.float32)
    if not with_grad:
        return loss, h.new_empty(0), h.new_empty(0), h.new_empty(0)
    grad_b = torch.empty_like(bias) if bias is not None else h.new_empty(0)
    return loss, torch.empty_like(h), torch.empty_like(weight), grad_b


def _setup_context(ctx, inputs, output) -> None:
    _h, _weight, bias, _targets, with_grad, _schedule = inputs
    _, grad_h, grad_w, grad_b = output
    ctx.with_grad, ctx.has_bias = with_grad, bias is not None
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)


def _backward(ctx, grad_loss, *_unused):
    if not ctx.with_grad:
        raise RuntimeError("linear_cross_entropy ran without gradients (with_grad=False); cannot backward")
    grad_h, grad_w, grad_b = ctx.saved_tensors
    scale = grad_loss.float()
    dh, dw = ((g.float() * scale).to(g.dtype) for g in (grad_h, grad_w))
    db = (grad_b.float() * scale).to(grad_b.dtype) if ctx.has_bias else None
    return dh, dw, db, None, None, None


_linear_ce_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Why the kernel cannot run these inputs, or None when it can."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        return f"need h (N, C) and weight (V, C); got {tuple(h.shape)} and {tuple(weight.shape)}"
    if targets.shape != h.shape[:1]:
        return f"targets must have shape ({h.shape[0]},); got {tuple(targets.shape)}"
    if h.device.type != "cuda" and not INTERPRET:
        return f"needs a CUDA device (or TRITON_INTERPRET=1); got {h.device}"
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"h must be float16, bfloat16 or float32; got {h.dtype}"
    return None


def linear_cross_entropy_triton(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    schedule: str = "rows",
) -> torch.Tensor:
    """Mean cross-entropy of (h @ weight.T + bias) against targets; h: (N, C), weight: (V, C), targets: (N,).

    Every target must be in [0, V) (there is no ignore index); one outside it makes the loss NaN, which
    the training loop reports as divergence.

    The matmuls run in h's dtype (weight and bias are cast to it, so their gradients flow back through
    the cast), the softmax in float32. Gradients are computed in the forward when autograd needs them.
    `schedule` ("rows", "persistent" or "epilogue"; see the module docstring) changes only the speed.
    """
    if schedule not in SCHEDULES:
        raise ValueError(
            f"linear_cross_entropy_triton: schedule={schedule!r}; choose one of {list(SCHEDULES)}"
        )
    reason = unsupported_reason(h, weight, targets)
    if reason:
        raise ValueError(f"linear_cross_entropy_triton: {reason}")
    w = weight.to(h.dtype)
    b = bias.to(h.dtype) if bias is not None else None
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    loss, *_ = _linear_ce_op(h.contiguous(), w.contiguous(), b, targets.contiguous(), with_grad, schedule)
    return loss / h.shape[0]
