"""The fused LM-head cross-entropy (kernels/linear_ce.py) against float64 math.

The Triton kernel runs on CPU under TRITON_INTERPRET=1, which must be on before triton is imported:
`test_fused_loss_under_the_interpreter` reruns this file in a subprocess with it on. The `gpu` tests
check realistic shapes in bf16 and torch.compile on CUDA.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import beside
import pytest
import torch
from beside import INTERPRETED, interpreted_only
from torch.nn import functional as F

import kernels
from model import GPT, GPTConfig
from model.config import FUSED_LOSSES


def make(n, c, v, dtype, device="cpu", *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(v, c, generator=gen) * c**-0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(v, generator=gen) * 0.5).to(device, dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return h, w, b, targets


def reference(h, w, b, targets):
    """Loss and gradients (h, w, b) in float64, for an upstream gradient of 1.7."""
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    b64 = b.detach().double().requires_grad_() if b is not None else None
    logits = h64 @ w64.t() + (b64 if b64 is not None else 0.0)
    loss = F.cross_entropy(logits, targets)
    wrt = [t for t in (h64, w64, b64) if t is not None]
    return loss.detach(), torch.autograd.grad(loss * 1.7, wrt)


def fused(h, w, b, targets):
    loss = kernels.linear_cross_entropy(h, w, b, targets)
    wrt = [t for t in (h, w, b) if t is not None]
    return loss.detach(), torch.autograd.grad(loss * 1.7, wrt)


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@interpreted_only
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("n", "c", "v"), [(37, 16, 203), (8, 32, 64), (5, 24, 300)])
def test_interpreted_loss_and_gradients_match_float64(n, c, v, bias):
    h, w, b, targets = make(n, c, v, torch.float32, bias=bias, seed=n + v)
    loss, grads = fused(h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, ref_loss.item())
    assert len(grads) == len(ref_grads) == (3 if bias else 2)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        assert rel(got, want) < 1e-5


@interpreted_only
def test_interpreted_without_gradients_gives_the_same_loss():
    h, w, b, targets = make(19, 16, 150, torch.float32)
    with torch.no_grad():
        no_grad = kernels.linear_cross_entropy(h, w, b, targets)
    assert not no_grad.requires_grad
    assert abs(no_grad.item() - reference(h, w, b, targets)[0].item()) < 1e-5


@interpreted_only
@pytest.mark.parametrize("fused_loss", list(FUSED_LOSSES))
def test_interpreted_model_fused_loss_matches_plain(fused_loss):
    cfg = GPTConfig(vocab_size=211, n_layers=1, d_model=32, n_heads=2, context=12, metric="rbf", registers=1)
    idx = torch.randint(0, 211, (3, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for loss in ("plain", fused_loss):
        torch.manual_seed(3)
        model = GPT(cfg)
        value = model(idx, idx.roll(1, dims=1), loss=loss)
        value.backward()
        out[loss] = (value.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(out["plain"][0] - out[fused_loss][0]) < 1e-5
    for name, grad in out["plain"][1].items():
        assert rel(out[fused_loss][1][name], grad.double()) < 1e-4, name


@interpreted_only
def test_interpreted_evaluation_on_the_fused_path_gives_the_plain_loss(tmp_path, monkeypatch):
    """Evaluation takes the training step's loss path (no float32 log-softmax of every logit on CUDA);
    the validation loss is the plain path's."""
    from ablate.config import RunConfig, from_dict
    from ablate.data import prepare, val_batches
    from ablate.train import evaluate

    tree = {
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context": 16, "metric": "rbf"},
        "data": {"source": "random:97", "val_tokens": 200, "cache_dir": str(tmp_path)},
        "train": {"batch_size": 3, "device": "cpu"},
    }
    cfg = from_dict(RunConfig, tree)
    data = prepare(cfg.data, cfg.model.context)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**tree["model"], "vocab_size": data.vocab_size}))
    calls = []
    fused = kernels.linear_cross_entropy
    monkeypatch.setattr(kernels, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    got = {
        loss: evaluate(model, data, cfg, torch.device("cpu"), contextlib.nullcontext(), loss)
        for loss in ("plain", "fused")
    }
    assert len(calls) == len(list(val_batches(data, 3, device=torch.device("cpu"))))  # once a batch
    assert got["fused"]["val/loss"] == pytest.approx(got["plain"]["val/loss"], rel=1e-5)
    assert got["fused"] == pytest.approx(got["plain"], rel=1e-5)  # diagnostics too
    assert model.training  # evaluation hands the model back in training mode


@interpreted_only
def test_interpreted_target_out_of_range_is_nan_not_a_stray_read():
    h, w, b, targets = make(6, 16, 40, torch.float32)
    targets[2] = -1
    targets[4] = 40
    assert torch.isnan(kernels.linear_cross_entropy(h, w, b, targets))


# ----------------------------------------------------------------------------------------------------
# the fused op's other schedules (kernels/linear_ce.py). Interpreter sizes: "persistent" runs 3 programs
# that walk the rows in 64-wide tiles; "epilogue" makes Z in 16 x 16 tiles of the logits matmul, so
# V = 203 and 300 end in ragged tiles. "persistent-bias-apart" adds the bias in the row kernel and sums
# db from G instead of the dW matmul.

SCHEDULE_CASES = {
    "persistent": ("persistent", {}),
    "persistent-bias-apart": ("persistent", {"BIAS_IN_MATMUL": False, "DB_IN_DW_MATMUL": False}),
    "epilogue": ("epilogue", {}),
}


@pytest.fixture(params=list(SCHEDULE_CASES))
def case(request):
    return request.param


@contextlib.contextmanager
def knobs_of(case: str):
    """The fused op's knobs at the case's values for the duration (the shipped ones after); its schedule."""
    from kernels import linear_ce

    schedule, knobs = SCHEDULE_CASES[case]
    with pytest.MonkeyPatch.context() as patch:
        for knob, value in knobs.items():
            patch.setattr(linear_ce, knob, value)
        yield schedule


def scheduled(case, h, w, b, targets):
    """Loss and gradients (for an upstream 1.7) of the fused op in this case; `fused` is the shipped path."""
    with knobs_of(case) as schedule:
        loss = kernels.linear_cross_entropy(h, w, b, targets, schedule=schedule)
        wrt = [t for t in (h, w, b) if t is not None]
        return loss.detach(), torch.autograd.grad(loss * 1.7, wrt)


@interpreted_only
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("n", "c", "v"), [(37, 16, 203), (5, 24, 300)])
def test_interpreted_schedules_match_float64_and_rows(case, n, c, v, bias):
    h, w, b, targets = make(n, c, v, torch.float32, bias=bias, seed=n + v)
    loss, grads = scheduled(case, h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    rows_loss, rows_grads = fused(h, w, b, targets)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, ref_loss.item())
    assert abs(loss.item() - rows_loss.item()) < 1e-5 * max(1.0, ref_loss.item())
    assert len(grads) == len(ref_grads) == (3 if bias else 2)
    for got, want, rows in zip(grads, ref_grads, rows_grads, strict=True):
        assert got.dtype == torch.float32
        assert rel(got, want) < 1e-5
        assert rel(got, rows.double()) < 1e-5


@interpreted_only
def test_interpreted_schedules_in_bf16_match_float64_and_rows(exact_bf16_dot, case):
    # 3 row tiles (a whole group of 2 and a ragged one), 2 K tiles, V ragged in 64- and 16-wide tiles
    h, w, b, targets = make(33, 32, 150, torch.bfloat16, seed=4)
    loss, grads = scheduled(case, h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    rows_loss, rows_grads = fused(h, w, b, targets)
    loss_tol, grad_tol = TILED_TOLERANCE[torch.bfloat16]
    assert abs(loss.item() - ref_loss.item()) < loss_tol * ref_loss.item()
    assert abs(loss.item() - rows_loss.item()) < loss_tol * ref_loss.item()
    for got, want, rows in zip(grads, ref_grads, rows_grads, strict=True):
        assert got.dtype == torch.bfloat16
        assert rel(got, want) < grad_tol
        assert rel(got, rows.double()) < grad_tol


@interpreted_only
def test_interpreted_schedules_without_gradients_and_bad_targets(case):
    h, w, b, targets = make(19, 16, 150, torch.float32)
    with knobs_of(case) as schedule:
        with torch.no_grad():
            no_grad = kernels.linear_cross_entropy(h, w, b, targets, schedule=schedule)
        assert not no_grad.requires_grad
        assert abs(no_grad.item() - reference(h, w, b, targets)[0].item()) < 1e-5
        targets[2], targets[4] = -1, 150
        assert torch.isnan(kernels.linear_cross_entropy(h, w, b, targets, schedule=schedule))


@interpreted_only
def test_interpreted_schedule_compiles_without_graph_breaks(case):
    h, w, b, targets = make(9, 16, 50, torch.float32, seed=2)
    with knobs_of(case) as schedule:

        def step(h, w, b, targets):
            return kernels.linear_cross_entropy(h, w, b, targets, schedule=schedule) * 1.7

        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # also traces the fake kernel
        loss = compiled(h, w, b, targets)
        grads = torch.autograd.grad(loss, (h, w, b))
    ref_loss, ref_grads = scheduled(case, h, w, b, targets)
    assert abs(loss.item() / 1.7 - ref_loss.item()) < 1e-6
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want)


@interpreted_only
def test_interpreted_bench_loss_rows_compute_the_fused_loss():
    """Each fused row of `python -m kernels.bench_loss` runs with its knobs and gives the same loss."""
    from kernels import bench_loss, linear_ce, logits_matmul

    shipped = vars(linear_ce).copy(), vars(logits_matmul).copy()
    rows = bench_loss.candidates(
        [(32, 2)], [(64, 2, 1), (32, 1, 2)], [16, 32], ("fused", "persistent", "epilogue")
    )
    assert list(rows) == [
        "fused 32/2",
        "persistent 64/2/1",
        "persistent 64/2/1 b in rows",
        "persistent 64/2/1 db apart",
        "persistent 32/1/2",
        "epilogue 16",
        "epilogue 32",
    ]
    h, w, b, targets = make(7, 16, 70, torch.float32, seed=9)
    ref_loss = reference(h, w, b, targets)[0].item()
    for name, (loss_fn, context) in rows.items():
        with context():
            assert abs(loss_fn(h, w, b, targets).item() - ref_loss) < 1e-5, name
    assert (vars(linear_ce), vars(logits_matmul)) == shipped  # every knob back at its shipped value


@interpreted_only
def test_interpreted_bench_loss_row_passes_write_the_loss_and_gradient():
    """`python -m kernels.bench_loss --row-passes`: each row kernel it times, at its knobs, writes each
    row's loss and G = softmax - onehot over the logits (zeros in the padding), and the table divides
    by the in-place floor."""
    from kernels import bench_loss, linear_ce

    knobs = ("BLOCK_V", "NUM_WARPS", "PERSISTENT_BLOCK_V", "PERSISTENT_NUM_WARPS", "PROGRAMS_PER_SM")
    shipped = {k: getattr(linear_ce, k) for k in knobs}
    passes = bench_loss.row_pass_candidates([(32, 2), (64, 1)], [(32, 1, 2)])
    assert list(passes) == ["floor: in-place mul_", "rows 32/2", "rows 64/1", "persistent 32/1/2"]
    n, v = 5, 70
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(n, 128, generator=gen).bfloat16()
    targets = torch.randint(0, v, (n,), generator=gen)
    z64 = logits[:, :v].double()
    lse = torch.logsumexp(z64, dim=1)
    want_g = torch.zeros(n, 128, dtype=torch.float64)
    want_g[:, :v] = torch.softmax(z64, dim=1) - F.one_hot(targets, v)
    for name, (pass_fn, context) in list(passes.items())[1:]:
        z, losses = logits.clone(), torch.empty(n)
        with context():
            pass_fn(z, targets, losses, v)
        assert torch.allclose(losses.double(), lse - z64[torch.arange(n), targets], atol=1e-5), name
        assert (z.double() - want_g).abs().max() < 1e-2, name  # G in bf16
    assert {k: getattr(linear_ce, k) for k in knobs} == shipped  # every knob back at its shipped value

    calls = []

    def bench(fn):  # the pass with the copy costs 3, the copy alone 1
        calls.append(fn())
        return 3.0 if len(calls) % 2 else 1.0

    rows = [
        bench_loss.measure_row_pass(name, *passes[name], 4, 70, device="cpu", bench=bench)
        for name in ("floor: in-place mul_", "rows 32/2")
    ]
    assert [r["ms"] for r in rows] == [2.0, 2.0]  # the copy's time taken out
    rows.append(dict(row_pass="rows 9/9", tokens=4, vocab=70, error="ValueError: no"))
    assert bench_loss.row_pass_markdown(rows).splitlines()[2:] == [
        "| 70 | floor: in-place mul_ | 2.000 | 1.00 |",
        "| 70 | rows 32/2 | 2.000 | 1.00 |",
        "| 70 | rows 9/9 | ValueError: no | |",
    ]


def test_unknown_schedule_is_named():
    h, w, b, targets = make(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"schedule='fast'; choose one of .*persistent"):
        kernels.linear_cross_entropy(h, w, b, targets, schedule="fast")


# ----------------------------------------------------------------------------------------------------
# the tiled loss (kernels/linear_ce_tiled.py): interpreter tiles are 16 x 16, K tiles 16 wide and vocab
# chunks of 32, so D = 40 takes the K loop and the split dh/dW columns, V = 257 ends in ragged tiles


TILED_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-3, 1e-2)}  # (loss, gradients), relative


@pytest.fixture
def exact_bf16_dot(monkeypatch):
    """The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits (Triton 3.9): widen
    them to float32 first, which is what the tensor cores compute (bf16 products are exact in float32)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    plain_dot = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return plain_dot(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)


def tiled(h, w, b, targets):
    loss = kernels.linear_cross_entropy_tiled(h, w, b, targets)
    wrt = [t for t in (h, w, b) if t is not None]
    return loss.detach(), torch.autograd.grad(loss * 1.7, wrt)


# rows n (one, ragged, several row tiles), hidden size c (a power of two or not), vocabulary v (one tile or
# several, ragged), dtype and bias: every pair of two factors' levels appears in some case (a pairwise
# design: 6 cases where the full cross has 48, most of the interpreter's time in this file)
TILED_CASES = [
    (1, 16, 50, torch.float32, False),
    (1, 40, 257, torch.bfloat16, True),
    (7, 16, 257, torch.float32, True),
    (7, 40, 50, torch.bfloat16, False),
    (64, 16, 257, torch.bfloat16, False),
    (64, 40, 50, torch.float32, True),
]


@interpreted_only
@pytest.mark.parametrize(("n", "c", "v", "dtype", "bias"), TILED_CASES)
def test_interpreted_tiled_loss_and_gradients_match_float64(exact_bf16_dot, n, c, v, dtype, bias):
    h, w, b, targets = make(n, c, v, dtype, bias=bias, seed=n * c + v)
    loss, grads = tiled(h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    loss_tol, grad_tol = TILED_TOLERANCE[dtype]
    assert abs(loss.item() - ref_loss.item()) < loss_tol * max(1.0, ref_loss.item())
    assert len(grads) == len(ref_grads) == (3 if bias else 2)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert rel(got, want) < grad_tol


@interpreted_only
def test_interpreted_tiled_per_row_gradients_match_float64():
    """The backward takes one upstream gradient per row (here not the mean's 1/N), bias or not."""
    from kernels.linear_ce_tiled import _tiled_fwd_op

    for bias in (True, False):
        h, w, b, targets = make(23, 40, 70, torch.float32, bias=bias, seed=5)
        weights = torch.rand(23, generator=torch.Generator().manual_seed(6)) - 0.3
        rows, lse = _tiled_fwd_op(h, w, b, targets)
        wrt = [t for t in (h, w, b) if t is not None]
        grads = torch.autograd.grad((rows * weights).sum(), wrt)
        wrt64 = [t.detach().double().requires_grad_() for t in wrt]
        logits = wrt64[0] @ wrt64[1].t() + (wrt64[2] if bias else 0.0)
        ref_rows = F.cross_entropy(logits, targets, reduction="none")
        assert torch.allclose(rows.double(), ref_rows, rtol=1e-5, atol=1e-6)
        assert torch.allclose(lse.double(), logits.logsumexp(dim=1), rtol=1e-5, atol=1e-6)
        ref_grads = torch.autograd.grad((ref_rows * weights.double()).sum(), wrt64)
        for got, want in zip(grads, ref_grads, strict=True):
            assert rel(got, want) < 1e-5


@interpreted_only
def test_interpreted_tiled_matches_the_fused_loss():
    # tiled: two row chunks (the second ragged), the K loop, V in several vocab chunks, the last ragged;
    # fused: each row in two 128-wide tiles, the second ragged
    h, w, b, targets = make(33, 24, 150, torch.float32, seed=8)
    loss, grads = tiled(h, w, b, targets)
    fused_loss, fused_grads = fused(h, w, b, targets)
    assert abs(loss.item() - fused_loss.item()) < 1e-5
    for got, want in zip(grads, fused_grads, strict=True):
        assert rel(got, want.double()) < 1e-5


@interpreted_only
def test_interpreted_tiled_without_gradients_and_bad_targets():
    h, w, b, targets = make(19, 16, 150, torch.float32)
    with torch.no_grad():
        no_grad = kernels.linear_cross_entropy_tiled(h, w, b, targets)
    assert not no_grad.requires_grad
    assert abs(no_grad.item() - reference(h, w, b, targets)[0].item()) < 1e-5
    targets[2], targets[4] = -1, 150
    assert torch.isnan(kernels.linear_cross_entropy_tiled(h, w, b, targets))


@interpreted_only
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # aot_eager also traces the fake kernels
def test_interpreted_tiled_compiles_without_graph_breaks(backend):
    h, w, b, targets = make(9, 16, 50, torch.float32, seed=2)

    def step(h, w, b, targets):
        return kernels.linear_cross_entropy_tiled(h, w, b, targets) * 1.7

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    loss = compiled(h, w, b, targets)
    grads = torch.autograd.grad(loss, (h, w, b))
    ref_loss, ref_grads = tiled(h, w, b, targets)
    assert abs(loss.item() / 1.7 - ref_loss.item()) < 1e-6
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want)


def test_tiled_loss_names_a_bad_shape():
    h, w, b, targets = make(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="linear_cross_entropy_tiled: need h"):
        kernels.linear_cross_entropy_tiled(h, w[:, :4], b, targets)


def test_fused_loss_under_the_interpreter():
    run = beside.result(Path(__file__), "interpreted")  # started when collection ended (tests/beside.py)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "46 passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fused_loss_on_cpu_says_it_needs_cuda():
    h, w, b, targets = make(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.linear_cross_entropy(h, w, b, targets)


def test_unknown_loss_is_named():
    model = GPT(GPTConfig(vocab_size=16, n_layers=1, d_model=16, n_heads=2, context=4))
    with pytest.raises(ValueError, match="loss='fancy'"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), loss="fancy")


# ----------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("n", "v"), [(4096, 50257), (1000, 3001)])
def test_bf16_on_cuda_matches_float64(n, v, bias):
    h, w, b, targets = make(n, 256, v, torch.bfloat16, "cuda", bias=bias, seed=torch.seed() % 2**31)
    loss, grads = fused(h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.bfloat16
        assert rel(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fused_loss", list(FUSED_LOSSES))
def test_compiled_model_with_fused_loss_has_no_graph_breaks_and_matches_plain(fused_loss):
    cfg = GPTConfig(vocab_size=50257, n_layers=2, d_model=256, n_heads=4, context=256, metric="penalty")
    idx = torch.randint(0, 50257, (8, 256), device="cuda")
    targets = idx.roll(1, dims=1)
    torch.manual_seed(0)
    model = GPT(cfg).cuda()

    def step(loss):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(idx, targets, loss=loss)

    assert torch._dynamo.explain(step)(fused_loss).graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    grads = {}
    for loss, fn in (("plain", step), (fused_loss, compiled)):
        model.zero_grad(set_to_none=True)
        value = fn(loss)
        value.backward()
        grads[loss] = (value.item(), [p.grad.double() for p in model.parameters()])
    assert abs(grads["plain"][0] - grads[fused_loss][0]) < 2e-3 * grads["plain"][0]
    for got, want in zip(grads[fused_loss][1], grads["plain"][1], strict=True):
        assert rel(got, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n", "v", "bias", "dtype"),  # each dtype with and without a bias, V in ragged tiles
    [
        (4096, 50257, True, torch.bfloat16),
        (4096, 50257, False, torch.float16),
        (1000, 3001, False, torch.bfloat16),
        (1000, 3001, True, torch.float16),
    ],
    ids=["50257-bias-bf16", "50257-fp16", "3001-bf16", "3001-bias-fp16"],
)
def test_schedules_on_cuda_match_float64_and_rows(case, n, v, bias, dtype):
    h, w, b, targets = make(n, 256, v, dtype, "cuda", bias=bias, seed=torch.seed() % 2**31)
    loss, grads = scheduled(case, h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    rows_loss, rows_grads = fused(h, w, b, targets)
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    assert abs(loss.item() - rows_loss.item()) < 1e-3 * ref_loss.item()
    for got, want, rows in zip(grads, ref_grads, rows_grads, strict=True):
        assert got.dtype == dtype
        assert rel(got, want) < 1e-2
        assert rel(got, rows.double()) < 1e-2


@pytest.mark.gpu
def test_schedules_replay_as_a_cuda_graph(case):
    h, w, b, targets = make(4096, 256, 50257, torch.bfloat16, "cuda", seed=3)
    params = [h, w, b]

    def step(schedule):
        loss = kernels.linear_cross_entropy(h, w, b, targets, schedule=schedule)
        return (loss, *torch.autograd.grad(loss, params))

    with knobs_of(case) as schedule:
        step(schedule)  # compile and autotune before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = step(schedule)
        for seed in (4, 5):  # new inputs in the captured buffers: the replay must compute with them
            h2, w2, b2, targets2 = make(4096, 256, 50257, torch.bfloat16, "cuda", seed=seed)
            for buffer, new in zip((h, w, b, targets), (h2, w2, b2, targets2), strict=True):
                buffer.data.copy_(new)
            eager = step(schedule)
            graph.replay()
            torch.cuda.synchronize()
            for got, want in zip(graphed, eager, strict=True):
                assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("v", [8192, 50257])
def test_tiled_bf16_at_the_seed_size_matches_float64_fused_and_plain(v):
    h, w, b, targets = make(16384, 256, v, torch.bfloat16, "cuda", seed=torch.seed() % 2**31)
    loss, grads = tiled(h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    plain = F.cross_entropy((h @ w.t() + b).float(), targets)  # the model's loss "plain"
    others = {
        "fused": fused(h, w, b, targets),
        "plain": (plain.detach(), torch.autograd.grad(plain * 1.7, (h, w, b))),
    }
    loss_tol, grad_tol = TILED_TOLERANCE[torch.bfloat16]
    assert abs(loss.item() - ref_loss.item()) < loss_tol * ref_loss.item()
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.bfloat16
        assert rel(got, want) < grad_tol
    for name, (other_loss, other_grads) in others.items():
        assert abs(loss.item() - other_loss.item()) < loss_tol * ref_loss.item(), name
        for got, other in zip(grads, other_grads, strict=True):
            assert rel(got, other.double()) < grad_tol, name


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n", "c", "v", "dtype"), [(1000, 1024, 3001, torch.bfloat16), (300, 600, 777, torch.float32)]
)
def test_tiled_wide_hidden_size_on_cuda_matches_float64(n, c, v, dtype):
    """D over 256 loops over K tiles and splits dh and dW into column blocks."""
    h, w, b, targets = make(n, c, v, dtype, "cuda", seed=c)
    loss, grads = tiled(h, w, b, targets)
    ref_loss, ref_grads = reference(h, w, b, targets)
    loss_tol, grad_tol = TILED_TOLERANCE[dtype]
    assert abs(loss.item() - ref_loss.item()) < loss_tol * ref_loss.item()
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel(got, want) < grad_tol


@pytest.mark.gpu
def test_tiled_replays_as_a_cuda_graph():
    h, w, b, targets = make(4096, 256, 8192, torch.bfloat16, "cuda", seed=3)
    params = [h, w, b]

    def step():
        for t in params:
            t.grad = None
        kernels.linear_cross_entropy_tiled(h, w, b, targets).backward()

    step()  # autotune before capture
    eager = [t.grad.clone() for t in params]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = kernels.linear_cross_entropy_tiled(h, w, b, targets)
        grads = torch.autograd.grad(loss, params)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(grads, eager, strict=True):
        assert torch.equal(got, want)


def test_bench_loss_table_leaves_a_ratio_blank_when_its_baseline_did_not_run():
    from kernels.bench_loss import add_ratios, markdown

    rows = [
        {"vocab": 64, "loss_fn": "fused 1024/4", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "peak_mib": 3, "loss": 4.1}
    ]
    add_ratios(rows)
    assert markdown(rows).splitlines()[-1] == "| 64 | fused 1024/4 | 1.000 | 2.000 | 3 | - | - |"
    rows += [
        {"vocab": 64, "loss_fn": "plain", "fwd_ms": 2.0, "fwd_bwd_ms": 4.0, "peak_mib": 9, "loss": 4.0},
        {
            "vocab": 64,
            "loss_fn": "plain-compiled",
            "fwd_ms": 1.0,
            "fwd_bwd_ms": 2.5,
            "peak_mib": 9,
            "loss": 4.0,
        },
    ]
    add_ratios(rows)
    assert markdown(rows).splitlines()[2] == "| 64 | fused 1024/4 | 1.000 | 2.000 | 3 | +1.0e-01 | 0.800 |"
