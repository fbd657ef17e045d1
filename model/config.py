"""GPTConfig: every ablation axis of the model is one typed field whose default is the baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

METRICS = ("sdpa", "rbf", "penalty")
POSITIONS = ("rope", "susie", "none")
SCHEDULES = ("constant", "warmup", "cosine", "learnable")
LAM_SCHEDULES = ("tied", *SCHEDULES)
REGISTER_INITS = ("zero", "normal")
# the fused loss by name -> its schedule (kernels/linear_ce.py); "fused" is the one measured fastest so far
FUSED_LOSSES = {"fused": "rows", "fused-persistent": "persistent", "fused-epilogue": "epilogue"}
LOSSES = ("plain", *FUSED_LOSSES, "chunked")  # how GPT.forward computes the LM loss (see its docstring)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not a valid choice; choose one of {list(choices)}")


@dataclass(kw_only=True)
class GPTConfig:
    """A pre-LN decoder. `context` counts text tokens; register tokens are prepended on top of it."""

    vocab_size: int = 50257
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    context: int = 256
    mlp_ratio: int = 4
    bias: bool = True
    # attention geometry: sdpa gamma*q.k | rbf -gamma*||q-k||^2 | penalty gamma*q.k - lam*||k||^2
    metric: str = "sdpa"
    gamma: float | None = None  # None: gamma_scale / sqrt(head_dim)
    gamma_scale: float = 1.0  # multiplies the default gamma (2.0 = doubled dot-product temperature)
    gamma_schedule: str = "constant"
    gamma_warmup_steps: int = 1000  # warmup: linear ramp over this many steps
    gamma_start_frac: float = 0.1  # warmup and cosine start at this fraction of gamma0
    lam: float | None = None  # penalty only; None: gamma0 / 2 (the RBF geometry at SDPA temperature)
    lam_schedule: str = "tied"  # tied: lam(t) = lam0 * gamma(t) / gamma0; or its own schedule
    # positions and registers
    position: str = "rope"
    rope_base: float = 10000.0
    susie_dims: int | None = None  # None: the whole head dim (as in the reference implementation)
    registers: int = 0
    register_init: str = "zero"
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "context", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rope and susie pair dimensions)")
        _choice("metric", self.metric, METRICS)
        _choice("position", self.position, POSITIONS)
        _choice("gamma_schedule", self.gamma_schedule, SCHEDULES)
        _choice("lam_schedule", self.lam_schedule, LAM_SCHEDULES)
        _choice("register_init", self.register_init, REGISTER_INITS)
        if self.gamma is not None and self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}; leave it unset for 1/sqrt(head_dim)")
        if self.gamma_scale <= 0:
            raise ValueError(f"gamma_scale must be > 0, got {self.gamma_scale}")
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not 0 < self.gamma_start_frac <= 1:
            raise ValueError(f"gamma_start_frac must be in (0, 1], got {self.gamma_start_frac}")
        if self.gamma_warmup_steps < 0:
            raise ValueError(f"gamma_warmup_steps must be >= 0, got {self.gamma_warmup_steps}")
        if self.registers < 0:
            raise ValueError(f"registers must be >= 0 (0 = off), got {self.registers}")
        if self.susie_dims is not None and not (
            2 <= self.susie_dims <= self.head_dim and self.susie_dims % 2 == 0
        ):
            raise ValueError(
                f"susie_dims must be even and in [2, head_dim={self.head_dim}], got {self.susie_dims}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gamma0(self) -> float:
        """The base inverse temperature gamma."""
        return self.gamma if self.gamma is not None else self.gamma_scale / math.sqrt(self.head_dim)

    @property
    def lam0(self) -> float:
        """The base key-norm penalty weight lambda (used by the penalty metric)."""
        return self.lam if self.lam is not None else self.gamma0 / 2
