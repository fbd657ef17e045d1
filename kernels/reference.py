"""Reference attention: plain PyTorch, any device, the ground truth for every fused backend.

Every geometry in ablate reduces to one score with per-head scalars a and b:

    s_ij = a * q_i . k_j - b * ||k_j||^2          (sdpa: b = 0; rbf: a = 2*gamma, b = gamma)

The -gamma*||q_i||^2 term of the RBF score is constant along a softmax row and cancels.
"""

from __future__ import annotations

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    causal: bool = True,
    return_probs: bool = False,
):
    """softmax(a*q.k - b*||k||^2) v per head, materialising the (N, N) score matrix.

    q, k, v: (B, H, N, D); a, b: (H,). Math runs in float32, or float64 when the inputs are float64;
    the output has the dtype of v. Differentiable in all five inputs. With return_probs the attention
    probabilities (B, H, N, N) are returned as well (for diagnostics).
    """
    check_shapes(q, k, v, a, b)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    af = a.to(compute).view(1, -1, 1, 1)
    bf = b.to(compute).view(1, -1, 1, 1)
    key_norm2 = kf.pow(2).sum(-1)  # (B, H, N)
    scores = af * (qf @ kf.transpose(-2, -1)) - bf * key_norm2.unsqueeze(-2)  # (B, H, N, N)
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ vf).to(v.dtype)
    return (out, probs) if return_probs else out


def check_shapes(q, k, v, a, b) -> None:
    """ValueError, naming the shapes, unless q, k, v are (B, H, N, D) alike and a, b are (H,)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    n_heads = q.shape[1]
    if a.shape != (n_heads,) or b.shape != (n_heads,):
        raise ValueError(f"a and b must have shape ({n_heads},); got {tuple(a.shape)} and {tuple(b.shape)}")
