"""Correctness and forward speed of the Gluon forward (gluon_attn.py) on an sm90 GPU.

    python -m kernels.bench_gluon check   # every config against float64 math, N 257 and 2048, D 64/128
    python -m kernels.bench_gluon bench   # causal forward ms: SDPA-cuDNN, triton-tma, Gluon (bf16)

The bench's shapes are kernels.bench's (H = 16, B*N = 65,536 tokens, a = 2/sqrt(D), b = 1/sqrt(D)),
timed with triton.testing.do_bench in one process; TFLOP/s counts a causal forward as 2*B*H*N^2*D.
"""

from __future__ import annotations

import itertools
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from kernels import gluon_attn, reference
from kernels import triton_attn_tma as tma


def check() -> bool:
    ok = True
    torch.manual_seed(0)
    for n, d, dtype, causal in itertools.product(
        (257, 2048), (64, 128), (torch.bfloat16, torch.float16), (True, False)
    ):
        batch, heads = 2, 3
        q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=dtype) for _ in range(3))
        a = torch.rand(heads, device="cuda") * 0.2 + 0.05
        b = torch.rand(heads, device="cuda") * 0.1
        want = reference.attention_reference(*(t.double() for t in (q, k, v, a, b)), causal=causal)
        scores = a.view(1, -1, 1, 1) * q.double() @ k.double().transpose(-1, -2)
        scores = scores - b.view(1, -1, 1, 1) * (k.double() ** 2).sum(-1)[:, :, None, :]
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, device="cuda", dtype=torch.bool).triu(1), -math.inf)
        want_lse = torch.logsumexp(scores, -1) * gluon_attn.LOG2E
        every = n == 2048 and dtype == torch.bfloat16 and causal
        for config in gluon_attn.CONFIGS[d] if every else gluon_attn.CONFIGS[d][:1]:
            o, lse = gluon_attn.forward(q, k, v, a, b, causal, config)
            err = ((o.double() - want).abs().max() / want.abs().max()).item()
            lse_err = (lse.double() - want_lse).abs().max().item()
            good = err < 1e-2 and lse_err < 1e-3 and bool(torch.isfinite(o).all())
            ok &= good
            print(f"N {n} D {d} {str(dtype)[6:]} causal {causal} {config}: max rel err {err:.2e}, "
                  f"lse err {lse_err:.2e} {'ok' if good else 'FAIL'}", flush=True)  # fmt: skip
    return ok


def _bench_shape(dtype: torch.dtype, n: int, d: int, heads: int = 16) -> str:
    batch = 65536 // n
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=dtype) for _ in range(3))
    gamma = 1 / math.sqrt(d)
    a = torch.full((heads,), 2 * gamma, device="cuda")
    b = torch.full((heads,), gamma, device="cuda")

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    t_cudnn = do_bench(cudnn)
    t_tma = do_bench(lambda: tma._fwd_op(q, k, v, a, b, True))
    t_gluon = {
        c: do_bench(lambda c=c: gluon_attn.forward(q, k, v, a, b, True, c)) for c in gluon_attn.CONFIGS[d][:2]
    }
    best = min(t_gluon.values())
    flops = 2 * batch * heads * n * n * d
    configs = ", ".join(f"{c}: {t:.3f}" for c, t in t_gluon.items())
    return (
        f"| {str(dtype)[6:]} | {n} | {d} | {t_cudnn:.3f} ({flops / t_cudnn / 1e9:.0f}) "
        f"| {t_tma:.3f} ({flops / t_tma / 1e9:.0f}) | {configs} | {best / t_cudnn:.2f} | {best / t_tma:.2f} |"
    )


def bench() -> None:
    print("| dtype | N | D | SDPA cuDNN ms (TFLOP/s) | triton-tma ms (TFLOP/s) | Gluon ms per config | "
          "Gluon best x cuDNN | Gluon best x triton-tma |", flush=True)  # fmt: skip
    for dtype in (torch.bfloat16, torch.float16):
        for n, d in ((4096, 64), (16384, 64), (4096, 128), (16384, 128)):
            print(_bench_shape(dtype, n, d), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    if mode == "check":
        sys.exit(0 if check() else 1)
    bench()
