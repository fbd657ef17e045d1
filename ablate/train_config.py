"""Configuration of the optimiser and the training loop (the loop itself is in train.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from model.config import FUSED_LOSSES
from model.config import LOSSES as MODEL_LOSSES

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LOSSES = ("auto", *MODEL_LOSSES)  # auto: see train._auto_loss
# TrainConfig's settings that need compile: true (its validation refuses them without it)
COMPILE_ONLY = ("cuda_graphs", "reuse_compiled", "precompile", "compile_threads", "max_autotune")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr; a pure function of the step."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and embeddings; never on biases, norms, gamma/lambda
    grad_clip: float | None = 1.0  # None: no clipping

    def __post_init__(self) -> None:
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: budget, batch, evaluation cadence, device and precision, divergence bound."""

    tokens: int = 10_000_000  # training token budget (text tokens)
    batch_size: int = 64
    eval_every: int = 200  # steps between evaluations (and one at the end)
    eval_batches: int | None = None  # None: the whole fixed validation set
    diagnostics_batch: int = 8  # sequences used for the attention diagnostics at each evaluation
    log_every: int = 10  # steps between train-loss reports
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    compile: bool = False  # torch.compile the model (GPU)
    cuda_graphs: bool = False  # with compile: replay the forward and backward as CUDA graphs
    # with compile: keep the compiled step (dynamo's code, CUDA graphs) for this process's next trials of
    # the same model, which then skip the trace (ablate.train.keep_compiled); false: every trial starts
    # afresh; None (the default): on whenever compile is
    reuse_compiled: bool | None = None
    # with compile: save the compiled step once per model on this machine (in the compile cache) and load
    # it in every later trial of that model, which then skips dynamo's trace (ablate.precompiled); None
    # (the default): on whenever compile runs on CUDA (measured there: README, Precompiled steps), off on
    # CPU, where saving a step costs more than a trace and a run rarely meets its model again
    precompile: bool | None = None
    # with compile: inductor's compile worker processes in this trial's process (it loads compiled kernels
    # through them too); None: the process's setting as it is (torch's default, min(32, the CPUs the process
    # may use), unless an earlier trial in the process set one: it is a process-wide setting)
    compile_threads: int | None = None
    # with compile: inductor's max-autotune, which times its Triton matmul templates (with the following
    # pointwise ops fused into their epilogues) against cuBLAS for each matmul shape at the first compile
    # and keeps the choice in its on-disk caches; with cuda_graphs too, mode "max-autotune", else
    # "max-autotune-no-cudagraphs"
    max_autotune: bool = False
    loss: str = "auto"  # auto (the measured fastest; see train._auto_loss) or one of model.config.LOSSES
    loss_chunks: int = 8  # token chunks of the chunked loss
    diverge_loss: float | None = None  # a train loss above this is divergence; None: 2 * ln(vocab)
    threads: int | None = None  # CPU threads for torch; None: torch's default
    fault: str | None = None  # fault injection for tests: "nan@K" (NaN loss at step K) or "raise@K"

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "eval_every", "log_every", "diagnostics_batch", "loss_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_batches", "threads", "compile_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.diverge_loss is not None and not self.diverge_loss > 0:  # NaN fails too
            raise ValueError(
                f"diverge_loss must be a loss > 0 (or null for 2 ln(vocab)), got {self.diverge_loss}: "
                "a train loss above it stops the trial as diverged"
            )
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}; choose one of {list(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose one of {list(LOSSES)}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile: true (the graphs are captured by torch.compile)")
        if self.reuse_compiled is True and not self.compile:
            raise ValueError("reuse_compiled needs compile: true (it keeps what torch.compile made)")
        if self.precompile is True and not self.compile:
            raise ValueError("precompile needs compile: true (it saves what torch.compile made)")
        if self.compile_threads is not None and not self.compile:
            raise ValueError("compile_threads needs compile: true (they are torch.compile's workers)")
        if self.max_autotune and not self.compile:
            raise ValueError("max_autotune needs compile: true (it is a torch.compile mode)")
        if self.fault is not None:
            kind, _, at = self.fault.partition("@")
            if kind not in ("nan", "raise") or not at.isdigit():
                raise ValueError(f"fault={self.fault!r}; use 'nan@STEP' or 'raise@STEP'")

    @property
    def keeps_compiled(self) -> bool:
        """Whether a trial keeps its compiled step for the process's next trials (`reuse_compiled`)."""
        return self.compile and self.reuse_compiled is not False

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode for these settings (None: its default)."""
        if self.max_autotune:
            return "max-autotune" if self.cuda_graphs else "max-autotune-no-cudagraphs"
        return "reduce-overhead" if self.cuda_graphs else None

    def precompiles(self, device_type: str) -> bool:
        """Whether a trial on this kind of device loads (or compiles and saves) its step ahead of time."""
        return self.compile and (self.precompile if self.precompile is not None else device_type == "cuda")

    def cuda_only(self) -> list[str]:
        """The settings here that run only on CUDA, as 'key: value'."""
        needs = {
            "train.device: cuda": self.device == "cuda",
            f"train.loss: {self.loss}": self.loss in FUSED_LOSSES,
            "train.cuda_graphs: true": self.cuda_graphs,
        }
        return [setting for setting, needed in needs.items() if needed]

    def fault_at(self, kind: str) -> int | None:
        """The step at which fault `kind` is injected, or None."""
        if self.fault is None or not self.fault.startswith(kind + "@"):
            return None
        return int(self.fault.partition("@")[2])


def uncompiled() -> dict[str, Any]:
    """`train` settings that make a run eager: compile off, and each setting that needs it at its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {"compile": False, **{name: defaults[name] for name in COMPILE_ONLY}}
