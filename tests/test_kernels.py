"""Attention kernels on CPU: every backend against explicit float64 math, output and all five gradients.

The Triton kernels run under TRITON_INTERPRET=1. The interpreter must be on before triton is imported,
so those tests are skipped in an ordinary run and `test_triton_kernels_under_the_interpreter` reruns
this file in a subprocess with it on (or run `TRITON_INTERPRET=1 pytest tests/test_kernels.py`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import beside
import pytest
import torch
import triton
from beside import INTERPRETED, interpreted_only

import kernels
from kernels import dispatch
from kernels.reference import attention_reference

# relative error ||x - ref|| / ||ref||, one bound per dtype, set once
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRADS = ("q", "k", "v", "a", "b")


def make_inputs(B, H, N, D, dtype, device="cpu", *, seed=None, grad=True):
    """Fresh random q, k, v (B, H, N, D), per-head a, b (H,) and an upstream gradient dO."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def randn(*s):
        return torch.randn(*s, generator=gen)

    q, v = randn(B, H, N, D), randn(B, H, N, D)
    k = randn(B, H, N, D) * (0.5 + 1.5 * torch.rand(B, H, N, 1, generator=gen))  # key norms that vary
    a = 0.1 + 0.2 * torch.rand(H, generator=gen)
    b = 0.02 + 0.08 * torch.rand(H, generator=gen)
    tensors = [t.to(device) for t in (q, k, v)]
    coefficient_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 parameters
    tensors = [t.to(dtype) for t in tensors] + [t.to(device, coefficient_dtype) for t in (a, b)]
    if grad:
        tensors = [t.requires_grad_() for t in tensors]
    return (*tensors, randn(B, H, N, D).to(device=device, dtype=dtype))


def explicit_float64(q, k, v, a, b, do, causal):
    """Closed-form forward and gradients in float64 (no autograd), plus the scale of the da, db sums."""
    q, k, v, do = (t.detach().double() for t in (q, k, v, do))
    a, b = (t.detach().double().view(1, -1, 1, 1) for t in (a, b))
    qk = q @ k.transpose(-1, -2)  # (B, H, N, N)
    key_norm2 = k.pow(2).sum(-1)[:, :, None, :]  # (B, H, 1, N)
    scores = a * qk - b * key_norm2
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(
            ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf")
        )
    p = torch.softmax(scores, -1)
    out = p @ v
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # gradient w.r.t. the scores
    colsum = ds.sum(-2)  # (B, H, N)
    grads = {
        "q": a * (ds @ k),
        "k": a * (ds.transpose(-1, -2) @ q) - 2 * b * colsum[..., None] * k,
        "v": p.transpose(-1, -2) @ do,
        "a": (ds * qk).sum((0, 2, 3)),
        "b": -(colsum * key_norm2[:, :, 0]).sum((0, 2)),
    }
    # da and db are sums with cancellation (each row of dS sums to zero): measure their error against
    # the size of what is summed, |P| (|dP| + |delta|) times |q.k| or ||k||^2
    ds_size = p * (dp.abs() + (p * dp).sum(-1, keepdim=True).abs())
    scale = {"a": (ds_size * qk.abs()).sum((0, 2, 3)), "b": (ds_size * key_norm2).sum((0, 2, 3))}
    return out, grads, scale


def relative_error(x, ref, scale=None) -> float:
    x = x.detach().double()
    denominator = (scale if scale is not None else ref).norm().clamp_min(1.0).item()  # N = 1: exact zeros
    return ((x - ref).norm() / denominator).item()


def check_backend(fn, q, k, v, a, b, do, *, causal, grads=True):
    """Run fn forward (and backward), compare with explicit float64 math at TOL[dtype]."""
    out_ref, grads_ref, scale = explicit_float64(q, k, v, a, b, do, causal)
    out = fn(q, k, v, a, b, causal=causal)
    assert out.shape == q.shape and out.dtype == v.dtype
    tol = TOL[q.dtype]
    errors = {"out": relative_error(out, out_ref)}
    if grads:
        got = torch.autograd.grad(out, (q, k, v, a, b), do)
        for name, g in zip(GRADS, got, strict=True):
            assert g.shape == grads_ref[name].shape
            errors[name] = relative_error(g, grads_ref[name], scale.get(name))
    bad = {name: err for name, err in errors.items() if not err <= tol}  # NaN fails too
    assert not bad, f"errors over {tol:g}: {bad} (all: {errors})"
    return errors


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every buffer the Triton kernels write with NaN first, so an unwritten element fails."""
    from kernels import triton_attn

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_attn, "_alloc", alloc)


# ----------------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("N", "D", "causal"), [(1, 16, True), (17, 64, True), (33, 80, False), (24, 128, True)]
)
def test_reference_matches_explicit_float64(dtype, N, D, causal):
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype)
    check_backend(attention_reference, q, k, v, a, b, do, causal=causal)


def test_explicit_math_catches_a_wrong_gradient():
    q, k, v, a, b, do = make_inputs(1, 2, 9, 16, torch.float32)

    def wrong_b(q, k, v, a, b, *, causal):
        return attention_reference(q, k, v, a, 2 * b, causal=causal)

    with pytest.raises(AssertionError, match="errors over"):
        check_backend(wrong_b, q, k, v, a, b, do, causal=True)


# ----------------------------------------------------------------------------------------------------
# triton under the interpreter (tiles: forward 32x16, dk/dv 16x32, dq 32x16)


@interpreted_only
@pytest.mark.parametrize(
    ("dtype", "N", "D", "causal"),
    [
        (torch.float32, 1, 16, True),
        (torch.float32, 17, 16, True),
        (torch.float32, 17, 16, False),
        (torch.float32, 70, 80, True),
        (torch.float32, 45, 64, False),
        (torch.float16, 40, 16, True),  # the interpreter's bf16 dot is wrong; bf16 runs on the GPU
    ],
)
def test_triton_interpreted(poisoned, dtype, N, D, causal):
    q, k, v, a, b, do = make_inputs(2, 2, N, D, dtype)
    check_backend(kernels.BACKENDS["triton"], q, k, v, a, b, do, causal=causal)


@interpreted_only
@pytest.mark.parametrize(("N", "D", "causal"), [(17, 16, True), (45, 80, False)])
def test_triton_interpreted_other_key_norm_variant(poisoned, N, D, causal):
    from kernels.triton_attn import PRE_NORM, _attention

    def other_variant(q, k, v, a, b, *, causal):
        return _attention(q, k, v, a, b, causal, pre_norm=not PRE_NORM)

    q, k, v, a, b, do = make_inputs(2, 2, N, D, torch.float32)
    check_backend(other_variant, q, k, v, a, b, do, causal=causal)


@interpreted_only
def test_triton_interpreted_strided_inputs_constant_coefficients(poisoned):
    B, H, N, D = 2, 3, 20, 16
    q, k, v, a, b, do = make_inputs(B, H, N, D, torch.float32, grad=False)
    packed = torch.stack([q, k, v], 0).permute(0, 1, 3, 2, 4).contiguous()  # (3, B, N, H, D) like a qkv proj
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in packed.unbind(0))  # (B, H, N, D) views
    assert not q.is_contiguous()
    out = kernels.attention(q, k, v, a, b, causal=True, backend="triton")
    expected = attention_reference(q.double(), k.double(), v.double(), a.double(), b.double())
    assert relative_error(out, expected) < TOL[torch.float32]
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    ref = torch.autograd.grad(attention_reference(q, k, v, a, b), (q, k, v), do)
    assert all(
        relative_error(x, y.double()) < TOL[torch.float32] for x, y in zip((dq, dk, dv), ref, strict=True)
    )


@interpreted_only
def test_gluon_key_bias_prepass_interpreted(poisoned):
    # the Gluon forward's prepass (kernels/gluon_attn.py, _key_bias): per key -(b / |a|) ||k||^2 (-b ||k||^2
    # where a = 0) as three bf16 parts whose sum has float32's precision (one bf16 alone is off by up to 2^-9
    # of it), zeros in the other columns; and ||k||^2 itself, float32 (B, H, N), which the backward keeps
    from kernels import gluon_attn
    from kernels import triton_attn as base

    B, H, N, D = 2, 3, 70, 64
    _, k, _, _, _, _ = make_inputs(B, H, N, D, torch.bfloat16, grad=False)
    a, b = torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.05, 0.07, 0.1])
    bias = base._alloc((B * H, N, 16), torch.bfloat16, k.device)
    kn2 = torch.full((B, H, N), float("nan"))
    gluon_attn._key_bias[(triton.cdiv(N, 64), B * H)](
        k, a, b, bias, kn2, *k.stride()[:3], H, N, HEAD_DIM=D, BLOCK=64
    )
    norms = k.double().square().sum(-1).reshape(B * H, N)
    torch.testing.assert_close(kn2.double().reshape(B * H, N), norms, rtol=1e-6, atol=0)
    per_head = -b.double() / torch.where(a == 0, 1.0, a.abs()).double()  # |a|, 1 where a = 0
    want = norms * per_head.repeat(B)[:, None]
    parts = bias.double()
    assert torch.equal(parts[..., 3:], torch.zeros_like(parts[..., 3:]))
    assert torch.allclose(parts[..., :3].sum(-1), want, rtol=1e-5, atol=0)
    assert not torch.allclose(parts[..., 0], want, rtol=1e-5, atol=0)  # the other parts are needed


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher of the interpreted run")
def test_triton_kernels_under_the_interpreter():
    run = beside.result(Path(__file__), "interpreted")  # started when collection ended (tests/beside.py)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]


def test_a_test_needing_the_interpreter_runs_somewhere():
    # conftest.py refuses a collection with a test that would run nowhere: skipped here for want of
    # TRITON_INTERPRET, and not selected by the interpreter's run (`-k interpreted`) either
    class Item:
        def __init__(self, test):
            self.nodeid, self._marks = test.__name__, test.pytestmark
            self.keywords = {test.__name__: 1, **{mark.name: 1 for mark in test.pytestmark}}

        def iter_markers(self, name):
            return (mark for mark in self._marks if mark.name == name)

    needs = pytest.mark.skipif(True, reason="needs TRITON_INTERPRET=1")

    def test_plain_skip(): ...
    def test_named_interpreted(): ...
    def test_marked(): ...
    def test_other_skip(): ...

    items = [
        Item(needs(test_plain_skip)),
        Item(needs(test_named_interpreted)),
        Item(interpreted_only(test_marked)),
        Item(pytest.mark.skipif(True, reason="compiles for the GPU")(test_other_skip)),
    ]
    assert beside.missed_by_the_interpreted_run(items) == ["test_plain_skip"]


def test_triton_rejects_bad_inputs():
    q, k, v, a, b, _ = make_inputs(1, 2, 8, 8, torch.float32, grad=False)
    with pytest.raises(ValueError, match="head dim"):
        kernels.BACKENDS["triton"](q, k, v, a, b, causal=True)
    q, k, v, a, b, _ = make_inputs(1, 2, 8, 16, torch.float32, grad=False)
    with pytest.raises(ValueError, match="dtype"):
        kernels.BACKENDS["triton"](q.double(), k.double(), v.double(), a, b, causal=True)
    with pytest.raises(ValueError, match="shape"):
        kernels.BACKENDS["triton"](q, k[:, :, :5], v[:, :, :5], a, b, causal=True)


# ----------------------------------------------------------------------------------------------------
# triton-tma (Hopper TMA descriptors) under the interpreter, which runs host descriptors


@interpreted_only
@pytest.mark.parametrize(
    ("dtype", "N", "D", "causal"),
    [
        (torch.float32, 1, 16, True),
        (torch.float32, 17, 16, True),
        (torch.float32, 45, 64, False),
        (torch.float32, 70, 80, True),
        (torch.float16, 40, 16, True),
    ],
)
def test_triton_tma_interpreted(poisoned, dtype, N, D, causal):
    q, k, v, a, b, do = make_inputs(2, 2, N, D, dtype)
    check_backend(kernels.BACKENDS["triton-tma"], q, k, v, a, b, do, causal=causal)


@interpreted_only
@pytest.mark.parametrize("op", ["triton-tma", "triton", "triton with ABLATE_KEY_NORM=loop"])
def test_backward_takes_the_forwards_key_norms(poisoned, monkeypatch, op):
    # the forward's ||k||^2 is kept for the backward, whose preprocess then writes delta alone (NORMS=False);
    # a forward that computed no norms (the loop variant) keeps an empty tensor, and the preprocess writes them
    from kernels import triton_attn, triton_attn_tma

    q, k, v, a, b, do = make_inputs(2, 3, 40, 16, torch.float32)
    pre_norm = op != "triton with ABLATE_KEY_NORM=loop"
    if op == "triton-tma":
        o, _lse, kn2 = triton_attn_tma._fwd_op(q, k, v, a, b, True)
    else:
        o, _lse, kn2 = triton_attn._fwd_op(q, k, v, a, b, True, pre_norm)
    if pre_norm:
        torch.testing.assert_close(kn2, k.detach().square().sum(-1))
    else:
        assert kn2.shape == (0,)
    assert any(t is kn2 for t in o.grad_fn.saved_tensors)
    preprocess, flags = triton_attn._bwd_preprocess, []

    class Recorded:  # kernel[grid](*args, **constexprs), its NORMS noted
        def __getitem__(self, grid):
            def launch(*args, **meta):
                flags.append(meta.get("NORMS", True))
                return preprocess[grid](*args, **meta)

            return launch

    monkeypatch.setattr(triton_attn, "_bwd_preprocess", Recorded())
    grads = torch.autograd.grad(o, (q, k, v, a, b), do)
    assert flags == [not pre_norm]
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, a, b)]
    want = torch.autograd.grad(attention_reference(*exact, causal=True), exact, do.double())
    for got, w in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), w, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(
    INTERPRETED, reason="the interpreter wraps kernels, and Triton's disk cache needs a JITFunction"
)
def test_triton_tma_autotuning_is_cached_on_disk_and_launches_the_config_with_its_hook(tmp_path, monkeypatch):
    """Triton's on-disk autotune cache skips configs with a pre-launch hook; the TMA kernels' configs set
    their tile shapes in one, so `_Autotuner` stores them without it and launches the hooked one it chose.
    Triton's own `check_disk_cache` runs here; only the GPU target it hashes is stubbed."""
    import types

    import triton
    import triton.compiler.compiler
    from triton.runtime import autotuner

    from kernels import triton_attn_tma as tma

    assert all(isinstance(k, tma._Autotuner) for k in (tma._fwd_kernel, tma._dkdv_kernel, tma._dq_kernel))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    target = types.SimpleNamespace(get_current_target=lambda: "sm90 (stub)")
    monkeypatch.setattr(autotuner, "driver", types.SimpleNamespace(active=target))
    monkeypatch.setattr(
        triton.compiler.compiler, "make_backend", lambda _: types.SimpleNamespace(hash=lambda: "x")
    )
    fn = tma._attn_fwd
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2, pre_hook=tma._set_block_shapes)
        for m, n, w in ((128, 64, 8), (64, 64, 4), (64, 32, 4))
    ]
    key = (256, 64, True, "torch.bfloat16")

    def tuner(cls):
        return cls(
            fn,
            fn.arg_names,
            configs,
            key=tma.base.TUNING_KEY,
            reset_to_zero=None,
            restore_value=None,
        )

    def timed(t):  # what Triton's benchmark closure leaves behind: every config's timing, the fastest chosen
        def bench():
            t.configs_timings = {c: [ms, ms, ms] for c, ms in zip(configs, (0.3, 0.1, 0.2), strict=True)}
            t.cache[key] = configs[1]

        return bench

    def never():
        raise AssertionError("timed the configs again")

    plain = tuner(autotuner.Autotuner)
    assert plain.check_disk_cache(key, configs, timed(plain)) is False
    assert not list(tmp_path.rglob("*.autotune.json"))  # Triton alone stores nothing for hooked configs

    first = tuner(tma._Autotuner)
    assert first.check_disk_cache(key, configs, timed(first)) is False
    assert first.cache[key] is configs[1]
    [stored] = tmp_path.rglob("*.autotune.json")
    assert '"pre_hook": null' in stored.read_text() and '"BLOCK_M": 128' in stored.read_text()

    second = tuner(tma._Autotuner)  # another process: reads the choice, and launches it with its hook
    assert second.check_disk_cache(key, configs, never) is True
    assert second.cache[key] is configs[1] and second.cache[key].pre_hook is tma._set_block_shapes
    other = (257, 64, True, "torch.bfloat16")  # another length is timed afresh
    assert second.check_disk_cache(other, configs, timed(second)) is False


@interpreted_only
def test_triton_tma_interpreted_reads_strided_views_in_place_and_copies_unaligned_ones(poisoned):
    from kernels.triton_attn_tma import _tma_ready

    B, H, N, D = 2, 3, 20, 16
    q, k, v, a, b, do = make_inputs(B, H, N, D, torch.float32, grad=False)
    a, b = a.requires_grad_(), b.requires_grad_()
    packed = torch.stack([q, k, v], 0).permute(0, 1, 3, 2, 4).contiguous()  # (3, B, N, H, D) like a qkv proj
    views = [t.transpose(1, 2).requires_grad_() for t in packed.unbind(0)]  # (B, H, N, D), not contiguous
    assert all(_tma_ready(t) is t for t in views)  # descriptors over the views' own strides
    check_backend(kernels.BACKENDS["triton-tma"], *views, a, b, do, causal=True)
    flat = torch.randn(B * H * N * D + 1)
    unaligned = flat[1:].view(B, H, N, D)  # 4 bytes past a 16-byte boundary: TMA cannot start there
    assert _tma_ready(unaligned) is not unaligned and _tma_ready(unaligned).data_ptr() % 16 == 0
    check_backend(
        kernels.BACKENDS["triton-tma"], unaligned.requires_grad_(), *views[1:], a, b, do, causal=True
    )


@interpreted_only
def test_triton_tma_interpreted_rejects_rows_that_are_not_16_byte_multiples():
    q, k, v, a, b, _ = make_inputs(1, 2, 8, 20, torch.float16, grad=False)  # 40-byte rows
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        kernels.attention(q, k, v, a, b, backend="triton-tma")
    kernels.attention(q, k, v, a, b, backend="triton")  # the pointer kernels take any row


def test_triton_tma_says_it_needs_hopper():
    from kernels.triton_attn_tma import capability_reason

    assert "sm80" in capability_reason((8, 0)) and "'triton'" in capability_reason((8, 9))
    assert capability_reason((9, 0)) is None and capability_reason((10, 0)) is None


@pytest.mark.skipif(INTERPRETED, reason="compiles for the GPU")
def test_tma_kernels_compile_for_sm90_to_wgmma_and_tma_copies():
    # no GPU needed: Triton compiles for a named target (kernels/sm90_compile.py)
    from kernels import sm90_compile

    with sm90_compile.sm90_target():
        rows = [sm90_compile.compile_one(kind, 4096, 64, torch.bfloat16, spec, True) for kind, spec in
                [("fwd", (128, 64, 4, 3)), ("dkdv", (64, 128, 8, 3)), ("dq", (128, 64, 8, 3))]]  # fmt: skip
    for row in rows:
        assert "error" not in row, row
        assert row["wgmma"] > 0 and row["tma_loads"] > 0, row


@pytest.mark.skipif(INTERPRETED, reason="compiles for the GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gluon_kernels_compile_for_sm90_into_warp_specialised_partitions(head_dim):
    # the ping-pong kernels (kernels/gluon_attn.py), first configs: consumer warp groups (the forward's as
    # many as its config says, three at D 64, the backward's two), a loader warp and in the backward a dQ
    # writer warp (padded to a warp group), registers reallocated per partition, every matmul an asynchronous
    # wgmma (a forward consumer's q.k, key bias and P.V: 2 + 3 + 1 in the first turn, the loop and the last;
    # the backward 6 per consumer in its one loop: S^T, dP^T, dV, dK and two for its dQ half), and the
    # backward's TMA reduce-add of dQ
    from kernels import gluon_attn, sm90_compile

    if gluon_attn.IMPORT_ERROR:
        pytest.skip(gluon_attn.IMPORT_ERROR)
    q, k, v, o, do = (torch.empty(1, 2, 1024, head_dim, dtype=torch.bfloat16) for _ in range(5))
    rows = [torch.empty(1, 2, 1024) for _ in range(5)]
    ab = (torch.empty(2), torch.empty(2))
    launches = []
    if head_dim in gluon_attn.CONFIGS["fwd"]:
        bias = torch.empty(2, 1024, 16, dtype=torch.bfloat16)
        config = gluon_attn.CONFIGS["fwd"][head_dim][0]
        # the first config and the first of the other forward kernel (persistent or not) where there is one
        fwd_configs = gluon_attn.CONFIGS["fwd"][head_dim]
        for config in fwd_configs[:1] + [c for c in fwd_configs if c[7] != fwd_configs[0][7]][:1]:
            kernel, args, meta, grid = gluon_attn.fwd_launch(
                q, k, v, ab[0], o, rows[0], bias, True, config, 132
            )
            blocks = triton.cdiv(1024, 64 * config[6])
            # the persistent kernel: one program per pair of work items (a head's longest and shortest rows)
            # where there are fewer pairs than programs
            assert grid == ((2 * triton.cdiv(blocks, 2),) if config[7] else (blocks, 2))
            assert meta["CONSUMERS"] == (3 if head_dim == 64 else 2)
            launches.append((kernel, args, meta, meta["CONSUMERS"], meta["CONSUMERS"] * 6))
    acc = torch.empty(1, 2, gluon_attn.fragment_rows(1024, head_dim), 256)
    rows_in = (rows[0].view(2, 1, 1024), torch.empty(2, 1, gluon_attn.padded_len(1024)), rows[2])
    # the first backward config and the first of the other kernel (persistent or not) where there is one
    configs = gluon_attn.CONFIGS["bwd"][head_dim]
    others = [c for c in configs if gluon_attn.persistent(c) != gluon_attn.persistent(configs[0])]
    for config in configs[:1] + others[:1]:
        counter = torch.zeros(4, dtype=torch.int32)
        kernel, args, meta, _ = gluon_attn.bwd_launch(do, q, k, v, *ab, rows_in, (acc, k, v, *rows[3:]), True,
                                                      config, 0, counter)  # fmt: skip
        launches.append((kernel, args, meta, 2, 12))
    backward_kernels = ["_attn_bwd_p", "_attn_bwd"] if head_dim == 64 else ["_attn_bwd"]
    forward_kernels = ["_attn_fwd"] if head_dim == 64 else ["_attn_fwd_p", "_attn_fwd"]
    assert [kernel.__name__ for kernel, *_ in launches] == [*forward_kernels, *backward_kernels]
    for kernel, args, meta, consumers, wgmmas in launches:
        with sm90_compile.sm90_target():
            compiled = kernel.warmup(*args, **meta, grid=(1,))
        kernel.device_caches.clear()  # its binder holds the sm90-only target
        assert compiled.metadata.num_warps == 4 * (consumers + 1) and "setmaxnreg" in compiled.asm["ptx"]
        ttgir = compiled.asm["ttgir"]
        assert ttgir.count("warp_group_dot ") == wgmmas and ttgir.count("isAsync = true") >= wgmmas
        spills = sm90_compile._resources(compiled.asm["cubin"])[1]
        if kernel in (gluon_attn._attn_bwd, gluon_attn._attn_bwd_p):
            assert "cp.reduce.async.bulk.tensor" in compiled.asm["ptx"]
            # D 128 holds 128 registers of dK and dV alone; with the log-sum-exp and delta read from shared
            # memory and a tile's dQ half held until the next tile's S^T and dP^T are issued it spills 104-136
            # bytes a thread (Triton 3.9 / 3.6), where global loads of those made it 136-168 before dQ was held
            assert spills <= (0 if head_dim == 64 else 160)
        elif consumers == 2:
            assert spills == 0
        else:
            # three consumers share 512 registers a thread with the loader's warp group, 160 each: the D 64
            # forward compiles without spills with Triton 3.6 (the GPU machine's) and spills 104 bytes a
            # thread with 3.9
            assert spills <= 128


@pytest.mark.skipif(INTERPRETED, reason="no kernel runs here")
@pytest.mark.parametrize("persistent", [False, True])
def test_gluon_backward_covers_the_rows_in_launches_of_acc_bytes(monkeypatch, persistent):
    # the host side of the backward on CPU, its kernel replaced: each launch gets its accumulator rows zeroed,
    # covers as many (batch, head) rows as ACC_BYTES allows (the last launch the rest), and its rows land in
    # theirs of dq; the persistent kernel's launches each get a zeroed counter of their own and the work
    # items of their rows
    from kernels import gluon_attn

    if gluon_attn.IMPORT_ERROR:
        pytest.skip(gluon_attn.IMPORT_ERROR)

    class Launch:  # kernel[grid](*args, **constexprs) runs fn(grid, *args)
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **meta: self.fn(grid, *args)

    seen = []

    counters = []

    def fill(grid, acc, *rest):  # the launch's rows of the accumulator: row r holds bh0 + r everywhere
        if persistent:  # the tail of _attn_bwd_p's arguments
            counter, n_heads, n_ctx, n_blocks, n_items, bh0 = rest
            assert (n_heads, n_ctx, n_blocks) == (5, 1000, 8) and n_items % n_blocks == 0
            n = n_items // n_blocks
            assert grid == (1, 1)  # one program a multiprocessor, and CPU tensors count one
            assert counter.dtype == torch.int32 and counter[0] == 0 and counter.data_ptr() % 16 == 0
            counters.append(counter.data_ptr())
        else:
            (bh0,) = rest
            n = grid[1]
        rows = acc[:, :n]
        assert acc.dtype == torch.float32 and not rows.any()
        seen.append((bh0, n))
        rows.copy_(torch.arange(bh0, bh0 + n, dtype=torch.float32).view(1, -1, 1, 1).expand_as(rows))

    def launch(do, q, k, v, a, b, rows_in, grads, causal, config, bh0, counter):
        grid = (8, grads[0].shape[1])
        if gluon_attn.persistent(config):
            return Launch(fill), (grads[0], counter, 5, 1000, 8, 8 * grid[1], bh0), {}, grid
        return Launch(fill), (grads[0], bh0), {}, grid

    def convert(grid, acc, dq, n_ctx):  # _dq_from_fragments in torch
        dq.copy_(from_fragments(acc, n_ctx, dq.shape[-1]))
        acc.zero_()

    def compiled(kernel, args, meta, grid):  # a launch of the compiled kernel: kernel[grid](*args) here
        return lambda grid, args, stream: kernel[grid](*args)

    monkeypatch.setattr(gluon_attn.base, "_bwd_preprocess", Launch(lambda *args: None))
    monkeypatch.setattr(gluon_attn, "bwd_launch", launch)
    monkeypatch.setattr(gluon_attn, "_dq_from_fragments", Launch(convert))
    monkeypatch.setattr(gluon_attn, "_compiled", compiled)
    # N 1000 (16 query tiles), D 64: 4 rows a launch
    monkeypatch.setattr(gluon_attn, "ACC_BYTES", 4 * gluon_attn.fragment_rows(1000, 64) * 256 * 4)
    B, H, N, D = 2, 5, 1000, 64
    q, k, v, o, do = (torch.randn(B, H, N, D).to(torch.bfloat16) for _ in range(5))
    config = next(c for c in gluon_attn.CONFIGS["bwd"][D] if gluon_attn.persistent(c) == persistent)
    ones, zeros = torch.ones(H), torch.zeros(H)
    stats = torch.zeros(B, H, N)  # lse and kn2
    dq = gluon_attn.backward(do, q, k, v, ones, zeros, o, stats, stats, True, config)[0]
    assert seen == [(0, 4), (4, 4), (8, 2)]
    assert len(set(counters)) == (3 if persistent else 0)
    assert dq.dtype == torch.bfloat16
    assert torch.equal(dq.view(B * H, N, D), torch.arange(B * H).view(-1, 1, 1).expand(-1, N, D).to(dq.dtype))


def to_fragments(dq):
    # (rows, N, D) -> the Gluon backward's dQ accumulator (rows, fragment_rows, 256): gluon_attn._fragment_order
    # per 64-row query tile (w, h, r) and head-dim half (half, i, c), rows past N zero
    rows, n, d = dq.shape
    tiles = -(-n // 64)
    padded = torch.zeros(rows, tiles * 64, d, dtype=dq.dtype)
    padded[:, :n] = dq
    x = padded.view(rows, tiles, 4, 2, 8, 2, d // 16, 8)  # t, w, h, r, half, i, c
    return x.permute(0, 1, 5, 3, 6, 2, 4, 7).reshape(rows, tiles * d // 4, 256)  # t, half, h, i, w, r, c


def from_fragments(acc, n, d):
    # the inverse of to_fragments
    x = acc.view(acc.shape[0], -1, 2, 2, d // 16, 4, 8, 8).permute(0, 1, 5, 3, 6, 2, 4, 7)
    return x.reshape(acc.shape[0], -1, d)[:, :n]


def test_fragment_order_round_trips():
    dq = torch.randn(3, 130, 64)
    acc = to_fragments(dq)
    assert acc.shape == (3, 3 * 16, 256) and torch.equal(from_fragments(acc, 130, 64), dq)
    tile = torch.arange(64 * 64.0).view(1, 64, 64)  # one tile, D 64: halves of 32 columns
    # row 16 w + 8 h + r, column 8 i + c of a half -> chunk row h * 4 + i, column 64 w + 8 r + c
    w, h, r, i, c = 2, 1, 5, 3, 6
    assert to_fragments(tile)[0, h * 4 + i, 64 * w + 8 * r + c] == tile[0, 16 * w + 8 * h + r, 8 * i + c]


@interpreted_only
@pytest.mark.parametrize("n, d", [(130, 64), (128, 128)])
def test_gluon_dq_conversion_undoes_the_fragment_order(n, d):
    # _dq_from_fragments: the accumulator's tiles in natural order, in dq's dtype, rows past N dropped, and
    # the accumulator left zeroed for the next launch
    from kernels import gluon_attn

    dq = torch.randn(3, n, d)
    acc = to_fragments(dq)
    out = torch.empty(3, n, d)
    gluon_attn._dq_from_fragments[(-(-n // 64), 3)](acc, out, n, HEAD_DIM=d)
    assert torch.equal(out, dq) and not acc.any()


@interpreted_only
@pytest.mark.parametrize("n, d", [(77, 64), (130, 128)])
def test_backward_prepass_fills_delta_rows_of_a_given_stride(n, d):
    # triton_attn._bwd_preprocess: delta_i = sum_d O_id dO_id in rows of delta_stride per (batch, head) (the
    # Gluon backward reads them by TMA from rows of padded_len(N)), the padding left alone, and ||k_i||^2
    # (B, H, N), from strided (B, H, N, D) views
    from kernels import gluon_attn, triton_attn

    B, H = 2, 3
    o, do, k = (torch.randn(B, n, H, d).transpose(1, 2) for _ in range(3))
    pad = gluon_attn.padded_len(n)
    assert pad % 4 == 0 and n <= pad < n + 4
    delta = torch.full((B * H, 1, pad), float("nan"))
    kn2 = torch.empty(B, H, n)
    triton_attn._bwd_preprocess[(-(-n // 16), B * H)](
        o, do, k, delta, kn2, *o.stride()[:3], *do.stride()[:3], *k.stride()[:3], H, n, pad,
        HEAD_DIM=d, D_PAD=d, BLOCK=16,
    )  # fmt: skip
    torch.testing.assert_close(delta[:, 0, :n], (o * do).sum(-1).view(B * H, n))
    torch.testing.assert_close(kn2, (k * k).sum(-1))
    assert delta[:, :, n:].isnan().all()
    # NORMS=False (the backward has the forward's norms): delta alone, kn2 left as it was
    delta.fill_(float("nan"))
    kept = torch.full((B, H, n), -1.0)
    triton_attn._bwd_preprocess[(-(-n // 16), B * H)](
        o, do, k, delta, kept, *o.stride()[:3], *do.stride()[:3], *k.stride()[:3], H, n, pad,
        HEAD_DIM=d, D_PAD=d, BLOCK=16, NORMS=False,
    )  # fmt: skip
    torch.testing.assert_close(delta[:, 0, :n], (o * do).sum(-1).view(B * H, n))
    assert (kept == -1).all()


def test_gluon_backward_reads_the_forwards_lse_in_place_where_tma_can():
    # rows of N float32 are 16-byte aligned when N is a multiple of 4: the Gluon backward's descriptor is over
    # the forward's log-sum-exp itself; other N take a copy with rows of padded_len(N)
    from kernels import gluon_attn

    lse = torch.randn(6, 1, 128)
    assert gluon_attn._tma_rows(lse) is lse
    ragged = torch.randn(6, 1, 77)
    rows = gluon_attn._tma_rows(ragged)
    assert rows.shape == (6, 1, 80) and torch.equal(rows[..., :77], ragged)


@interpreted_only
def test_key_norms_fill_rows_of_a_given_stride():
    # the Gluon forward reads its key norms by TMA from rows padded to padded_len(N): _key_norms writes
    # ||k_j||^2 at row_stride per (batch, head) and leaves the padding alone
    from kernels import gluon_attn, triton_attn

    B, H, N, D = 2, 3, 77, 64
    k = torch.randn(B, N, H, D).transpose(1, 2)
    pad = gluon_attn.padded_len(N)
    kn2 = torch.full((B * H, 1, pad), float("nan"))
    triton_attn._key_norms[(-(-N // 16), B * H)](
        k, kn2, *k.stride()[:3], H, N, pad, HEAD_DIM=D, D_PAD=D, BLOCK=16
    )  # fmt: skip
    torch.testing.assert_close(kn2[:, 0, :N], (k * k).sum(-1).view(B * H, N))
    assert kn2[:, :, N:].isnan().all()


def test_gluon_backend_says_what_it_needs_off_sm90():
    q, k, v, a, b, _ = make_inputs(1, 2, 8, 64, torch.bfloat16, grad=False)
    with pytest.raises(ValueError, match=r"gluon.*(sm90|Gluon|interpreter|triton is not importable)"):
        kernels.attention(q, k, v, a, b, backend="gluon")


# ----------------------------------------------------------------------------------------------------
# flex and augmented SDPA (torch's CPU kernels)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("N", "D", "causal"), [(17, 16, True), (40, 80, False)])
def test_flex_forward(N, D, causal):  # FlexAttention has no backward on CPU
    q, k, v, a, b, do = make_inputs(2, 2, N, D, torch.float32, grad=False)
    check_backend(kernels.BACKENDS["flex"], q, k, v, a, b, do, causal=causal, grads=False)


def test_fused_flex_raises_the_recompile_limit_never_lowers_it():
    from kernels import flex

    original = torch._dynamo.config.recompile_limit
    for before, after in [(8, flex.FLEX_RECOMPILE_LIMIT), (1000, 1000)]:
        # config.patch restores the setting on exit (monkeypatch would delete it: dynamo's config
        # attributes are not in the module's __dict__, and later flex calls would fail)
        with torch._dynamo.config.patch(recompile_limit=before):
            flex._compiled_flex.cache_clear()
            flex._compiled_flex()
            assert torch._dynamo.config.recompile_limit == after
    flex._compiled_flex.cache_clear()
    assert torch._dynamo.config.recompile_limit == original


def test_a_prepared_causal_mask_is_taken_as_it_is_under_compile(monkeypatch):
    """kernels.prepare builds flex's block mask once, eagerly; a compiled call takes it instead of tracing
    (and rebuilding) it. A mask met first inside a trace is built there and not kept."""
    import torch._dynamo

    from kernels import flex

    built, real = [], flex.create_block_mask
    monkeypatch.setattr(
        flex, "create_block_mask", lambda *args, **kw: built.append(args[3]) or real(*args, **kw)
    )
    monkeypatch.setattr(flex, "_MASKS", {})
    q, k, v = (torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    a, b = torch.full((2,), 0.25), torch.full((2,), 0.1)
    kernels.prepare(40, "cpu")
    assert built == [40] and list(flex._MASKS) == [(40, "cpu", None)]

    torch._dynamo.reset()
    attend = torch.compile(lambda *t: flex.flex_attention_rbf(*t, a, b), backend="eager", fullgraph=True)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        out = attend(q, k, v)
        assert built == [40]  # nothing built in the trace or in the call
        assert torch.allclose(out, attention_reference(q, k, v, a, b, causal=True), atol=1e-5)
        short = attend(q[:, :, :24], k[:, :, :24], v[:, :, :24])  # a length nobody prepared
    torch._dynamo.reset()
    assert 24 in built and (24, "cpu", None) not in flex._MASKS
    reference = attention_reference(q[:, :, :24], k[:, :, :24], v[:, :, :24], a, b, causal=True)
    assert torch.allclose(short, reference, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "D", "causal"), [(1, 16, True), (17, 64, True), (40, 80, False)])
def test_sdpa_aug(dtype, N, D, causal):
    q, k, v, a, b, do = make_inputs(2, 3, N, D, dtype)
    check_backend(kernels.BACKENDS["sdpa-aug"], q, k, v, a, b, do, causal=causal)


def check_without_key_norm_term(backend, q, k, v, a, do, *, causal=True):
    """b=None (the sdpa metric): output and q, k, v, a gradients match the math with b = 0."""
    out_ref, grads_ref, scale = explicit_float64(q, k, v, a, torch.zeros_like(a), do, causal)
    out = kernels.attention(q, k, v, a, None, causal=causal, backend=backend)
    got = torch.autograd.grad(out, (q, k, v, a), do)
    errors = {"out": relative_error(out, out_ref)}
    errors |= {n: relative_error(g, grads_ref[n], scale.get(n)) for n, g in zip("qkva", got, strict=True)}
    assert max(errors.values()) <= TOL[q.dtype], errors


@pytest.mark.parametrize("backend", ["auto", "sdpa", "sdpa-aug", "reference"])
def test_b_none_means_no_key_norm_term(backend):
    q, k, v, a, _, do = make_inputs(2, 3, 17, 32, torch.float32)
    check_without_key_norm_term(backend, q, k, v, a, do)


def test_sdpa_backend_is_dot_product_only():
    q, k, v, a, b, do = make_inputs(2, 3, 17, 32, torch.float32)
    with pytest.raises(ValueError, match="b == 0"):
        kernels.attention(q, k, v, a, b, backend="sdpa")
    zero_b = torch.zeros_like(b)
    check_backend(kernels.BACKENDS["sdpa"], q, k, v, a, zero_b, do, causal=True, grads=False)


# ----------------------------------------------------------------------------------------------------
# dispatcher


def test_auto_uses_the_reference_on_cpu_and_logs_it(caplog):
    q, k, v, a, b, _ = make_inputs(1, 2, 5, 16, torch.float32, grad=False)
    assert dispatch._choose_backend(q, k, v, a, b, True) == "reference"
    dispatch._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="kernels"):
        kernels.attention(q, k, v, a, b, backend="flex")
        kernels.attention(q, k, v, a, b, backend="flex")
    assert sum("'flex'" in r.getMessage() for r in caplog.records) == 1  # once per shape key


def test_unknown_or_unusable_backend_is_an_error():
    q, k, v, a, b, _ = make_inputs(1, 2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="choose from"):
        kernels.attention(q, k, v, a, b, backend="fastest")
    with pytest.raises(ValueError, match="no backward on CPU"):
        kernels.attention(q, k, v, a, b, backend="flex")


def test_a_failing_fast_backend_warns_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image")

    monkeypatch.setitem(kernels.BACKENDS, "sdpa-aug", broken)
    q, k, v, a, b, _ = make_inputs(1, 2, 9, 16, torch.float32, grad=False)
    with pytest.warns(RuntimeWarning, match="'sdpa-aug' FAILED"):
        out = kernels.attention(q, k, v, a, b, backend="sdpa-aug")
    torch.testing.assert_close(out, attention_reference(q, k, v, a, b))


def test_measured_table_picks_the_nearest_row(monkeypatch):
    rows = [
        {"dtype": "bfloat16", "head_dim": 64, "n_ctx": 1024, "causal": True, "backend": "flex"},
        {"dtype": "bfloat16", "head_dim": 128, "n_ctx": 16384, "causal": True, "backend": "sdpa-aug"},
        {"dtype": "float16", "head_dim": 64, "n_ctx": 1024, "causal": True, "backend": "triton"},
    ]
    monkeypatch.setattr(dispatch, "_TABLE", rows)

    def near(N, D, dtype=torch.bfloat16):
        row = dispatch._nearest_row(torch.empty(1, 1, N, D, dtype=dtype), True)
        return row["backend"] if row else None

    assert near(2048, 64) == "flex"
    assert near(8192, 96) == "sdpa-aug"
    assert near(100, 64, torch.float16) == "triton"
    assert near(100, 64, torch.float32) is None
    assert dispatch._nearest_row(torch.empty(1, 1, 5, 64, dtype=torch.bfloat16), False) is None


def test_auto_order_follows_the_measurements_of_the_nearest_row(monkeypatch):
    rows = [
        {"dtype": "bfloat16", "head_dim": 64, "n_ctx": 256, "causal": True, "backend": "flex",
         "tokens_per_s": {"flex": 1.57e6, "sdpa-aug": 1.55e6, "triton": 1.31e6}},
        {"dtype": "bfloat16", "head_dim": 64, "n_ctx": 4096, "causal": True, "backend": "triton",
         "ms": {"triton": 6.8, "flex": 15.2, "sdpa-aug": 10.3}},
    ]  # fmt: skip
    monkeypatch.setattr(dispatch, "_TABLE", rows)
    short, long = (
        torch.empty(1, 1, 257, 64, dtype=torch.bfloat16),
        torch.empty(1, 1, 4000, 64, dtype=torch.bfloat16),
    )
    assert dispatch._measured_order(dispatch._nearest_row(short, True)) == [
        "flex",
        "sdpa-aug",
        "triton",
        "reference",
    ]
    assert dispatch._measured_order(dispatch._nearest_row(long, True)) == [
        "triton",
        "sdpa-aug",
        "flex",
        "reference",
    ]
    assert dispatch._measured_order(None) == list(dispatch.DEFAULT_ORDER)


def test_auto_passes_over_flex_when_a_or_b_is_learned(monkeypatch):
    # FlexAttention's backward sums a captured tensor's gradient with atomics: 5x slower with learned a, b
    a, b = torch.ones(2), torch.ones(2)
    assert not dispatch._slow_with_learned_scalars("flex", a, b)
    learned = torch.ones(2, requires_grad=True)
    assert dispatch._slow_with_learned_scalars("flex", 2.0 * learned, learned)
    assert not dispatch._slow_with_learned_scalars("sdpa-aug", 2.0 * learned, learned)
    with torch.no_grad():  # evaluation: no backward, flex is fine
        assert not dispatch._slow_with_learned_scalars("flex", learned, learned)
    # with every backend supported (as on CUDA), auto takes the row's pick unless a or b is learned
    monkeypatch.setattr(dispatch, "UNSUPPORTED", dict.fromkeys(dispatch.UNSUPPORTED, lambda *inputs: None))
    row = {"dtype": "float32", "head_dim": 16, "n_ctx": 8, "causal": True, "backend": "flex",
           "tokens_per_s": {"flex": 2.0, "sdpa-aug": 1.9, "triton": 1.0}}  # fmt: skip
    monkeypatch.setattr(dispatch, "_TABLE", [row])
    q = torch.randn(1, 2, 8, 16)
    assert next(dispatch._candidates(q, q, q, a, b, True)) == "flex"
    assert next(dispatch._candidates(q, q, q, 2.0 * learned, learned, True)) == "sdpa-aug"


def test_shipped_table_names_real_backends():
    for row in dispatch.load_table():
        assert row["backend"] in kernels.BACKENDS


def test_benchmark_shapes_are_the_grid_or_the_pairs_asked_for():
    from types import SimpleNamespace

    from kernels import bench

    shapes = lambda *pairs: bench._shapes(SimpleNamespace(shapes=list(pairs) or None))  # noqa: E731
    assert len(shapes()) == len(bench.DTYPES) * len(bench.HEAD_DIMS) * len(bench.LENGTHS)
    # pairs outside the grid are timed too (N 256 was once dropped without a word), per dtype, by D then N
    assert shapes("256,64", "4096,128", "257,64") == [
        (dtype, n, d) for dtype in bench.DTYPES for n, d in ((256, 64), (257, 64), (4096, 128))
    ]
    assert shapes("0,0") == []  # the memory check alone
    for bad in ("4096", "4096,64,1", "4096,x", "0,64", "-1,64"):
        with pytest.raises(SystemExit, match="--shapes"):
            shapes(bad)


def test_benchmark_table_update_keeps_rows_of_shapes_not_run():
    from kernels import bench

    def row(n, backend):
        return {"dtype": "bfloat16", "n_ctx": n, "head_dim": 64, "causal": True, "backend": backend}

    merged = bench.merged_table([row(256, "flex"), row(4096, "triton")], [row(4096, "triton-tma")])
    assert merged == [row(4096, "triton-tma"), row(256, "flex")]


def test_benchmark_table_update_says_what_measured_each_row():
    from kernels import bench

    def row(n, backend, **extra):
        return {"dtype": "bfloat16", "n_ctx": n, "head_dim": 64, "causal": True, "backend": backend, **extra}

    old_env = {"command": "python -m kernels.bench --write-table", "gpu": "NVIDIA H200", "date": "2026-11-29"}
    new_env = {
        **old_env,
        "command": "python -m kernels.bench --write-table --shapes 4096,64",
        "date": "2026-11-30",
    }
    old = {
        "environment": old_env,
        "rows": [row(256, "flex", source="bench.throughput"), row(1024, "triton"), row(4096, "triton")],
    }
    table = bench.updated_table(old, [row(4096, "triton-tma")], new_env)
    assert table["environment"] == new_env
    assert table["rows"] == [
        row(
            4096,
            "triton-tma",
            source="python -m kernels.bench --write-table --shapes 4096,64 (NVIDIA H200, 2026-11-30)",
        ),
        row(256, "flex", source="bench.throughput"),
        row(1024, "triton", source="python -m kernels.bench --write-table (NVIDIA H200, 2026-11-29)"),
    ]


def test_benchmark_rounds_give_medians_and_their_spread():
    from kernels import bench

    def timed(fwd, bwd, peak=10.0):
        return dict(backend="gluon", geometry="rbf", fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=100 / fwd,
                    bwd_tflops=250 / bwd, peak_mib=peak)  # fmt: skip

    row = bench.over_rounds([timed(1.0, 3.0), timed(1.2, 2.0, 12.0), timed(0.9, 3.3)])
    assert (row["fwd_ms"], row["bwd_ms"], row["peak_mib"], row["rounds"]) == (1.0, 3.0, 12.0, 3)
    assert row["fwd_tflops"] == pytest.approx(100.0) and row["bwd_tflops"] == pytest.approx(250 / 3)
    assert row["spread"] == pytest.approx((4.2 - 3.2) / 4.0)  # totals 4.0, 3.2, 4.2
    assert bench.over_rounds([timed(1.0, 3.0), timed(2.0, 4.0)])["fwd_ms"] == 1.5  # an even count: the mean
    failed = dict(backend="gluon", error="RuntimeError: out of memory")
    assert bench.over_rounds([timed(1.0, 3.0), failed]) == failed
    rows = [dict(timed(1.0, 3.0), dtype="bfloat16", n_ctx=4096, head_dim=64, backend=name, geometry=geometry)
            for name, geometry in (("sdpa-flash", "sdpa"), ("sdpa-cudnn", "sdpa"))]  # fmt: skip
    rows.append(dict(row, dtype="bfloat16", n_ctx=4096, head_dim=64))
    bench.add_ratios(rows)
    table = bench.markdown(rows)
    assert "| one run |" in table and "| 25.0% of 3 |" in table


def test_benchmark_backend_filter_names_the_choices():
    from kernels import bench

    chosen = {(c.name, c.geometry) for c in bench._candidates(["sdpa-cudnn", "triton-tma"])}
    assert chosen == {("sdpa-cudnn", "sdpa"), ("triton-tma", "rbf"), ("triton-tma", "penalty")}
    with pytest.raises(SystemExit, match=r"\['triton-tmaa'\]; choose from .*'triton-tma'"):
        bench._candidates(["triton-tmaa"])


@interpreted_only
@pytest.mark.parametrize("backend", ["triton", "triton-tma"])
def test_triton_interpreted_under_torch_compile_without_graph_breaks(backend):
    q, k, v, a, b, _ = make_inputs(1, 2, 20, 16, torch.float32)

    def loss(q, k, v, a, b):
        return kernels.attention(q, k, v, a, b, causal=True, backend=backend).square().sum()

    assert torch._dynamo.explain(loss)(q, k, v, a, b).graph_break_count == 0
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, a, b), (q, k, v, a, b))
    eager = torch.autograd.grad(loss(q, k, v, a, b), (q, k, v, a, b))
    for x, y in zip(got, eager, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")),
    reason="inductor's CPU backend needs a C++ compiler",
)
@pytest.mark.parametrize("prepared", [False, True], ids=["unprepared", "prepared"])
def test_compile_caches_keep_a_graph_that_chooses_sdpa_backends(prepared, tmp_path, monkeypatch):
    """`sdpa_kernel` inside a compiled step leaves calls of private torch functions in its graph, which
    AOTAutograd's cache refuses unless kernels.prepare (run before a model is compiled) marked them: a
    second process, here a second compilation after dynamo's reset, then loads the graph instead of
    tracing its joint graph again."""
    from torch._dynamo.utils import counters
    from torch._inductor import config, cpu_vec_isa
    from torch.nn.attention import SDPBackend

    from kernels.sdpa_aug import sdpa_attention

    def step(q, k, v, a):
        return sdpa_attention(q, k, v, a, None, backends=[SDPBackend.MATH]).square().sum()

    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    a = torch.full((2,), 0.5)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    # scalar C++ kernels compiled in this process: no build of a probe per vector ISA (17 s on a 2-core
    # machine) and no pool of compile workers to start; the caches checked here sit above the kernels' code
    quick_cpp = {"cpp.vec_isa_ok": False, "compile_threads": 1}
    probed = cpu_vec_isa.valid_vec_isa_list.cache_info().currsize
    try:
        with config.patch(unsafe_marked_cacheable_functions={}, **quick_cpp):
            if prepared:
                kernels.prepare(16, torch.device("cpu"))
            counters.clear()
            for _ in range(2):
                torch._dynamo.reset()
                torch.compile(step)(q, k, v, a).backward()
    finally:
        if not probed:  # the ISAs found with vec_isa_ok off are not the process's
            cpu_vec_isa.valid_vec_isa_list.cache_clear()
    aot = dict(counters["aot_autograd"])
    if prepared:
        assert aot.get("autograd_cache_hit") == 1 and not aot.get("autograd_cache_bypass")
    else:
        assert aot.get("autograd_cache_bypass") == 2 and not aot.get("autograd_cache_hit")
