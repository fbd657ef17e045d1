"""Positional schemes applied to q and k after the head split: rope, susie, none.

Register positions (the first R of the sequence) are never rotated; under SuSiE they get a learned
per-(layer, head) vector instead of a sinusoid. Text positions count from 0 after the registers.
"""

from __future__ import annotations

import torch
from torch import nn


def _frequencies(n_pairs: int, dims: int, base: float) -> torch.Tensor:
    return base ** (-2.0 * torch.arange(n_pairs, dtype=torch.float64) / dims)  # omega_f = base^(-2f/m)


class RoPE(nn.Module):
    """Rotary embeddings: rotate dimension pairs (i, i + D/2) of text positions by t * omega_i."""

    def __init__(self, head_dim: int, context: int, n_registers: int, base: float = 10000.0):
        super().__init__()
        self.n_registers = n_registers
        angles = torch.arange(context, dtype=torch.float64)[:, None] * _frequencies(
            head_dim // 2, head_dim, base
        )
        self.register_buffer("cos", angles.cos(), persistent=False)  # (T, D/2)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, T, D) text positions only
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.n_registers
        if r == 0:
            return self._rotate(q), self._rotate(k)
        q = torch.cat((q[:, :, :r], self._rotate(q[:, :, r:])), dim=2)
        k = torch.cat((k[:, :, :r], self._rotate(k[:, :, r:])), dim=2)
        return q, k


class SuSiE(nn.Module):
    """Subspace sinusoidal embeddings: p_t = [w*sin(t*omega), w*cos(t*omega)] added to q and k.

    omega_f = base^(-2f/m) over m = `dims` head dimensions (the first m; the rest get nothing);
    w is learnable per (head, frequency), initialised to 0.5 and shared by the sine and cosine halves.
    """

    def __init__(
        self, n_heads: int, head_dim: int, dims: int, context: int, n_registers: int, base: float = 10000.0
    ):
        super().__init__()
        self.n_registers, self.dims, self.head_dim = n_registers, dims, head_dim
        angles = torch.arange(context, dtype=torch.float64)[:, None] * _frequencies(dims // 2, dims, base)
        self.register_buffer("sin", angles.sin(), persistent=False)  # (T, m/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.weight = nn.Parameter(torch.full((n_heads, dims // 2), 0.5))  # (H, m/2)
        self.register_pos = nn.Parameter(0.02 * torch.randn(n_heads, head_dim)) if n_registers else None

    def table(self, t: int) -> torch.Tensor:
        """The positional vectors of t text positions, (H, t, head_dim)."""
        w = self.weight[:, None, :]  # (H, 1, m/2)
        sin, cos = self.sin[:t].to(w.dtype), self.cos[:t].to(w.dtype)
        p = torch.cat((w * sin, w * cos), dim=-1)  # (H, t, m)
        return nn.functional.pad(p, (0, self.head_dim - self.dims))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.n_registers
        p = self.table(q.shape[2] - r)
        if r:
            reg = self.register_pos[:, None, :].expand(-1, r, -1)  # (H, R, D)
            p = torch.cat((reg, p), dim=1)
        p = p.to(q.dtype)
        return q + p, k + p


def make_position(cfg) -> nn.Module | None:
    """The positional module for a GPTConfig, or None for `none`."""
    if cfg.position == "rope":
        return RoPE(cfg.head_dim, cfg.context, cfg.registers, cfg.rope_base)
    if cfg.position == "susie":
        dims = cfg.susie_dims or cfg.head_dim
        return SuSiE(cfg.n_heads, cfg.head_dim, dims, cfg.context, cfg.registers, cfg.rope_base)
    return None
