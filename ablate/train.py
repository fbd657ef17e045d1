"""One trial: train a GPT on a token budget, evaluate, detect divergence, report through a logger.

The loop reads top to bottom in a fixed order: set lr and schedules -> evaluate -> step -> log.
Nothing here imports Ray or MLflow; callers pass a MetricLogger.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ablate import precompiled
from ablate.config import ConfigError, RunConfig, load_run_config, to_flat_dict
from ablate.data import PackedData, prepare, train_batches, val_batches
from ablate.logger import ConsoleLogger, MetricLogger, NullLogger
from ablate.responses import DIAGNOSTICS, TRAIN_LOSS_CURVE, VAL_LOSS_CURVE
from ablate.train_config import OptimConfig, TrainConfig
from model import GPT

# dense bf16 peak FLOP/s by device name, for MFU; unknown devices report no MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


@dataclass
class TrialResult:
    status: str  # "finished" or "diverged"
    steps: int
    tokens: int
    val_loss: float | None
    diverged_step: int | None = None
    summary: dict[str, float] = field(default_factory=dict)


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step: a pure function of the step."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(total_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / span, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Decay the matrices of linear layers and the embedding; not biases, norms, registers, gamma, SuSiE."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and not name.startswith("registers") and ".position." not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "is 'cuda' but no CUDA GPU is available; use auto or cpu")
    return torch.device(name)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_FLOPS.items() if key in name), None)


@torch.no_grad()
def evaluate(
    model: GPT, data: PackedData, cfg: RunConfig, device: torch.device, autocast, loss: str = "plain"
) -> dict[str, float]:
    """Token-weighted validation loss over the fixed validation set, plus attention diagnostics.

    `loss` is the training step's loss path: the same value, and on CUDA the fused one's forward (no
    gradient) never builds the float32 log-softmax of every logit that the plain loss does. The losses
    and diagnostics stay on the device until one transfer at the end: each read of a value waits for the
    GPU, which trials sharing it keep busy."""
    model.eval()
    total, count, first_x = torch.zeros((), dtype=torch.float64, device=device), 0, None
    for i, (x, y) in enumerate(val_batches(data, cfg.train.batch_size, device=device)):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        first_x = x if first_x is None else first_x
        with autocast:
            total += model(x, y, loss=loss, loss_chunks=cfg.train.loss_chunks).double() * y.numel()
        count += y.numel()
    with autocast:
        diag = model.diagnostics(first_x[: cfg.train.diagnostics_batch])
    model.train()
    values = torch.stack([total / count, *diag.values()]).tolist()
    return {VAL_LOSS_CURVE: values[0], **{f"diag/{k}": v for k, v in zip(diag, values[1:], strict=True)}}


def _setup(cfg: RunConfig, data: PackedData | None):
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    data = data if data is not None else prepare(cfg.data, cfg.model.context)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=data.vocab_size)  # the tokenizer sets the vocab
    torch.manual_seed(cfg.seed)  # initialisation; data order has its own generator
    model = GPT(model_cfg).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return device, data, model, autocast


def train(
    cfg: RunConfig, logger: MetricLogger | None = None, *, data: PackedData | None = None
) -> TrialResult:
    """Train one (configuration, seed) to its token budget; stop at divergence."""
    if not cfg.train.compile:
        return _train(cfg, logger or NullLogger(), data)
    if cfg.train.cuda_graphs:
        cudagraph_trees_for_this_thread()
    try:
        result = _train(cfg, logger or NullLogger(), data)
    except BaseException:
        forget_compiled(cfg.train.cuda_graphs)  # nothing of a failed step is kept
        raise
    if not cfg.train.keeps_compiled:
        release_trial_state(cfg.train.cuda_graphs)
    return result


def _train(cfg: RunConfig, logger: MetricLogger, data: PackedData | None) -> TrialResult:
    entered = time.perf_counter()
    device, data, model, autocast = _setup(cfg, data)
    tc, oc = cfg.train, cfg.optim
    tokens_per_step = tc.batch_size * cfg.model.context
    total_steps = max(1, math.ceil(tc.tokens / tokens_per_step))
    optimizer = torch.optim.AdamW(
        param_groups(model, oc.weight_decay),
        lr=oc.lr,
        betas=oc.betas,
        eps=oc.eps,
        fused=device.type == "cuda",
    )
    loss_kind = _loss_kind(device, tc)
    step_model = _compiled(model, tc, kept_key(model.cfg, tc, loss_kind)) if tc.compile else model
    compiled_before = compile_clock()  # after dynamo's reset, if any: it clears torch's totals
    bound = tc.diverge_loss if tc.diverge_loss is not None else 2.0 * math.log(data.vocab_size)
    flops_per_token, peak = model.flops_per_token(), peak_flops(device)
    logger.log_params(
        {
            **to_flat_dict(cfg),
            "derived.params": model.num_params(),
            "derived.total_steps": total_steps,
            "derived.vocab_size": data.vocab_size,
            "derived.data_fingerprint": data.fingerprint,  # which prepared data (cache entry) it read
            "derived.device": _device_name(device),
            "derived.loss": loss_kind,
        }
    )
    batches = train_batches(data, tc.batch_size, seed=cfg.resolved_data_seed, device=device)
    window = Window(tc.log_every, device, entered)
    learned = model.learned_temperatures()
    last_val, nan_at, raise_at = None, tc.fault_at("nan"), tc.fault_at("raise")

    for step in range(total_steps):
        lr = lr_at(step, total_steps, oc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.set_step(step)

        if step > 0 and step % tc.eval_every == 0:
            with window.paused():  # evaluation time is not training time
                eval_metrics = evaluate(model, data, cfg, device, autocast, loss_kind)
                last_val = eval_metrics[VAL_LOSS_CURVE]
                logger.log_metrics({**eval_metrics, "tokens": step * tokens_per_step}, step)

        x, y = next(batches)
        if step == raise_at:
            raise RuntimeError(f"injected failure at step {step} (train.fault={tc.fault})")
        if tc.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        with autocast:
            loss = step_model(x, y, loss=loss_kind, loss_chunks=tc.loss_chunks)
        if step == nan_at:
            loss = loss * float("nan")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.add(step, loss)

        if window.ends_at(step, total_steps):
            temperatures = model.temperatures()  # (L, H) each, on the device
            # one wait for the GPU per window: the losses, the gradient norm and the temperatures together
            losses, (norm, *values) = window.read(step, [grad_norm, *temperatures.values()])
            bad = [i for i, v in enumerate(losses) if not math.isfinite(v) or v > bound]
            if bad:
                at = window.start + bad[0]
                logger.log_metrics({TRAIN_LOSS_CURVE: losses[bad[0]], "diverged": 1.0}, at)
                return TrialResult("diverged", at, at * tokens_per_step, last_val, diverged_step=at)
            tps = window.close(len(losses) * tokens_per_step)
            metrics = {
                TRAIN_LOSS_CURVE: losses[-1],
                "lr": lr,
                "grad_norm": norm[0],
                "tokens_per_s": tps,
                "tokens": (step + 1) * tokens_per_step,
                **_temperature_metrics(temperatures, values, learned),
            }
            if peak:
                metrics["mfu"] = tps * flops_per_token / peak
            if device.type == "cuda":
                metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log_metrics(metrics, step)
            window.reopen(step)

    t_eval = time.perf_counter()
    final = evaluate(model, data, cfg, device, autocast, loss_kind)
    logger.log_metrics({**final, "tokens": total_steps * tokens_per_step}, total_steps)
    window.timing["eval_s"] += time.perf_counter() - t_eval
    steady = window.steady_rate()
    summary = {  # the responses, under the names ablate.responses declares
        "val_loss": final[VAL_LOSS_CURVE],
        "train_loss": losses[-1],
        "tokens_per_s": steady,
        **({"mfu": steady * flops_per_token / peak} if peak else {}),
        **{name: final[f"diag/{name}/mean"] for name in DIAGNOSTICS if f"diag/{name}/mean" in final},
        **{f"time/{k}": v for k, v in window.timing.items()},  # where the trial's seconds went
        **(compile_spent(compiled_before) if tc.compile else {}),
        **(step_source(step_model) if tc.compile else {}),
    }
    return TrialResult(
        "finished", total_steps, total_steps * tokens_per_step, final[VAL_LOSS_CURVE], summary=summary
    )


# Host seconds from a trial's first step to the end of step 1, and of step 3. Compiled, step 1 holds
# dynamo's trace and inductor's compile (or its cache load) of the forward and backward; with CUDA graphs,
# steps 2 and 3 warm up and record the graphs. The rest of the first window is plain steps.
FIRST_STEP_MARKS = {0: "step1_s", 2: "steps1_3_s"}


# torch's own account of compilation, by phase, as `compile_spent` reports it for one trial: dynamo's
# handling of the forward frame (its trace plus the backend's compile or cache load), the backend's part of
# that, and the backward's compile; and the hits and misses of inductor's and AOTAutograd's caches
COMPILE_PHASES = {
    "entire_frame_compile": "time/compile_forward_s",
    "backend_compile": "time/compile_backend_s",
    "entire_backward_compile": "time/compile_backward_s",
}
COMPILE_COUNTS = {
    ("inductor", "fxgraph_cache_hit"): "compile/fx_cache_hits",
    ("inductor", "fxgraph_cache_miss"): "compile/fx_cache_misses",
    ("aot_autograd", "autograd_cache_hit"): "compile/aot_cache_hits",
    ("aot_autograd", "autograd_cache_miss"): "compile/aot_cache_misses",
}


def compile_clock() -> dict[str, float]:
    """torch's running totals of compile seconds and cache events in this process (a snapshot)."""
    from torch._dynamo.utils import calculate_time_spent, counters

    spent = calculate_time_spent()
    return {
        **{name: float(spent.get(phase, 0.0)) for phase, name in COMPILE_PHASES.items()},
        **{name: float(counters[group][event]) for (group, event), name in COMPILE_COUNTS.items()},
    }


def compile_spent(before: dict[str, float]) -> dict[str, float]:
    """What this trial compiled since `before` (a compile_clock snapshot): seconds by phase, cache events.
    A kept step (`reuse_compiled`) shows zeros: nothing was traced or loaded."""
    return {name: max(value - before.get(name, 0.0), 0.0) for name, value in compile_clock().items()}


def step_source(step_model) -> dict[str, float]:
    """Whether a precompiled step was loaded (1) or traced and saved (0), and the seconds it took."""
    if not isinstance(step_model, precompiled.PrecompiledStep):
        return {}
    return {"compile/step_loaded": float(bool(step_model.loaded)), "time/step_load_s": step_model.load_s}


class Window:
    """The steps since the last log line: their losses, kept on the device and read with one sync, and
    where the trial's seconds went (set-up, training, evaluation, logging; the first window, which holds
    compilation and warm-up, also on its own)."""

    def __init__(self, size: int, device: torch.device, entered: float):
        self.losses = torch.zeros(size, device=device)
        self.start, self.opened, self.paused_s, self.train_s = 0, time.perf_counter(), 0.0, 0.0
        self.rates: list[float] = []  # training tokens/s of each closed window
        self.timing = dict.fromkeys(("first_window_s", "train_s", "eval_s", "log_s"), 0.0)
        self.timing["setup_s"] = self.opened - entered  # data, model, optimiser

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.losses[step - self.start] = loss.detach()
        if step in FIRST_STEP_MARKS and not self.rates:  # the first window's parts, host clock, no sync
            self.timing[FIRST_STEP_MARKS[step]] = time.perf_counter() - self.opened - self.paused_s

    def ends_at(self, step: int, total_steps: int) -> bool:
        return step - self.start + 1 == len(self.losses) or step == total_steps - 1

    def read(self, step: int, extras: Sequence[torch.Tensor] = ()) -> tuple[list[float], list[list[float]]]:
        """The window's losses, and each of `extras` flattened, in one transfer from the device."""
        n = step - self.start + 1
        flat = torch.cat([self.losses[:n], *(t.detach().float().reshape(-1) for t in extras)]).tolist()
        parts, at = [], n
        for t in extras:
            parts.append(flat[at : at + t.numel()])
            at += t.numel()
        return flat[:n], parts

    @contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - started

    def close(self, tokens: int) -> float:
        """The window's training tokens/s (time paused for evaluation taken out)."""
        self.train_s = time.perf_counter() - self.opened - self.paused_s
        self.timing["train_s"] += self.train_s
        self.timing["eval_s"] += self.paused_s
        if not self.rates:
            self.timing["first_window_s"] = self.timing["train_s"]
        self.rates.append(tokens / max(self.train_s, 1e-9))
        return self.rates[-1]

    def reopen(self, step: int) -> None:
        """Start the next window after `step`, once the closed one is logged."""
        now = time.perf_counter()
        self.timing["log_s"] += now - (self.opened + self.train_s + self.paused_s)
        self.start, self.opened, self.paused_s = step + 1, now, 0.0

    def steady_rate(self) -> float:
        """The median rate of the windows after the first (which holds compilation and warm-up)."""
        return statistics.median(self.rates[1:] or self.rates)


def cudagraph_trees_for_this_thread() -> None:
    """Give the calling thread the per-thread state of inductor's CUDA-graph trees.

    The trees keep their managers in thread-local storage, set up at import for the importing thread
    (and copied into autograd's threads). A trial run in another thread (Ray Tune's function trainables
    ran each trial in a new one; tests do) fails its first replay in torch 2.11 with
    `assert torch._C._is_key_in_tls(...)` (later releases set the state up themselves). Each trial's
    thread then gets trees of its own.
    """
    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def release_trial_state(graphs: bool) -> None:
    """Free what a compiled trial compiled and captured, at its end and in its own thread.

    The next trial in the process then starts with the GPU memory of this one's graphs returned and
    nothing of it left for the garbage collector to meet later. (Alone it did not stop the crashes of
    compiled trials in reused processes: README, "Studies on the fast path".)
    """
    import gc

    torch._dynamo.reset()  # drops the compiled frames that keep the trial's model and graphs alive
    precompiled.forget()
    if graphs:
        release_cudagraph_trees()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def release_cudagraph_trees() -> None:
    """Free this thread's CUDA graphs and their memory pool now, in this thread.

    Left to the thread's exit, they are destroyed while the worker's next trial may already be capturing
    graphs in its own thread, and capture is process-wide CUDA state. A failure here is reported, not
    raised: the trial's result stands.
    """
    from torch._inductor import cudagraph_trees as trees

    try:
        trees.reset_cudagraph_trees()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as err:  # cleanup of a finished trial
        warnings.warn(f"releasing the trial's CUDA graphs failed: {type(err).__name__}: {err}", stacklevel=2)


def _loss_kind(device: torch.device, tc: TrainConfig) -> str:
    """The loss path of the run; a CUDA-only setting on another device is refused."""
    if device.type != "cuda" and (needs := tc.cuda_only()):  # auto never picks CUDA-only paths
        raise ConfigError(needs[0].partition(":")[0], f"needs a CUDA device; this run is on {device.type}")
    return tc.loss if tc.loss != "auto" else _auto_loss(device, tc)


def _compiled(model: GPT, tc: TrainConfig, key: tuple):
    """The trial's compiled step: compiled afresh, or (`reuse_compiled`) from what this process kept."""
    keep_compiled(key) if tc.keeps_compiled else start_afresh()
    if tc.compile_threads:  # 1: no pool from now on; more: the size of the pool the process first starts
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = tc.compile_threads
    model.prepare_kernels()
    mode = tc.compile_mode  # with cuda_graphs, inductor captures forward and backward as graphs
    if tc.precompiles(next(model.parameters()).device.type):
        if precompiled.available():
            return precompiled.PrecompiledStep(model, mode)
        if tc.precompile:  # asked for; by default a torch without it traces every trial
            raise ConfigError(
                "train.precompile", f"needs torch's aot_compile, which torch {torch.__version__} lacks"
            )
    return torch.compile(model, mode=mode)


# Models whose compiled step this process keeps (`train.reuse_compiled`), by `kept_key`. A process may
# run many trials (Ray reuses workers). Each kept model is one entry in dynamo's cache of the model's
# forward (past torch's recompile limit a new one would silently run eager), and with CUDA graphs a trial
# whose parameters lie elsewhere than the last one's records the graphs again: one more child of the
# tree's root, checked at every replay and counted against inductor's re-record limit (torch 2.11; past
# it, a step runs without graphs). So a process serves at most SERVE_AT_MOST trials from what it kept,
# then starts afresh: as many as each worker process served when this was measured on an H200.
KEPT: set[tuple] = set()
SERVE_AT_MOST = 8
served = 0  # trials that kept their step since the process last started afresh


def kept_key(model_cfg, tc: TrainConfig, loss_kind: str) -> tuple:
    """What the compiled step depends on: the model's settings, the batch and the loss path."""
    return (repr(model_cfg), tc.batch_size, tc.device, tc.compile_mode, loss_kind, tc.loss_chunks)


def forget_compiled(graphs: bool) -> None:
    """Free what this process compiled and captured, kept steps included."""
    release_trial_state(graphs or bool(KEPT))  # a kept step's CUDA graphs outlive its trial
    KEPT.clear()


def start_afresh() -> None:
    """Drop what earlier trials compiled in this process: without a reset, each new model is a
    recompilation of the last, and past torch's recompile limit the step silently runs eager."""
    global served
    if KEPT:
        forget_compiled(graphs=True)
    torch._dynamo.reset()
    precompiled.forget()
    served = 0


def keep_compiled(key: tuple) -> None:
    """Keep this process's compiled steps for its next trials, starting afresh when it has served enough.

    A new model object of a kept model's settings passes the guards of that model's compiled forward
    (dynamo inlines nn.Modules and guards on their settings, not their identity), so its first step runs
    the kept code at once instead of tracing and loading it (on an H200, step 1 took 0.10 s kept against
    3.89 s afresh, median trial of `studies/worker_reuse.yaml`). With CUDA graphs, the new parameters'
    addresses make cudagraph trees record the graphs again (about 0.07 s), within the same memory pool.
    """
    global served
    if not KEPT or served >= SERVE_AT_MOST:
        start_afresh()  # nothing kept yet (earlier trials released theirs), or served enough
    KEPT.add(key)
    served += 1
    for knob in ("recompile_limit", "cache_size_limit"):  # one entry per kept model, with room to spare
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 2 * SERVE_AT_MOST))


def _auto_loss(device: torch.device, tc: TrainConfig) -> str:
    """The loss path measured fastest for these settings (README, training throughput on an H200).

    Fused wins in eager mode and with CUDA graphs. Compiled without graphs the step is bound by CPU
    launches, and there the plain loss was as fast for sdpa and faster for rbf and penalty.
    """
    if device.type != "cuda":
        return "plain"
    return "fused" if tc.cuda_graphs or not tc.compile else "plain"


def _temperature_metrics(
    temperatures: dict[str, torch.Tensor], values: list[list[float]], learned: set[str]
) -> dict[str, float]:
    """Mean gamma (and lambda); per layer and head where they are learned or follow a learned gamma.
    `values`: each of `temperatures` (L, H), as read from the device and flattened layer-major."""
    out = {}
    for (name, tensor), flat in zip(temperatures.items(), values, strict=True):
        heads = tensor.shape[-1]
        out[f"{name}/mean"] = math.fsum(flat) / len(flat)
        if name in learned:
            out.update({f"{name}/layer{i // heads}/head{i % heads}": v for i, v in enumerate(flat)})
    return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(config: Path, overrides: list[str], out_dir: Path | None = None) -> int:
    """`ablate train CONFIG [--set key=value ...]`: one run, progress on stderr, result as JSON."""
    try:
        cfg = load_run_config(config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "resolved_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    try:
        result = train(cfg, ConsoleLogger())
    except ConfigError as err:  # settings that only the machine can refuse (no GPU for device: cuda)
        print(f"error: {err}", file=sys.stderr)
        return 2
    payload = json.dumps(dataclasses.asdict(result), indent=2)
    print(payload)
    if out_dir is not None:
        (out_dir / "result.json").write_text(payload)
    return 0
