"""Cross-entropy over the LM head without materialising all (tokens x vocab) logits.

The forward pass walks the tokens in chunks: logits of one chunk, their log-sum-exp in fp32, the
loss, and right away the chunk's gradient (softmax - onehot) pushed through the head. Only the
gradients of h, W and b are kept for the backward pass, never the logits. Same value as
F.cross_entropy(h @ W.T + b, targets); the head's matmuls are done once, as in the plain version.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F


def _chunk_loss_and_grads(hc, w, b, tc, acc: torch.dtype):
    """Sum of losses of one chunk and its gradients w.r.t. hc, w and b (softmax minus one-hot)."""
    logits = F.linear(hc, w, b).to(acc)  # (n_c, V)
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
    grad = torch.exp(logits - lse[:, None])
    grad = grad.scatter_add(1, tc[:, None], -torch.ones_like(lse)[:, None]).to(hc.dtype)
    grad_b = grad.to(acc).sum(0) if b is not None else None
    return loss, grad @ w, (grad.t() @ hc).to(acc), grad_b


@functools.cache
def _compiled_chunk():
    """On CUDA the chunk's softmax, gather and casts fuse into a few kernels around the two matmuls
    (compiled on first use, so importing the model stays cheap)."""
    return torch.compile(_chunk_loss_and_grads, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size: int):
        # h: (N, C) in the compute dtype; weight: (V, C); bias: (V,) or None; targets: (N,)
        n = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 math, or fp64 for fp64 inputs
        chunk_fn = _compiled_chunk() if h.is_cuda else _chunk_loss_and_grads
        w = weight.to(h.dtype)
        b = bias.to(h.dtype) if bias is not None else None
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=acc)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if bias is not None else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            loss, gh, gw, gb = chunk_fn(h[rows], w, b, targets[rows], acc)
            total += loss
            grad_h[rows] = gh
            grad_w += gw
            if grad_b is not None:
                grad_b += gb
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
        ctx.has_bias, ctx.n, ctx.weight_dtype = bias is not None, n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n
        dh = grad_h * scale.to(grad_h.dtype)
        dw = (grad_w * scale).to(ctx.weight_dtype)
        db = (grad_b * scale).to(ctx.weight_dtype) if ctx.has_bias else None
        return dh, dw, db, None, None


@torch.compiler.disable
def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean cross-entropy of (h @ weight.T + bias) against targets, chunked and fused with its gradient.

    h: (N, C); targets: (N,). Under autocast the head runs in the autocast dtype, the softmax in fp32.
    """
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk_size)
