"""Each cell's compiled step, traced once per machine and loaded by every later trial of that cell.

`torch.compile` traces a model's forward with dynamo at its first call, in every process and trial, even
when inductor's and AOTAutograd's caches already hold the compiled graphs: about 1.1 s per trial at the
seed size on an H200, the largest part of a warm trial's first step. torch's ahead-of-time compilation
(`torch.compile(...).aot_compile`, experimental in torch) does the trace once and saves the traced
frame, its guards and the compiled forward and backward in one file; a later trial loads that file and
calls it with its own model. The model is an argument of the saved step (its parameters are inputs), and
the guards check that the model, the batch and the loss path are the ones it was traced for: a step
never runs for a model it was not made for (a loaded step that fails them at the trial's first call is
traced again and replaced; a later call that fails them raises, it does not retrace).

A file's name is a digest of everything the trace depends on (`step_key`): the model's settings, the
batch's shapes and dtypes, the call's keyword arguments, autocast and the other global state dynamo
guards (CPU threads, default dtype, deterministic algorithms), the compile mode and backend, the device,
torch's and Triton's versions, the environment variables the kernels read, and the source of the
`model` and `kernels` packages. A change to any of them is a new file, never a stale step.

Where torch refuses a model ahead of time (a graph break, a backend whose output cannot be saved), the
trial compiles as `torch.compile` always does, with a warning. `train.precompile` (ablate.train) turns it
on or off; by default it is on for compiled runs on CUDA. A torch without ahead-of-time compilation
traces every trial by default and refuses an explicit `true`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ablate.caches import compile_cache_root

log = logging.getLogger(__name__)

# the environment variables that change what the kernels compile to (kernels/*.py read them at import)
KERNEL_ENVIRONMENT = ("TRITON_INTERPRET", "ABLATE_TRITON_AUTOTUNE", "ABLATE_KEY_NORM")
# the backend that compiles a step: inductor, as torch.compile's default (CPU tests use aot_eager where
# this torch can save its output: quicker)
BACKEND = "inductor"
# loaded steps of this process by file, for its next trials of the same cell (`train.reuse_compiled`)
LOADED: dict[Path, Callable] = {}


def available() -> bool:
    """Whether this torch can save a compiled step and load it again."""
    return hasattr(torch.compiler, "load_compiled_function")


def steps_dir() -> Path:
    return Path(compile_cache_root()) / "steps"


@cache
def source_digest() -> str:
    """A digest of the `model` and `kernels` packages' source and data (the autotune table)."""
    import kernels
    import model

    return tree_digest([Path(package.__file__).parent for package in (model, kernels)])


def tree_digest(roots: list[Path]) -> str:
    """A digest of the names and contents of the .py and .json files under `roots`."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def step_key(model: torch.nn.Module, args: tuple, kwargs: dict, mode: str | None, backend: str) -> str:
    """The file name of the saved step for this model, call and compile setting."""
    device = next(model.parameters()).device
    autocast = torch.is_autocast_enabled(device.type)
    parts = [
        repr(model.cfg),
        repr([(tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a) for a in args]),
        repr(sorted(kwargs.items())),
        f"autocast={autocast}:{torch.get_autocast_dtype(device.type) if autocast else None}",
        # torch's global state that dynamo's guards check (a trial's CPU threads follow its resources.cpu)
        f"threads={torch.get_num_threads()} dtype={torch.get_default_dtype()}",
        f"deterministic={torch.are_deterministic_algorithms_enabled()}",
        f"mode={mode} backend={backend}",
        device.type,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        torch.__version__,
        _version("triton"),
        repr([(name, os.environ.get(name)) for name in KERNEL_ENVIRONMENT]),
        source_digest(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class PrecompiledStep:
    """A model's compiled forward (and backward), loaded from disk at the first call or compiled and saved.

    Called like the model. `loaded` says, after the first call, whether the step came from a file (or from
    this process's earlier trial), and `load_s` how long getting it took.
    """

    def __init__(self, model: torch.nn.Module, mode: str | None, backend: str | None = None):
        self.model, self.mode, self.backend = model, mode, backend or BACKEND
        self.step: Callable | None = None
        self.loaded: bool | None = None
        self.load_s = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.step is None:
            started = time.perf_counter()
            try:
                self.step = self._obtain(args, kwargs)
            except Exception as err:  # refused ahead of time: compiled at its first call, as torch does
                warnings.warn(
                    f"the step could not be compiled ahead of time ({type(err).__name__}: {err}); "
                    "compiling it at its first call instead",
                    stacklevel=2,
                )
                self.loaded, compiled = False, torch.compile(self.model, mode=self.mode, backend=self.backend)
                self.step = lambda _model, *a, **k: compiled(*a, **k)
            self.load_s = time.perf_counter() - started
        return self.step(self.model, *args, **kwargs)

    def _obtain(self, args: tuple, kwargs: dict) -> Callable:
        path = steps_dir() / f"{step_key(self.model, args, kwargs, self.mode, self.backend)}.bin"
        step = LOADED.get(path) or (self._load(path) if path.exists() else None)
        if step is not None and not step.guard_check(self.model, *args, **kwargs):
            # something the trace depends on that the key does not name: traced again, and replaced
            warnings.warn(
                f"the saved step {path} does not fit this model ({_failed_guard(step, args, kwargs, self.model)}); "
                "compiling it again",
                stacklevel=3,
            )
            step = None
        self.loaded = step is not None
        if step is None:
            step = self._compile_and_save(path, args, kwargs)
        LOADED[path] = step
        return step

    def _load(self, path: Path) -> Callable | None:
        try:
            with _graphs_config(self.mode), _guard_context(), path.open("rb") as file:
                return torch.compiler.load_compiled_function(file)
        except Exception as err:  # an unreadable or incompatible file is compiled again and replaced
            log.debug("loading %s failed", path, exc_info=True)
            warnings.warn(
                f"the saved step {path} did not load ({type(err).__name__}: {err}); compiling it again",
                stacklevel=3,
            )
            return None

    def _compile_and_save(self, path: Path, args: tuple, kwargs: dict) -> Callable:
        with _aot_compile_enabled():  # torch 2.11 gives a compiled function `aot_compile` only under it
            compiled = torch.compile(
                type(self.model).forward, fullgraph=True, mode=self.mode, backend=self.backend
            )
            step = compiled.aot_compile(((self.model, *args), kwargs))
        path.parent.mkdir(parents=True, exist_ok=True)
        # written beside its place, then renamed: the other processes of a study that start the same cell
        # at once read a whole file or none (torch 2.11 writes it in place)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            step.save_compiled_function(str(partial))
            os.replace(partial, path)
        except Exception as err:  # the trial goes on with the step it has; the next one compiles again
            partial.unlink(missing_ok=True)
            warnings.warn(f"the compiled step could not be saved ({type(err).__name__}: {err})", stacklevel=3)
        return step


def _failed_guard(step, args: tuple, kwargs: dict, model: torch.nn.Module) -> str:
    """The first guard of a saved step that refuses this call, as dynamo words it (best effort)."""
    try:
        f_locals = step.prepare_f_locals(model, *args, **kwargs)
        return "; ".join(step._artifacts.guard_manager.check_verbose(f_locals).verbose_code_parts)[:300]
    except Exception:  # the wording is torch's internals: the refusal stands without it
        return "a guard refused it"


def _aot_compile_enabled():
    """Dynamo's switch for ahead-of-time compilation, on (set by default from torch 2.13)."""
    from torch._dynamo import config

    return config.patch(enable_aot_compile=True) if hasattr(config, "enable_aot_compile") else nullcontext()


def _guard_context():
    """A tracing context for the guards a saved step's file holds, as they are read back.

    torch 2.11 reads a guard on an imported module (dynamo's `ImportSource`, which a trace of
    FlexAttention makes: the rbf and penalty cells at the seed size) by installing it into the current
    trace's context, and without one the load fails ("TracingContext.get() must be called within an
    ongoing trace"). The guard is read into a context made for the load and dropped with it; the loaded
    step keeps its own guards.
    """
    from torch._guards import TracingContext, tracing

    return tracing(TracingContext(None))


def _graphs_config(mode: str | None):
    """Inductor's settings under which a saved step is loaded: CUDA graphs as the compile mode asked.

    AOTAutograd wraps a loaded graph in CUDA graphs by inductor's `triton.cudagraphs` at load time, which
    the modes that set it ("reduce-overhead", "max-autotune") set only inside their own compilation.
    """
    import torch._inductor
    from torch._inductor import config

    options = torch._inductor.list_mode_options(mode) if mode else {}
    return config.patch({"triton.cudagraphs": bool(options.get("triton.cudagraphs"))})


def forget() -> None:
    """Drop the steps this process loaded (its next trials load them again from disk)."""
    LOADED.clear()
