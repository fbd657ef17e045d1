"""Augmented-head-dim backends on stock torch SDPA.

    q' = [a*q, 1, 1, 0...],  k' = [k, -hi, -lo, 0...],  v' = [v, 0...]      (head dim D' = roundup(D+2, 8))

so q'.k' = a*q.k - b*||k||^2 and stock dot-product SDPA (scale 1) computes the geometry. The bias
b*||k||^2 = hi + lo is split over two columns (hi its rounding to the input dtype, lo the remainder) so
that a 16-bit input loses no more of it than of the dot product. Gradients reach q, k, v, a and b
through the concatenation. `sdpa_attention` is plain dot-product SDPA for b == 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# tried in this order; the math backend (which materialises N x N) is never allowed here
AUG_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)

# Under torch.compile, dynamo records `sdpa_kernel` as calls of two private functions of
# torch.nn.attention whose arguments are the backends' names, constants in the graph and so in its cache
# key. AOTAutograd's cache refuses private functions it does not know, so without this every compiled
# step using these backends traced and partitioned its joint graph anew in every process (an H200, torch
# 2.11, warm caches: the sdpa cell's backend compile took 1.78 s, an rbf cell's cache load 0.24-0.71 s).
# kernels.prepare, which runs before a model is compiled, lifts that refusal.
SDPA_KERNEL_CALLS = ("torch.nn.attention._sdpa_kernel", "torch.nn.attention._backend_from_string")


def let_compile_caches_keep_sdpa_kernel() -> None:
    """Mark the calls `sdpa_kernel` leaves in a compiled graph cacheable, keyed by torch's version."""
    from torch._inductor import config

    marked = getattr(config, "unsafe_marked_cacheable_functions", None)
    if marked is not None:
        marked.update(dict.fromkeys(SDPA_KERNEL_CALLS, torch.__version__))


def _scaled(q, a):
    """a*q per head, multiplied in float32 and rounded once to q's dtype (a rounded to 16 bits first
    would scale every score of its head by the same error)."""
    return (q.float() * a.float().view(1, -1, 1, 1)).to(q.dtype)


def _augment(q, k, v, a, b):
    B, H, N, D = q.shape
    pad = -(-(D + 2) // 8) * 8 - D - 2  # zeros up to a multiple of 8 (what flash and cuDNN need)
    bias = b.float().view(1, H, 1, 1) * k.float().pow(2).sum(-1, keepdim=True)  # (B, H, N, 1)
    hi = bias.to(k.dtype)
    lo = (bias - hi.float()).to(k.dtype)
    ones = q.new_ones(B, H, N, 2)
    q_aug = torch.cat([_scaled(q, a), ones, q.new_zeros(B, H, N, pad)], -1)
    k_aug = torch.cat([k, -hi, -lo, k.new_zeros(B, H, N, pad)], -1)
    v_aug = F.pad(v, (0, pad + 2))
    return q_aug, k_aug, v_aug  # (B, H, N, D') each


def sdpa_aug_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    causal: bool = True,
    backends: Sequence[SDPBackend] = AUG_BACKENDS,
) -> torch.Tensor:
    """softmax(a*q.k - b*||k||^2) v via the augmented head dim on torch SDPA (backends in priority order)."""
    q_aug, k_aug, v_aug = _augment(q, k, v, a, b)
    with sdpa_kernel(list(backends), set_priority=True):
        out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, is_causal=causal, scale=1.0)
    return out[..., : q.shape[-1]]


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    *,
    causal: bool = True,
    backends: Sequence[SDPBackend] = AUG_BACKENDS,
) -> torch.Tensor:
    """Dot-product softmax(a*q.k) v on torch SDPA. b must be None or zero (checked: a device sync)."""
    if b is not None and bool(b.detach().ne(0).any()):
        raise ValueError("backend 'sdpa' computes a*q.k only and needs b == 0; use 'auto' or 'triton'")
    scaled_q = _scaled(q, a)
    with sdpa_kernel(list(backends), set_priority=True):
        return F.scaled_dot_product_attention(scaled_q, k, v, is_causal=causal, scale=1.0)
