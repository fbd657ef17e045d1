"""Attention kernels for every ablate geometry: softmax(a*q.k - b*||k||^2) v with per-head a, b.

`attention` is the one entry point the model calls; backends plug in behind it (see dispatch.py).
"""

from kernels.dispatch import BACKENDS, attention
from kernels.reference import attention_reference

__all__ = ["BACKENDS", "attention", "attention_reference"]
