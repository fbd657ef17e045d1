"""Inverse-temperature schedules: gamma (and lambda) per layer and head, stepped by the training loop.

Scheduled values live in buffers that the loop updates in place (`set_step`), so a compiled model reads
new values without recompiling. `learnable` is a per-head parameter kept positive through exp().
"""

from __future__ import annotations

import math

import torch
from torch import nn


def scheduled_value(schedule: str, base: float, step: int, *, warmup_steps: int, start_frac: float) -> float:
    """The value of a non-learnable schedule at a step (a pure function of the step).

    constant: base. warmup: linear ramp from start_frac*base to base over warmup_steps.
    cosine: half-cosine ramp over the same span (smooth at both ends). learnable: its initial value.
    """
    if schedule in ("constant", "learnable") or warmup_steps == 0 or step >= warmup_steps:
        return base
    progress = max(step, 0) / warmup_steps
    if schedule == "warmup":
        shape = progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 - math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return base * (start_frac + (1.0 - start_frac) * shape)


class ScheduledScalar(nn.Module):
    """One scheduled (or learnable) positive scalar per head."""

    def __init__(self, schedule: str, base: float, n_heads: int, *, warmup_steps: int, start_frac: float):
        super().__init__()
        self.schedule, self.base = schedule, base
        self.warmup_steps, self.start_frac = warmup_steps, start_frac
        init = torch.full((n_heads,), float(base), dtype=torch.float64)  # exact under .double()
        if schedule == "learnable":
            self.log_value = nn.Parameter(init.log().float())
        else:
            self.register_buffer("value", init.clone(), persistent=False)
            self._current = base
            self.set_step(0)

    @property
    def learned(self) -> bool:
        return self.schedule == "learnable"

    def set_step(self, step: int) -> None:
        if self.schedule in ("constant", "learnable"):
            return  # nothing moves: no device work in the training step
        v = scheduled_value(
            self.schedule, self.base, step, warmup_steps=self.warmup_steps, start_frac=self.start_frac
        )
        if v != self._current:
            with torch.no_grad():
                self.value.fill_(v)
            self._current = v

    def forward(self) -> torch.Tensor:  # (H,)
        return self.log_value.exp() if self.schedule == "learnable" else self.value


class Temperature(nn.Module):
    """Turns (metric, gamma, lambda) into the per-head kernel scalars a, b of a*q.k - b*||k||^2."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.metric = cfg.metric
        sched = dict(warmup_steps=cfg.gamma_warmup_steps, start_frac=cfg.gamma_start_frac)
        self.gamma = ScheduledScalar(cfg.gamma_schedule, cfg.gamma0, cfg.n_heads, **sched)
        self.lam_ratio = cfg.lam0 / cfg.gamma0
        self.lam = None
        if cfg.metric == "penalty" and cfg.lam_schedule != "tied":
            self.lam = ScheduledScalar(cfg.lam_schedule, cfg.lam0, cfg.n_heads, **sched)

    def set_step(self, step: int) -> None:
        self.gamma.set_step(step)
        if self.lam is not None:
            self.lam.set_step(step)

    def learned(self) -> dict[str, bool]:
        """Whether gamma and lambda are learned (a lambda tied to gamma follows gamma)."""
        return {
            "gamma": self.gamma.learned,
            "lam": self.lam.learned if self.lam is not None else self.gamma.learned,
        }

    def lam_value(self) -> torch.Tensor:  # (H,)
        return self.lam() if self.lam is not None else self.lam_ratio * self.gamma()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head (a, b); b is None for sdpa (no key-norm term at all)."""
        gamma = self.gamma()
        if self.metric == "sdpa":
            return gamma, None
        if self.metric == "rbf":  # -gamma*||q-k||^2 = 2*gamma*q.k - gamma*||k||^2 (+ a per-row constant)
            return 2.0 * gamma, gamma
        return gamma, self.lam_value()  # penalty
