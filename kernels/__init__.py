"""Kernels for every ablate geometry: softmax(a*q.k - b*||k||^2) v with per-head a, b, and the LM loss.

`attention` is the one entry point the model calls; backends plug in behind it (see dispatch.py).
`linear_cross_entropy` is the LM head fused with its loss (linear_ce.py); `linear_cross_entropy_tiled`
is the same loss without the logits in memory (linear_ce_tiled.py).
"""

from kernels.dispatch import BACKENDS, attention, prepare
from kernels.reference import attention_reference

try:  # triton is a Linux-only dependency
    from kernels.linear_ce import linear_cross_entropy_triton as linear_cross_entropy
    from kernels.linear_ce_tiled import linear_cross_entropy_tiled
except ImportError as err:  # pragma: no cover - depends on the platform
    _reason = f"triton is not importable ({err})"

    def linear_cross_entropy(h, weight, bias, targets, *, schedule="rows"):
        raise ValueError(f"the fused loss needs Triton: {_reason}; use loss 'plain' or 'chunked'")

    def linear_cross_entropy_tiled(h, weight, bias, targets):
        raise ValueError(f"the tiled loss needs Triton: {_reason}; use loss 'plain' or 'chunked'")


__all__ = [
    "BACKENDS",
    "attention",
    "attention_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_tiled",
    "prepare",
]
