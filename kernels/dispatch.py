"""Backend registry and selection for `kernels.attention`.

Backends are plain functions keyed by name, each with a predicate that says why it cannot run given
inputs. "auto" picks, on CUDA, the backend that the benchmark measured fastest for the nearest
(dtype, head dim, length, causal) in autotune_table.json (`python -m kernels.bench --write-table`
regenerates it), then the row's other backends by speed, then the default order; it passes over flex
when a or b is learned (its backward is slow then). On CPU it picks the reference. Every choice is
logged once per shape key; a fast backend that fails at run time falls back to the reference with a
loud warning. "triton-tma" (the Hopper TMA kernels, sm90+ only) and "gluon" (the ping-pong kernels, sm90
only, bf16/fp16, D 64 or 128) are not in the default order: "auto" takes them only where a table row
measured them (and skips them, by their predicates, elsewhere).

b=None means no key-norm term (the sdpa metric): on CUDA, "auto" and "sdpa" then run torch's fused
scaled_dot_product_attention (cuDNN, flash or memory-efficient; q scaled by a per head) with no device
sync; elsewhere b becomes zeros. "auto" never picks SDPA for a b tensor, since knowing that b == 0 would
need a sync on every call; backend="sdpa" with a b tensor checks b == 0 (a sync) and raises otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kernels.flex import flex_attention_rbf, prepare_causal_mask
from kernels.reference import attention_reference, check_shapes
from kernels.sdpa_aug import let_compile_caches_keep_sdpa_kernel, sdpa_attention, sdpa_aug_attention

try:  # triton is a Linux-only dependency
    from kernels.gluon_attn import gluon_attention
    from kernels.gluon_attn import unsupported_reason as gluon_unsupported_reason
    from kernels.triton_attn import INTERPRET, triton_attention, unsupported_reason
    from kernels.triton_attn_tma import triton_tma_attention
    from kernels.triton_attn_tma import unsupported_reason as tma_unsupported_reason

    _TRITON_ERROR = None
except ImportError as err:  # pragma: no cover - depends on the platform
    INTERPRET, _TRITON_ERROR = False, f"triton is not importable ({err})"

log = logging.getLogger("kernels")

AttentionFn = Callable[..., torch.Tensor]
TABLE_PATH = Path(__file__).with_name("autotune_table.json")
DEFAULT_ORDER = ("triton", "sdpa-aug", "flex", "reference")  # when the table has nothing better


def _reference(q, k, v, a, b, *, causal):
    return attention_reference(q, k, v, a, b, causal=causal)


BACKENDS: dict[str, AttentionFn] = {
    "reference": _reference,
    "triton": (lambda q, k, v, a, b, *, causal: triton_attention(q, k, v, a, b, causal=causal)),
    "triton-tma": (lambda q, k, v, a, b, *, causal: triton_tma_attention(q, k, v, a, b, causal=causal)),
    "gluon": (lambda q, k, v, a, b, *, causal: gluon_attention(q, k, v, a, b, causal=causal)),
    "flex": flex_attention_rbf,
    "sdpa-aug": sdpa_aug_attention,
    "sdpa": sdpa_attention,
}


def _triton_reason(q, k, v, a, b) -> str | None:
    return _TRITON_ERROR or unsupported_reason(q, k, v, a, b)


def _triton_tma_reason(q, k, v, a, b) -> str | None:
    return _TRITON_ERROR or tma_unsupported_reason(q, k, v, a, b)


def _gluon_reason(q, k, v, a, b) -> str | None:
    return _TRITON_ERROR or gluon_unsupported_reason(q, k, v, a, b)


def _flex_reason(q, k, v, a, b) -> str | None:
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, a, b))
    if q.device.type == "cpu" and wants_grad:
        return "FlexAttention has no backward on CPU"
    return None


UNSUPPORTED: dict[str, Callable[..., str | None]] = {
    "reference": lambda *inputs: None,
    "triton": _triton_reason,
    "triton-tma": _triton_tma_reason,
    "gluon": _gluon_reason,
    "flex": _flex_reason,
    "sdpa-aug": lambda *inputs: None,
    "sdpa": lambda *inputs: None,
}


def load_table(path: Path = TABLE_PATH) -> list[dict]:
    """Measured rows {dtype, head_dim, n_ctx, causal, backend, ...}; empty when there is no table."""
    if not path.exists():
        return []
    return json.loads(path.read_text())["rows"]


_TABLE = load_table()
_LOGGED: set[tuple] = set()


def _nearest_row(q: torch.Tensor, causal: bool) -> dict | None:
    dtype = str(q.dtype).removeprefix("torch.")
    rows = [r for r in _TABLE if r["dtype"] == dtype and r["causal"] == causal]
    if not rows:
        return None
    d, n = q.shape[-1], q.shape[-2]
    return min(
        rows, key=lambda r: (abs(math.log2(r["head_dim"] / d)), abs(math.log2(r["n_ctx"] / max(n, 1))))
    )


def _measured_order(row: dict | None) -> list[str]:
    """The row's backends, fastest first (its pick, then by ms or tokens/s), then the default order."""
    if row is None:
        return list(DEFAULT_ORDER)
    if "ms" in row:
        ranked = sorted(row["ms"], key=row["ms"].get)
    else:
        ranked = sorted(row.get("tokens_per_s", {}), key=lambda name: -row["tokens_per_s"][name])
    return list(dict.fromkeys([row["backend"], *ranked, *DEFAULT_ORDER]))


def _slow_with_learned_scalars(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """FlexAttention's backward accumulates the gradient of a tensor its score_mod captures (the per-head
    scale and the key bias) with atomics: with learnable a or b it ran at 165k tokens/s against 845k for
    the same cell with constant gamma (eager seed-size model, NVIDIA H200). `auto` passes it over then."""
    learned = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return name == "flex" and learned


def _candidates(q, k, v, a, b, causal: bool) -> Iterator[str]:
    """The backends `auto` may use for these inputs, best first (checked lazily: it takes the first)."""
    for name in _measured_order(_nearest_row(q, causal)):
        if UNSUPPORTED[name](q, k, v, a, b) is None and not _slow_with_learned_scalars(name, a, b):
            yield name


def _choose_backend(q, k, v, a, b, causal: bool) -> str:
    if not q.is_cuda:
        return "reference"
    return next(_candidates(q, k, v, a, b, causal), "reference")


def _log_choice(name: str, q: torch.Tensor, causal: bool, requested: str) -> None:
    key = (name, requested, q.device.type, q.dtype, tuple(q.shape), causal)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("attention backend %r (asked %r) for %s %s %s causal=%s", name, requested, *key[2:])


def prepare(n: int, device: torch.device) -> None:
    """Build, outside any torch.compile trace, what the backends keep per sequence length (flex's causal
    block mask), so that a compiled model finds it ready instead of tracing its construction. The model
    calls it before it is compiled (GPT.prepare_kernels). It also lets torch's compile caches keep the
    graphs that choose SDPA backends (`let_compile_caches_keep_sdpa_kernel`)."""
    prepare_causal_mask(n, device)
    let_compile_caches_keep_sdpa_kernel()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    *,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(a * q.k - b * ||k||^2) v per head.

    q, k, v: (B, H, N, D); a, b: (H,) tensors (they may require grad); b=None means no key-norm term.
    backend: "auto" or one of BACKENDS. Returns (B, H, N, D) in v's dtype.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {['auto', *BACKENDS]}")
    if b is None and not (q.is_cuda and backend in ("auto", "sdpa")):
        b = torch.zeros_like(a)  # no key-norm term: every backend computes it with b = 0
    check_shapes(q, k, v, a, a if b is None else b)
    if b is None:
        name = "sdpa"  # plain dot product on torch's fused SDPA
    else:
        name = _choose_backend(q, k, v, a, b, causal) if backend == "auto" else backend
    reason = UNSUPPORTED[name](q, k, v, a, b)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run these inputs: {reason}")
    if torch.compiler.is_compiling() or name == "reference":
        return BACKENDS[name](q, k, v, a, b, causal=causal)
    _log_choice(name, q, causal, backend)
    try:
        return BACKENDS[name](q, k, v, a, b, causal=causal)
    except ValueError:
        raise
    except Exception as err:  # a compile or launch failure of a fast path: say so, then stay correct
        warnings.warn(
            f"attention backend {name!r} FAILED ({type(err).__name__}: {err}); falling back to the "
            "reference, which is slow and materialises the (N, N) scores",
            RuntimeWarning,
            stacklevel=2,
        )
        return attention_reference(q, k, v, a, torch.zeros_like(a) if b is None else b, causal=causal)
