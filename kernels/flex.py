"""FlexAttention backend: softmax(a*q.k - b*||k||^2) v through torch's flex_attention.

The score_mod multiplies the raw dot product by a per head (flex's own scale is 1.0) and subtracts a
captured per-key bias b*||k||^2 of shape (B, H, N). Both captured tensors are built from a, b and k with
differentiable torch ops, so gradients reach q, k, v, a and b. Causality is a block mask (tiles above the
diagonal are skipped, not just masked).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# Each shape, grad mode and requires-grad pattern of the captured tensors is its own flex compile. A
# process that runs many trials (a Ray worker) meets more of them than dynamo's default recompile limit
# (8); past it, dynamo silently runs flex_attention unfused, several times slower (measured: README,
# Layout, measured numbers). Raised, never lowered, on the first fused call.
FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex():
    # flex_attention is only fused when compiled; eager runs the unfused math path
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


# Causal block masks by (positions, device), built eagerly and kept for the process. Under torch.compile
# dynamo takes a ready mask as it is; a mask built inside the trace costs dynamo a trace of
# create_block_mask's vmap over the mask function at every attention call (1.25 s of a 1.45 s trace of
# one call on CPU), and the compiled step then rebuilds the mask at every layer of every step. The model
# builds its mask before it is compiled (`prepare_causal_mask`, called by GPT.prepare_kernels).
_MASKS: dict[tuple[int, str, int | None], BlockMask] = {}


def causal_mask(n: int, device: torch.device) -> BlockMask:
    """The causal block mask of n positions on `device`: the process's kept one, else a new one (kept
    unless it was built inside a torch.compile trace, where it is a traced value)."""
    key = (n, device.type, device.index)
    mask = _MASKS.get(key)
    if mask is None:
        mask = create_block_mask(_causal, None, None, n, n, device=device)
        if not torch.compiler.is_compiling():
            _MASKS[key] = mask
    return mask


def prepare_causal_mask(n: int, device: torch.device | str) -> None:
    """Build and keep the causal block mask of n positions on `device`, outside any trace."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # as a tensor on it names it: cuda:0, not cuda
        device = torch.device("cuda", torch.cuda.current_device())
    causal_mask(n, device)


def flex_attention_rbf(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    causal: bool = True,
) -> torch.Tensor:
    """softmax(a*q.k - b*||k||^2) v via FlexAttention. q, k, v: (B, H, N, D); a, b: (H,)."""
    n_heads, n_ctx = q.shape[1], q.shape[2]
    scale = a.float()  # (H,)
    key_bias = b.float().view(1, n_heads, 1) * k.float().pow(2).sum(-1)  # (B, H, N)

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score * scale[head] - key_bias[batch, head, kv_idx]

    block_mask = causal_mask(n_ctx, q.device) if causal else None
    fused = q.is_cuda and not torch.compiler.is_compiling()
    attend = _compiled_flex() if fused else flex_attention
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
