"""Diagnostics of one attention layer: key norms, attention-sink mass, attention entropy."""

from __future__ import annotations

import torch


def summarize_layer(keys: torch.Tensor, probs: torch.Tensor, n_registers: int) -> dict[str, torch.Tensor]:
    """keys (B, H, R+T, D) as they enter the score; probs (B, H, R+T, R+T) causal attention.

    Key norms are over text keys. Sink mass is the share of text queries' attention that lands on the
    registers and on the first text token; entropy is the mean over text queries (nats). Each value is a
    float32 0-d tensor on the inputs' device (read by the caller, all at once).
    """
    r = n_registers
    norms = keys[:, :, r:].float().norm(dim=-1).flatten()
    text_probs = probs[:, :, r:].float()  # (B, H, T, R+T): rows of text queries
    entropy = -(text_probs * text_probs.clamp_min(1e-30).log()).sum(-1)
    out = {
        "key_norm_mean": norms.mean(),
        "key_norm_p99": torch.quantile(norms, 0.99),
        "key_norm_max_over_median": norms.max() / norms.median().clamp_min(1e-12),
        "sink_first_token": text_probs[..., r].mean(),
        "attn_entropy": entropy.mean(),
    }
    if r:
        out["sink_registers"] = text_probs[..., :r].sum(-1).mean()
    return out
