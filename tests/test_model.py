"""The model computes the geometries of README (The model) exactly, is causal, and trains."""

import math

import pytest
import torch
from torch.nn import functional as F

import kernels
from model import GPT, GPTConfig
from model.positions import RoPE, SuSiE
from model.schedules import scheduled_value

METRICS = ["sdpa", "rbf", "penalty"]
POSITIONS = ["rope", "susie", "none"]


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=37, n_layers=2, d_model=32, n_heads=2, context=12)
    return GPTConfig(**{**base, **overrides})


def explicit_rbf(q, k, v, gamma):
    d2 = ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)  # (B, H, N, N)
    n = q.shape[-2]
    scores = (-gamma * d2).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ v


def qkv_of(attn, x):
    B, T, _ = x.shape
    q, k, v = attn.qkv(x).view(B, T, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v


def test_kernel_rbf_matches_explicit_distance_in_float64():
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([0.3, 0.5, 0.125], dtype=torch.float64)
    out = kernels.attention(q, k, v, 2 * gamma, gamma, causal=True)
    ref = explicit_rbf(q, k, v, gamma.view(1, 3, 1, 1))
    assert out.dtype == torch.float64
    assert (out - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("metric", METRICS)
def test_model_attention_scores_follow_design(metric):
    torch.manual_seed(0)
    cfg = tiny(metric=metric, position="none", gamma=0.4, lam=0.15)
    attn = GPT(cfg).double().blocks[0].attn
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    q, k, v = qkv_of(attn, x)
    y = attn(x)
    if metric == "rbf":
        ref = explicit_rbf(q, k, v, 0.4)
    elif metric == "sdpa":
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4)
    else:
        scores = 0.4 * q @ k.transpose(-1, -2) - 0.15 * (k**2).sum(-1)[..., None, :]
        scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
        ref = torch.softmax(scores, -1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 7, 32))
    assert (y - ref).abs().max().item() <= 1e-10


def test_penalty_at_half_gamma_equals_rbf_at_half_gamma():
    idx = torch.randint(0, 37, (2, 12))
    torch.manual_seed(1)
    penalty = GPT(tiny(metric="penalty", gamma=0.5)).double()  # lam defaults to gamma/2
    torch.manual_seed(1)
    rbf = GPT(tiny(metric="rbf", gamma=0.25)).double()
    assert torch.allclose(penalty(idx), rbf(idx), atol=1e-10, rtol=0)


def test_default_gamma_and_lambda():
    cfg = tiny(metric="penalty")
    assert cfg.gamma0 == pytest.approx(1 / math.sqrt(16))
    assert cfg.lam0 == pytest.approx(cfg.gamma0 / 2)
    assert tiny(gamma_scale=2.0).gamma0 == pytest.approx(2 / math.sqrt(16))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("position", POSITIONS)
def test_causal_no_logit_before_t_depends_on_token_t(metric, position):
    torch.manual_seed(2)
    model = GPT(tiny(metric=metric, position=position, registers=2, register_init="normal")).double()
    idx = torch.randint(0, 37, (1, 12))
    changed = idx.clone()
    t = 6
    changed[0, t] = (idx[0, t] + 1) % 37
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


def test_rope_scores_depend_only_on_relative_position():
    rope = RoPE(head_dim=8, context=32, n_registers=0).double()
    q0, k0 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    q = q0.expand(1, 1, 32, 8).clone()
    k = k0.expand(1, 1, 32, 8).clone()
    qr, kr = rope(q, k)
    scores = qr[0, 0] @ kr[0, 0].T  # (32, 32)
    for offset in (-5, 0, 3, 11):
        diag = torch.diagonal(scores, offset=offset)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-12)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])


def test_rope_leaves_registers_unrotated():
    rope = RoPE(head_dim=8, context=16, n_registers=2)
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    qr, kr = rope(q, k)
    assert torch.equal(qr[:, :, :2], q[:, :, :2]) and torch.equal(kr[:, :, :2], k[:, :, :2])
    assert torch.allclose(qr[:, :, 2], q[:, :, 2])  # text position 0: angle 0
    assert not torch.allclose(qr[:, :, 3], q[:, :, 3])


def test_susie_matches_its_definition():
    susie = SuSiE(n_heads=2, head_dim=8, dims=8, context=16, n_registers=1)
    assert torch.equal(susie.weight, torch.full((2, 4), 0.5)) and susie.weight.requires_grad
    table = susie.table(5)  # (H, T, D)
    t = torch.arange(5.0)[:, None]
    omega = 10000 ** (-2 * torch.arange(4.0) / 8)
    expected = torch.cat((0.5 * torch.sin(t * omega), 0.5 * torch.cos(t * omega)), dim=-1)
    assert torch.allclose(table[0], expected, atol=1e-6)
    q, k = torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
    qs, ks = susie(q, k)
    assert torch.equal(qs, ks)
    assert torch.allclose(qs[0, :, 0], susie.register_pos)  # the register gets its own learned vector
    assert torch.allclose(qs[0, :, 1:], table, atol=1e-6)


def test_susie_subspace_leaves_other_dims_alone():
    cfg = tiny(position="susie", susie_dims=6)
    susie = GPT(cfg).blocks[0].attn.position
    table = susie.table(4)
    assert table.shape == (2, 4, 16) and torch.count_nonzero(table[..., 6:]) == 0


def test_none_adds_no_positional_parameters():
    names = {n for n, _ in GPT(tiny(position="none")).named_parameters()}
    rope_names = {n for n, _ in GPT(tiny(position="rope")).named_parameters()}
    assert names == rope_names and not any("position" in n for n in names)
    susie_names = {n for n, _ in GPT(tiny(position="susie")).named_parameters()}
    assert any("position" in n for n in susie_names - names)


def test_registers_zero_init_excluded_from_output_and_receive_gradients():
    torch.manual_seed(3)
    model = GPT(tiny(registers=2))
    assert torch.count_nonzero(model.registers) == 0
    idx = torch.randint(0, 37, (3, 12))
    logits = model(idx)
    assert logits.shape == (3, 12, 37)  # one output per text token, none for registers
    loss = model(idx, idx)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), idx.flatten()))
    loss.backward()
    assert model.registers.grad is not None and model.registers.grad.abs().sum() > 0


def test_normal_register_init_is_small_and_random():
    model = GPT(tiny(registers=4, register_init="normal"))
    assert torch.count_nonzero(model.registers) == model.registers.numel()
    assert model.registers.std().item() < 1.0


@pytest.mark.parametrize("metric", ["sdpa", "rbf", "penalty"])
def test_learnable_gamma_and_lambda_receive_gradients(metric):
    model = GPT(tiny(metric=metric, gamma_schedule="learnable", lam_schedule="learnable"))
    idx = torch.randint(0, 37, (2, 12))
    model(idx, idx).backward()
    temp = model.blocks[0].attn.temperature
    assert temp.gamma.log_value.grad is not None and temp.gamma.log_value.grad.abs().sum() > 0
    if metric == "penalty":
        assert temp.lam.log_value.grad.abs().sum() > 0
    assert torch.allclose(temp.gamma(), torch.full((2,), model.cfg.gamma0))


def test_schedules_give_specified_values():
    assert scheduled_value("constant", 2.0, 5, warmup_steps=10, start_frac=0.1) == 2.0
    assert scheduled_value("warmup", 2.0, 0, warmup_steps=10, start_frac=0.1) == pytest.approx(0.2)
    assert scheduled_value("warmup", 2.0, 5, warmup_steps=10, start_frac=0.1) == pytest.approx(1.1)
    assert scheduled_value("warmup", 2.0, 10, warmup_steps=10, start_frac=0.1) == 2.0
    assert scheduled_value("cosine", 2.0, 5, warmup_steps=10, start_frac=0.1) == pytest.approx(1.1)
    assert scheduled_value("cosine", 2.0, 2, warmup_steps=10, start_frac=0.0) == pytest.approx(
        2.0 * 0.5 * (1 - math.cos(math.pi * 0.2))
    )
    model = GPT(
        tiny(metric="penalty", gamma=1.0, gamma_schedule="warmup", gamma_warmup_steps=4, gamma_start_frac=0.5)
    )
    model.set_step(2)
    temps = model.temperatures()
    assert torch.allclose(temps["gamma"].float(), torch.full((2, 2), 0.75))
    assert torch.allclose(temps["lam"].float(), torch.full((2, 2), 0.375))  # tied: follows gamma


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_tiny_model(metric):
    torch.manual_seed(4)
    cfg = tiny(
        metric=metric,
        n_layers=1,
        d_model=8,
        n_heads=2,
        context=5,
        position="susie",
        registers=1,
        register_init="normal",
        gamma_schedule="learnable",
    )
    block = GPT(cfg).double().blocks[0]
    names = [n for n, p in block.named_parameters() if n.endswith(("log_value", "qkv.weight", "weight"))][:4]
    params = {n: p.detach().clone().requires_grad_() for n, p in block.named_parameters() if n in names}
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)

    def fn(x, *values):
        return torch.func.functional_call(block, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("position", POSITIONS)
def test_loss_falls_on_generated_data(metric, position):
    torch.manual_seed(5)
    model = GPT(tiny(metric=metric, position=position, registers=1))
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 37, (64, 1), generator=gen)
    data = (starts + torch.arange(13)) % 37  # each sequence counts upward: learnable from position 1 on
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = data[(step * 16) % 64 : (step * 16) % 64 + 16]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_config_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="choose one of"):
        tiny(metric="cosine")
    with pytest.raises(ValueError, match="divisible"):
        tiny(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="registers"):
        tiny(registers=-1)


def test_param_count_and_flops():
    model = GPT(GPTConfig(vocab_size=50257, n_layers=4, d_model=256, n_heads=4, context=256))
    n = model.num_params()
    assert 28e6 < n < 30e6  # the published seed model: about 28.9M parameters
    assert model.flops_per_token() > 6 * (n - 50257 * 256)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_chunked_loss_matches_plain_loss_and_gradients(bias):
    torch.manual_seed(6)
    idx = torch.randint(0, 37, (3, 12))
    grads = []
    for loss, chunks in (("plain", 1), ("chunked", 5)):
        torch.manual_seed(7)
        model = GPT(tiny(bias=bias, registers=1)).double()
        loss = model(idx, idx.roll(1, dims=1), loss=loss, loss_chunks=chunks)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (fused, fused_grads) = grads
    assert torch.allclose(plain, fused, atol=1e-12, rtol=0)
    for a, b in zip(plain_grads, fused_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)
