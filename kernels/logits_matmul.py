"""The LM head's logits Z = h W^T + b, with each tile's softmax partials computed in the matmul's epilogue.

For linear_ce.py's "epilogue" schedule: the row kernel then needs no first pass over Z. Per tile of
BLOCK_M rows x BLOCK_N vocab entries the epilogue rounds the float32 accumulator to Z's dtype, stores it,
and from the rounded values (the ones the row kernel will read back) stores per row

    max_t = max over the tile's valid columns of z,   sumexp_t = sum of exp(z - max_t)

into two (tiles, N) float32 buffers, tiles = cdiv(V, BLOCK_N). The row kernel combines them into the row's
log-sum-exp: lse = M + log(sum_t sumexp_t exp(max_t - M)), M = max_t max_t. Z's padding columns
(V to its row stride) are left unwritten; the row kernel writes zeros there. BLOCK_N is fixed per call (it
sets the partials' shape); the other tile sizes are autotuned on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_attn import AUTOTUNE, INTERPRET

BLOCK_N = 16 if INTERPRET else 128  # read at each call: `python -m kernels.bench_loss --logits-block-n`
GROUP_M = 2 if INTERPRET else 8  # row tiles that walk the vocab together, sharing W's tiles in L2


@triton.jit
def _logits_partials_kernel(
    h_ptr, w_ptr, bias_ptr,  # (N, D), (V, D), (V,) or a dummy
    z_ptr,  # (N, >= V) logits out
    max_ptr, sumexp_ptr,  # (cdiv(V, BLOCK_N), N) float32 partials out
    N, V, D, stride_h, stride_w, stride_z,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # grouped order: GROUP_M row tiles take the vocab tiles in turn, so W's tiles are reused from L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(N, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(V, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < N, cols < V

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = (ks < D)[None, :]
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :], row_ok[:, None] & k_ok, 0.0)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :], col_ok[:, None] & k_ok, 0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc.to(z_ptr.dtype.element_ty)
    z_out = z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
    tl.store(z_out, z, mask=row_ok[:, None] & col_ok[None, :])

    # every tile has a valid column (tile_n < cdiv(V, BLOCK_N)), so each row's max is finite
    zf = tl.where(col_ok[None, :], z.to(tl.float32), float("-inf"))
    m = tl.max(zf, axis=1)
    s = tl.sum(tl.exp(zf - m[:, None]), axis=1)
    tl.store(max_ptr + tile_n * N + rows, m, mask=row_ok)
    tl.store(sumexp_ptr + tile_n * N + rows, s, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# autotune configs: (BLOCK_M, BLOCK_K, warps, stages). Compiled for sm_90 with Triton 3.6 (bf16 and fp16
# inputs, BLOCK_N 128 and 256), these used at most 240 registers a thread and did not spill while the
# float32 accumulator took at most 128 of them; the prune keeps that and the shared-memory limit.

_GPU_SPECS = [
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 4),
    (128, 128, 8, 3),
    (64, 128, 4, 3),
]
_INTERPRET_SPECS = [(16, 16, 1, 1)]
_SMEM_LIMIT = 227 * 1024  # bytes per program on Hopper
_ACC_REGISTER_LIMIT = 128  # float32 accumulator values per thread


def _prune(configs, named_args, **kwargs):
    if INTERPRET:
        return configs[:1]
    block_n, elem = kwargs["BLOCK_N"], named_args["h_ptr"].element_size()

    def fits(c) -> bool:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (bm + block_n) * bk * elem
        return smem <= _SMEM_LIMIT and bm * block_n <= _ACC_REGISTER_LIMIT * 32 * c.num_warps

    kept = [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]
    return kept if AUTOTUNE else kept[:1]


_logits_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, k, w, s in (_INTERPRET_SPECS if INTERPRET else _GPU_SPECS)
    ],
    key=["N", "V", "D", "BLOCK_N"],
    prune_configs_by={"early_config_prune": _prune},
)(_logits_partials_kernel)


def logits_with_partials(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Z (N, width) in h's dtype with columns [0, V) written, and its (tiles, N) float32 max and sum of exp.

    h: (N, D), weight: (V, D) and bias: (V,) or None, all in h's dtype and contiguous; width >= V.
    """
    n, d = h.shape
    v = weight.shape[0]
    block_n = BLOCK_N
    tiles = triton.cdiv(v, block_n)
    z = torch.empty(n, width, dtype=h.dtype, device=h.device)
    maxes, sumexps = torch.empty(2, tiles, n, dtype=torch.float32, device=h.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * tiles,)

    _logits_tuned[grid](
        h, weight, bias if bias is not None else h, z, maxes, sumexps,
        n, v, d, h.stride(0), weight.stride(0), z.stride(0),
        HAS_BIAS=bias is not None, PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
        BLOCK_N=block_n, GROUP_M=GROUP_M,
    )  # fmt: skip
    return z, maxes, sumexps
