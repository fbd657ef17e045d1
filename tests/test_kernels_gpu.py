"""Attention kernels on a CUDA GPU: the CPU file's checks at real sizes, every dtype, and torch.compile.

Run with `pytest tests/test_kernels_gpu.py -m gpu` (skipped without CUDA). Every case draws fresh random
inputs and compares output and all five gradients with explicit float64 math (computed on the GPU).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from torch.nn.attention import SDPBackend

import kernels
from kernels.sdpa_aug import sdpa_aug_attention

try:
    from tests.test_kernels import TOL, check_backend, check_without_key_norm_term, make_inputs, poisoned
except ImportError:  # rootdir-less runs put tests/ itself on sys.path
    from test_kernels import TOL, check_backend, check_without_key_norm_term, make_inputs, poisoned  # noqa: F401

pytestmark = pytest.mark.gpu
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

TRITON_CASES = [  # (dtype, N, D, causal)
    (BF16, 1000, 64, True),
    (BF16, 1000, 128, False),
    (BF16, 17, 80, True),
    (BF16, 1, 16, True),
    (BF16, 333, 96, False),
    (BF16, 200, 256, True),
    (FP16, 1000, 64, True),
    (FP16, 1000, 80, False),
    (FP16, 513, 128, True),
    (FP32, 1000, 64, True),
    (FP32, 17, 16, False),
]


def _id(case):
    dtype, N, D, causal = case
    return f"{str(dtype)[6:]}-N{N}-D{D}-{'causal' if causal else 'full'}"


@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_triton(poisoned, case):
    dtype, N, D, causal = case
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype, "cuda")
    check_backend(kernels.BACKENDS["triton"], q, k, v, a, b, do, causal=causal)


@pytest.mark.parametrize(
    "case", [(BF16, 1000, 64, True), (FP16, 777, 128, False), (FP32, 17, 80, True)], ids=_id
)
def test_triton_other_key_norm_variant(poisoned, case):
    from kernels.triton_attn import PRE_NORM, _attention

    def other_variant(q, k, v, a, b, *, causal):
        return _attention(q, k, v, a, b, causal, pre_norm=not PRE_NORM)

    dtype, N, D, causal = case
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype, "cuda")
    check_backend(other_variant, q, k, v, a, b, do, causal=causal)


# ----------------------------------------------------------------------------------------------------
# triton-tma: the Hopper kernels (sm90+); elsewhere they must say why they cannot run

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs an sm90+ GPU"
)


def _tma(q, k, v, a, b, *, causal):
    from kernels.triton_attn_tma import _attention

    return _attention(q, k, v, a, b, causal)


@needs_hopper
@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_triton_tma(poisoned, case):
    dtype, N, D, causal = case
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype, "cuda")
    check_backend(_tma, q, k, v, a, b, do, causal=causal)


def _every_config(module: str, name: str):
    """(head dim, {kind: config}) from the per-kernel config lists `name` of kernels.<module>: the i-th
    config of each kernel's list at that head dim (the shorter lists wrap), so that every config is checked
    once."""
    try:
        tables = getattr(importlib.import_module(f"kernels.{module}"), name)
    except ImportError:  # no triton on this platform: nothing to check
        return
    for d in (64, 128):
        lists = {kind: tables[kind][d] for kind in tables if d in tables[kind]}
        for i in range(max(map(len, lists.values()))):
            yield pytest.param(
                d, {kind: specs[i % len(specs)] for kind, specs in lists.items()}, id=f"D{d}-{i}"
            )


@needs_hopper
@pytest.mark.parametrize(("D", "configs"), _every_config("triton_attn_tma", "_GPU_CONFIGS"))
def test_triton_tma_every_config(poisoned, monkeypatch, D, configs):
    from kernels import triton_attn_tma as tma

    for kind, spec in configs.items():
        monkeypatch.setitem(tma._GPU_CONFIGS[kind], D, [spec])
    for kernel in (tma._fwd_kernel, tma._dkdv_kernel, tma._dq_kernel):
        monkeypatch.setattr(kernel, "cache", {})  # forget earlier picks: each test runs its own config
    q, k, v, a, b, do = make_inputs(1, 2, 1008, D, BF16, "cuda")  # N % 16 == 0 as in the benchmark; tails
    check_backend(_tma, q, k, v, a, b, do, causal=True)
    picked = {name: kernel.best_config for name, kernel in (("fwd", tma._fwd_kernel), ("dq", tma._dq_kernel))}
    for kind, config in picked.items():
        assert (
            config.kwargs["BLOCK_M"],
            config.kwargs["BLOCK_N"],
            config.num_warps,
            config.num_stages,
        ) == configs[kind]


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("backend", ["triton-tma", "gluon"])
def test_fused_hopper_kernels_are_captured_by_cuda_graphs(backend, D, monkeypatch):
    # gluon's own forwards at this length too: the grid kernel at D 64 and the persistent one at D 128 (two
    # replays on new inputs)
    from kernels import gluon_attn

    monkeypatch.setattr(gluon_attn, "FWD_MIN_LEN", {})
    q, k, v, a, b, do = make_inputs(2, 3, 512, D, BF16, "cuda")
    if kernels.dispatch.UNSUPPORTED[backend](q, k, v, a, b):
        pytest.skip(kernels.dispatch.UNSUPPORTED[backend](q, k, v, a, b))
    inputs, attention = (q, k, v, a, b), kernels.BACKENDS[backend]

    def step():
        out = attention(*inputs, causal=True)
        return (out, *torch.autograd.grad(out, inputs, do))

    side = torch.cuda.Stream()  # warm up (compile, autotune) on a side stream, as torch's docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        before = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        with torch.no_grad():
            for t, new in zip(inputs, make_inputs(2, 3, 512, D, BF16, "cuda"), strict=False):
                t.copy_(new)
        graph.replay()
        expected = step()
        assert not torch.equal(before[0], expected[0])  # the replay saw new inputs
        for x, y in zip(captured, expected, strict=True):
            torch.testing.assert_close(x, y)
        before = expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_tma_reports_itself_unsupported_before_sm90():
    q, k, v, a, b, _ = make_inputs(1, 2, 64, 64, BF16, "cuda")
    reason = kernels.dispatch.UNSUPPORTED["triton-tma"](q, k, v, a, b)
    assert (reason is None) == (torch.cuda.get_device_capability()[0] >= 9), reason


# ----------------------------------------------------------------------------------------------------
# gluon: the ping-pong kernels (sm90 only, bf16/fp16, D 64 or 128)

needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm90 GPU"
)
GLUON_CASES = [
    (BF16, 1000, 64, True),
    (BF16, 1000, 128, False),
    (BF16, 17, 64, True),
    (BF16, 1, 128, True),
    (BF16, 2048, 128, True),
    (FP16, 1000, 64, False),
    (FP16, 513, 128, True),
]


@needs_sm90
@pytest.mark.parametrize("case", GLUON_CASES, ids=_id)
def test_gluon(poisoned, case):
    dtype, N, D, causal = case
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype, "cuda")
    check_backend(kernels.BACKENDS["gluon"], q, k, v, a, b, do, causal=causal)


@needs_sm90
@pytest.mark.parametrize(("D", "configs"), _every_config("gluon_attn", "CONFIGS"))
def test_gluon_every_config(poisoned, monkeypatch, D, configs):
    from kernels import gluon_attn

    for kind, spec in configs.items():
        monkeypatch.setitem(gluon_attn.CONFIGS[kind], D, [spec])
    monkeypatch.setattr(gluon_attn, "FWD_MIN_LEN", {})  # the Gluon forward at N 1000 too
    q, k, v, a, b, do = make_inputs(1, 2, 1000, D, BF16, "cuda")
    check_backend(kernels.BACKENDS["gluon"], q, k, v, a, b, do, causal=True)


@needs_sm90
@pytest.mark.parametrize("N", [1, 100, 193, 1000])
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_counts_rows_from_the_last(poisoned, monkeypatch, D, N):
    # a Gluon forward work item takes CONSUMERS * 64 query rows counted back from row N (_fwd_work), so that
    # where N is not a multiple the first program's rows start below 0: those exist only in its registers,
    # and one stored would land in the previous (batch, head)'s last rows (three heads here, causal or not)
    from kernels import gluon_attn

    monkeypatch.setattr(gluon_attn, "FWD_MIN_LEN", {})
    for causal in (True, False):
        q, k, v, a, b, do = make_inputs(2, 3, N, D, BF16, "cuda")
        check_backend(kernels.BACKENDS["gluon"], q, k, v, a, b, do, causal=causal)


@needs_sm90
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_persistent_forward_runs_every_work_item_once(poisoned, monkeypatch, D):
    # the persistent forward's static schedule (_fwd_item): program p takes pairs p, p + programs, ..., a
    # head's pair j being its blocks j and n_blocks - 1 - j, the middle block alone where n_blocks is odd.
    # Whatever the programs and blocks (1, even, odd; fewer pairs than programs and many more), its o and
    # log-sum-exp equal the grid kernel's bitwise: an item skipped would leave poisoned rows, one run twice
    # or in another item's place would differ
    from kernels import gluon_attn

    grid_config = next(c for c in gluon_attn.CONFIGS["fwd"][D] if not c[7])
    persistent = (*grid_config[:7], True)
    for (B, H, N), programs in [((1, 1, 100), 132), ((2, 3, 1000), 132), ((2, 3, 1300), 1), ((2, 3, 1300), 5),
                                ((4, 16, 1300), 132)]:  # fmt: skip
        monkeypatch.setattr(gluon_attn, "_programs", lambda device, p=programs: p)
        for causal in (True, False):
            q, k, v, a, b, _ = make_inputs(B, H, N, D, BF16, "cuda", grad=False)
            want = gluon_attn.forward(q, k, v, a, b, causal, grid_config)
            got = gluon_attn.forward(q, k, v, a, b, causal, persistent)
            assert all(map(torch.equal, got, want)), (B, H, N, programs, causal)


@needs_sm90
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_starts_at_fwd_min_len(monkeypatch, D):
    # below FWD_MIN_LEN keys the backend's forward is triton-tma's, from there the Gluon one
    from kernels import gluon_attn, triton_attn_tma

    monkeypatch.setattr(gluon_attn, "FWD_MIN_LEN", {D: 512})
    for n, runs in ((511, triton_attn_tma._fwd_op), (512, gluon_attn.forward)):
        q, k, v, a, b, _ = make_inputs(1, 2, n, D, BF16, "cuda", grad=False)
        got = gluon_attn._fwd_op(q, k, v, a, b, True)  # o, lse and the key norms
        want = runs(q, k, v, a, b, True)
        assert len(got) == 3 and all(map(torch.equal, got, want)), n


@needs_sm90
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_key_bias_in_the_matmul_for_every_sign_of_a(poisoned, monkeypatch, D, dtype):
    # every head gets c = -(b / |a|) ||k||^2 (-b ||k||^2 where a = 0) added to sign(a) q.k by the score
    # matmul (_key_bias; a < 0 negates the q tile in shared memory, a = 0 zeroes it), a small a included:
    # each head's output and gradients against float64
    from kernels import gluon_attn

    monkeypatch.setattr(gluon_attn, "FWD_MIN_LEN", {})
    q, k, v, a, b, do = make_inputs(1, 4, 1000, D, dtype, "cuda")
    with torch.no_grad():
        a.copy_(torch.tensor([0.25, -0.1, 0.0, 1e-3]))
        b.copy_(torch.tensor([0.05, 0.07, 0.1, 0.08]))
    for head in range(4):
        one = [t[:, head : head + 1].detach().requires_grad_() for t in (q, k, v)]
        ab = [t[head : head + 1].detach().requires_grad_() for t in (a, b)]
        check_backend(kernels.BACKENDS["gluon"], *one, *ab, do[:, head : head + 1], causal=True)
    check_backend(kernels.BACKENDS["gluon"], q, k, v, a, b, do, causal=True)


@needs_sm90
def test_gluon_backward_runs_over_a_few_rows_at_a_time(poisoned, monkeypatch):
    # with a small ACC_BYTES the backward covers 2 x 3 (batch, head) rows in launches of 4 and 2 rows on two
    # streams, each accumulating dq of its own rows (at D 64 the persistent kernel, each launch with a work
    # counter of its own)
    from kernels import gluon_attn

    monkeypatch.setattr(gluon_attn, "ACC_STREAMS", 2)
    # N 1000 (16 query tiles), D 64: 4 rows a stream
    monkeypatch.setattr(gluon_attn, "ACC_BYTES", 2 * 4 * gluon_attn.fragment_rows(1000, 64) * 256 * 4)
    starts = []
    compiled = gluon_attn._compiled

    def spy(kernel, args, meta, grid):  # records each launch's first row, bh0, the last of its args
        run = compiled(kernel, args, meta, grid)

        def recorded(grid, args, stream):
            if kernel in (gluon_attn._attn_bwd, gluon_attn._attn_bwd_p):  # persistent at D 64
                starts.append(args[-1])
            run(grid, args, stream)

        return recorded

    monkeypatch.setattr(gluon_attn, "_compiled", spy)
    q, k, v, a, b, do = make_inputs(2, 3, 1000, 64, BF16, "cuda")
    check_backend(kernels.BACKENDS["gluon"], q, k, v, a, b, do, causal=True)
    assert starts == [0, 4]


@needs_sm90
def test_gluon_reads_a_qkv_projection_in_place():
    from kernels.triton_attn_tma import _tma_ready

    B, H, N, D = 2, 3, 300, 128
    q, k, v, a, b, do = make_inputs(B, H, N, D, BF16, "cuda", grad=False)
    packed = torch.stack([q, k, v], 0).permute(0, 1, 3, 2, 4).contiguous()  # (3, B, N, H, D) like a qkv proj
    views = [t.transpose(1, 2).requires_grad_() for t in packed.unbind(0)]  # (B, H, N, D), not contiguous
    assert all(_tma_ready(t) is t for t in views)  # descriptors over the views' own strides
    check_backend(kernels.BACKENDS["gluon"], *views, a.requires_grad_(), b.requires_grad_(), do, causal=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gluon_reports_itself_unsupported_off_sm90_and_outside_its_shapes():
    q, k, v, a, b, _ = make_inputs(1, 2, 64, 64, BF16, "cuda")
    reason = kernels.dispatch.UNSUPPORTED["gluon"](q, k, v, a, b)
    assert (reason is None) == (torch.cuda.get_device_capability() == (9, 0)), reason
    q, k, v, a, b, _ = make_inputs(1, 2, 64, 80, BF16, "cuda")
    assert "head dim" in kernels.dispatch.UNSUPPORTED["gluon"](q, k, v, a, b)
    q, k, v, a, b, _ = make_inputs(1, 2, 64, 64, FP32, "cuda")
    assert "bfloat16 or float16" in kernels.dispatch.UNSUPPORTED["gluon"](q, k, v, a, b)


@pytest.mark.parametrize(
    "case", [(BF16, 1000, 64, True), (FP16, 1000, 128, False), (BF16, 300, 80, True)], ids=_id
)
def test_flex(case):
    dtype, N, D, causal = case
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype, "cuda")
    check_backend(kernels.BACKENDS["flex"], q, k, v, a, b, do, causal=causal)


@pytest.mark.parametrize("backends", [None, [SDPBackend.FLASH_ATTENTION]], ids=["priority", "flash"])
@pytest.mark.parametrize(
    "case", [(BF16, 1000, 64, True), (FP16, 1000, 128, False), (BF16, 17, 80, True)], ids=_id
)
def test_sdpa_aug(case, backends):
    dtype, N, D, causal = case
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype, "cuda")
    fn = kernels.BACKENDS["sdpa-aug"]
    if backends is not None:
        fn = lambda *t, causal: sdpa_aug_attention(*t, causal=causal, backends=backends)  # noqa: E731
    check_backend(fn, q, k, v, a, b, do, causal=causal)


def test_auto_picks_a_fused_backend_and_is_correct():
    q, k, v, a, b, do = make_inputs(2, 3, 1000, 64, BF16, "cuda")
    name = kernels.dispatch._choose_backend(q, k, v, a, b, True)
    assert name in ("triton", "triton-tma", "flex", "sdpa-aug")
    check_backend(kernels.attention, q, k, v, a, b, do, causal=True)


def test_auto_passes_over_flex_for_learned_scalars(monkeypatch):
    row = {"dtype": "bfloat16", "head_dim": 64, "n_ctx": 256, "causal": True, "backend": "flex",
           "tokens_per_s": {"flex": 2.0, "sdpa-aug": 1.9, "triton": 1.0}}  # fmt: skip
    monkeypatch.setattr(kernels.dispatch, "_TABLE", [row])
    q, k, v, a, b, do = make_inputs(2, 4, 256, 64, BF16, "cuda")
    assert a.requires_grad and b.requires_grad
    assert kernels.dispatch._choose_backend(q, k, v, a.detach(), b.detach(), True) == "flex"
    assert kernels.dispatch._choose_backend(q, k, v, a, b, True) == "sdpa-aug"
    check_backend(kernels.attention, q, k, v, a, b, do, causal=True)


@pytest.mark.parametrize("case", [(BF16, 1000, 64, True), (FP16, 333, 128, False)], ids=_id)
def test_b_none_goes_to_torch_sdpa(case, caplog):
    dtype, N, D, causal = case
    q, k, v, a, _, do = make_inputs(2, 3, N, D, dtype, "cuda")
    kernels.dispatch._LOGGED.clear()
    with caplog.at_level("INFO", logger="kernels"):
        check_without_key_norm_term("auto", q, k, v, a, do, causal=causal)
    assert any("'sdpa'" in r.getMessage() for r in caplog.records)


def test_flex_stays_fused_past_dynamos_default_recompile_limit(caplog):
    # a Ray worker runs many cells: each (shape, grad mode) is a flex compile; the ninth must not fall
    # back to the unfused path (dynamo says so with a warning naming the limit)
    from kernels.flex import flex_attention_rbf

    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(caplog.handler)
    try:
        with torch.no_grad():
            for n in range(250, 262):
                q, k, v, a, b, do = make_inputs(1, 2, n, 64, BF16, "cuda", grad=False)
                flex_attention_rbf(q, k, v, a, b, causal=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    check_backend(kernels.BACKENDS["flex"], q, k, v, a, b, do, causal=True, grads=False)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["triton", "triton-tma", "gluon", "auto", "auto-b-none"])
def test_torch_compile_has_no_graph_breaks(backend, compiler):
    q, k, v, a, b, _ = make_inputs(2, 4, 256, 64, BF16, "cuda")
    if backend in kernels.BACKENDS and (reason := kernels.dispatch.UNSUPPORTED[backend](q, k, v, a, b)):
        pytest.skip(reason)  # triton-tma needs an sm90+ GPU, gluon an sm90
    if backend == "auto-b-none":
        backend, b = "auto", None
        a = a.detach().requires_grad_()  # the grads below then cover q, k, v, a

    def loss(q, k, v, a, b):
        return kernels.attention(q, k, v, a, b, causal=True, backend=backend).float().square().sum()

    assert torch._dynamo.explain(loss)(q, k, v, a, b).graph_break_count == 0
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    wrt = tuple(t for t in (q, k, v, a, b) if t is not None)
    got = torch.autograd.grad(compiled(q, k, v, a, b), wrt)
    eager = torch.autograd.grad(loss(q, k, v, a, b), wrt)
    for x, y in zip(got, eager, strict=True):
        assert ((x.double() - y.double()).norm() / y.double().norm()).item() < TOL[BF16]


_AUTOTUNE_ONCE = """
import json, torch
from kernels.{module} import _dkdv_kernel, _dq_kernel, _fwd_kernel, {function}
q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
a, b = torch.ones(4, device="cuda"), torch.full((4,), 0.5, device="cuda")
{function}(q, k, v, a, b, causal=True).sum().backward()
torch.cuda.synchronize()
print(json.dumps([hasattr(kernel, "bench_time") for kernel in (_fwd_kernel, _dkdv_kernel, _dq_kernel)]))
"""


@pytest.mark.parametrize(
    ("module", "function"), [("triton_attn", "triton_attention"), ("triton_attn_tma", "triton_tma_attention")]
)
def test_a_new_process_reads_the_autotuning_a_study_cached(tmp_path, module, function):
    """With the caches a study shares (`ablate.caches`), the first process times the Triton kernel's
    configs and the next reads the choice from disk (it times none). The TMA kernels' configs carry a
    pre-launch hook, which Triton's cache alone would skip (`triton_attn_tma._Autotuner`)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "TRITON_CACHE_AUTOTUNING": "1"}

    def run() -> list[bool]:
        done = subprocess.run(
            [sys.executable, "-c", _AUTOTUNE_ONCE.format(module=module, function=function)],
            env=env,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert run() == [True, True, True]  # timed every config of the three kernels
    assert len(list(tmp_path.rglob("*.autotune.json"))) >= 3  # one per kernel and shape at least
    assert run() == [False, False, False]  # read them
