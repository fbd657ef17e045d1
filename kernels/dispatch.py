"""Backend registry and selection for `kernels.attention`.

Backends are plain functions keyed by name. "auto" picks the fastest correct backend for the device
and shape; on CPU that is the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kernels.reference import attention_reference

log = logging.getLogger("kernels")

AttentionFn = Callable[..., torch.Tensor]


def _reference(q, k, v, a, b, *, causal):
    return attention_reference(q, k, v, a, b, causal=causal)


BACKENDS: dict[str, AttentionFn] = {"reference": _reference}


def _choose_backend(q: torch.Tensor) -> str:
    return "reference"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(a * q.k - b * ||k||^2) v per head.

    q, k, v: (B, H, N, D); a, b: (H,) tensors (they may require grad). backend: "auto" or one of
    BACKENDS. Returns (B, H, N, D) in v's dtype.
    """
    name = _choose_backend(q) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {['auto', *BACKENDS]}")
    return BACKENDS[name](q, k, v, a, b, causal=causal)
