"""A compact pre-LN GPT whose attention geometry, positions and registers are configuration."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import kernels
from model.config import FUSED_LOSSES, LOSSES, GPTConfig
from model.loss import linear_cross_entropy
from model.positions import make_position
from model.schedules import Temperature


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.backend = cfg.n_heads, cfg.head_dim, cfg.attn_backend
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.temperature = Temperature(cfg)
        self.position = make_position(cfg)
        self.capture: dict | None = None  # set by GPT.diagnostics to record keys and probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, D) each
        if self.position is not None:
            q, k = self.position(q, k)
        a, b = self.temperature()  # (H,), (H,) or None for sdpa
        if self.capture is not None:
            b = torch.zeros_like(a) if b is None else b
            y, probs = kernels.attention_reference(q, k, v, a, b, causal=True, return_probs=True)
            self.capture.update(keys=k.detach(), probs=probs.detach())
        else:
            y = kernels.attention(q, k, v, a, b, causal=True, backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model, bias=cfg.bias), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model, bias=cfg.bias), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token embedding -> [registers | text] -> blocks -> final norm (text only) -> LM head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.registers = None
        if cfg.registers:
            init = (
                torch.zeros if cfg.register_init == "zero" else lambda *s: torch.randn(*s) * cfg.d_model**-0.5
            )
            self.registers = nn.Parameter(init(cfg.registers, cfg.d_model))  # (R, C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)

    def prepare_kernels(self) -> None:
        """Build what the attention kernels keep per sequence length, for this model's full context on its
        device, outside any trace. Call it before torch.compile (ablate.train does): a compiled step then
        takes flex's causal block mask as it is instead of tracing and rebuilding it."""
        kernels.prepare(self.cfg.context + self.cfg.registers, self.head.weight.device)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of the text positions, (B, T, C)."""
        B, T = idx.shape
        if T > self.cfg.context:
            raise ValueError(f"sequence length {T} exceeds the model context {self.cfg.context}")
        x = self.embed(idx)  # (B, T, C)
        r = self.cfg.registers
        if r:
            x = torch.cat((self.registers.to(x.dtype).expand(B, -1, -1), x), dim=1)  # (B, R+T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x[:, r:])  # registers are sliced off before the final norm

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        loss: str = "plain",
        loss_chunks: int = 8,
    ):
        """Logits (B, T, V) without targets; the mean token cross-entropy with them.

        loss: "plain" (full logits, F.cross_entropy), "fused" (the head and the loss in one Triton
        op, kernels.linear_cross_entropy; CUDA only; "fused-persistent" and "fused-epilogue" are the
        same op with other kernel schedules, measured no faster) or "chunked" (pure torch, the head fused
        with the loss over `loss_chunks` token chunks, never holding all logits). Same value each way.
        """
        h = self.hidden(idx)
        if targets is None:
            return self.head(h)
        h, targets = h.flatten(0, 1), targets.flatten()
        if loss == "plain":
            logits = self.head(h)
            return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
        if loss in FUSED_LOSSES:
            if torch.is_autocast_enabled(h.device.type):
                h = h.to(torch.get_autocast_dtype(h.device.type))
            w, b = self.head.weight, self.head.bias
            return kernels.linear_cross_entropy(h, w, b, targets, schedule=FUSED_LOSSES[loss])
        if loss == "chunked":
            chunk = -(-h.shape[0] // loss_chunks)
            return linear_cross_entropy(h, self.head.weight, self.head.bias, targets, chunk)
        raise ValueError(f"loss={loss!r}; choose one of {list(LOSSES)}")

    def set_step(self, step: int) -> None:
        """Advance gamma/lambda schedules to a training step."""
        for block in self.blocks:
            block.attn.temperature.set_step(step)

    def temperatures(self) -> dict[str, torch.Tensor]:
        """Current gamma (and lambda for penalty) per layer and head, (L, H) each."""
        temps = [block.attn.temperature for block in self.blocks]
        out = {"gamma": torch.stack([t.gamma().detach() for t in temps])}
        if self.cfg.metric == "penalty":
            out["lam"] = torch.stack([t.lam_value().detach() for t in temps])
        return out

    def learned_temperatures(self) -> set[str]:
        """The names in `temperatures()` that training moves (learned, or tied to a learned gamma)."""
        learned = self.blocks[0].attn.temperature.learned()  # every layer has the same schedules
        return {name for name in self.temperatures() if learned[name]}

    def num_params(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per text token: 6 * (matmul params) + attention scores and values (fwd+bwd)."""
        cfg = self.cfg
        n_matmul = self.num_params(non_embedding=True)
        t = cfg.context + cfg.registers
        return 6.0 * n_matmul + 6.0 * cfg.n_layers * cfg.d_model * t  # causal: half of 12*L*C*T

    @torch.no_grad()
    def diagnostics(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer key-norm statistics, attention-sink mass and attention entropy for a batch, as float64
        0-d tensors on the model's device (the caller reads them at once: each read waits for the GPU)."""
        from model.diagnostics import summarize_layer

        was_training = self.training
        self.eval()
        captures = [{} for _ in self.blocks]
        for block, cap in zip(self.blocks, captures, strict=True):
            block.attn.capture = cap
        try:
            self.hidden(idx)
        finally:
            for block in self.blocks:
                block.attn.capture = None
            self.train(was_training)
        stats: dict[str, torch.Tensor] = {}
        for i, cap in enumerate(captures):
            for name, value in summarize_layer(cap["keys"], cap["probs"], self.cfg.registers).items():
                stats[f"{name}/layer{i}"] = value.double()
        for name in {key.split("/")[0] for key in stats}:
            layer_values = [v for key, v in stats.items() if key.split("/")[0] == name]
            stats[f"{name}/mean"] = torch.stack(layer_values).mean()
        return stats
