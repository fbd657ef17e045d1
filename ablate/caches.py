"""Where a study's processes keep what they compile: torch.compile's caches and Python's bytecode.

Nothing here imports torch, Ray or MLflow, so that the `ablate` command can settle these before its own
imports (`relaunch_with_cached_bytecode`) as well as for the workers it starts (`share_compile_caches`).
"""

from __future__ import annotations

import importlib.util
import os
import sys


def compile_cache_root() -> str:
    """`$ABLATE_COMPILE_CACHE`, default `$ABLATE_CACHE/compile`, else `~/.cache/ablate/compile`."""
    return os.environ.get("ABLATE_COMPILE_CACHE") or os.path.join(
        os.environ.get("ABLATE_CACHE") or os.path.expanduser("~/.cache/ablate"), "compile"
    )


def share_compile_caches() -> None:
    """Point every trial's torch.compile caches at one directory on the node (workers inherit it).

    Inductor's FX-graph and AOTAutograd caches and Triton's kernel cache (and its autotuning results)
    then serve every trial and worker process after the first of each kind of cell, and survive the
    study: a later study, or the same study resumed, compiles from disk. `compile_cache_root` says where,
    e.g. on a folder that travels with the study. Python's own bytecode goes there too where the install
    keeps none (`cache_bytecode`).
    """
    root = compile_cache_root()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(root, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(root, "triton"))
    # Triton's autotuner then keeps each kernel's timings per shape in that cache (keyed by the kernel's
    # source, the GPU and the configs it tried), and a new process reads its choice instead of timing
    # every config again. In the 2M-token gpu_scaling study (H200, 2026-11-30) the first trial of each
    # worker process that ran the Triton attention kernel (rbf, learned gamma) took 1.71 s in step 1
    # (median), the next cell on that kernel in the same process 0.35 s. `kernels.bench` sets nothing
    # here, so a kernel benchmark still times every config afresh.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    cache_bytecode(os.path.join(root, "bytecode"))


def cache_bytecode(folder: str, probe: str = "torch") -> bool:
    """Let the trials' processes keep Python's compiled bytecode in `folder` where the install keeps none.

    Each Ray worker is a fresh interpreter that imports torch, inductor, Ray and MLflow. Where their
    bytecode is not cached beside the source (an image built with PYTHONDONTWRITEBYTECODE=1 and no
    __pycache__, or an install the user cannot write), every worker compiles thousands of modules from
    source: on an H200 host's image (torch 2.11), importing torch, dynamo, inductor, Ray Tune and MLflow
    took 22 s a process, and 7 s with the bytecode cached. Python then keeps it under `folder`
    (PYTHONPYCACHEPREFIX), and the workers write it there despite PYTHONDONTWRITEBYTECODE, which keeps
    bytecode out of the install, not out of this folder. Whether the install has its bytecode is read
    from `probe`'s package; an install that has it is left alone. A PYTHONPYCACHEPREFIX the user set is
    kept, and Python may write there too: with PYTHONDONTWRITEBYTECODE also set, a new folder stays empty
    and every worker compiles its imports from source (the 2M-token gpu_scaling study on an H200 waited
    33.8 s before its first trial so, 2026-12-01, against 12.1 s with its bytecode cached). Like the
    other caches, this reaches the workers of a Ray started here, which inherit the environment.
    True if it changed the environment.
    """
    spec = importlib.util.find_spec(probe)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    # the install's own bytecode, beside its source: not importlib's cache_from_source, which follows a
    # prefix this process already runs under
    folder_of_source, name = os.path.split(spec.origin)
    beside = os.path.join(folder_of_source, "__pycache__", f"{name[:-3]}.{sys.implementation.cache_tag}.pyc")
    if os.path.exists(beside):
        return False
    if os.environ.get("PYTHONPYCACHEPREFIX"):  # the user's folder: let Python write there
        return os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
    os.environ["PYTHONPYCACHEPREFIX"] = folder
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return True


def relaunch_with_cached_bytecode(probe: str = "torch") -> None:
    """Start this command again, at once, with its bytecode cached where the install keeps none.

    Python reads PYTHONPYCACHEPREFIX when it starts, so `cache_bytecode` reaches the processes started
    after it, not the one that calls it; and the `ablate` command itself imports torch, Ray and MLflow
    for most of its subcommands. Where `cache_bytecode` sets the prefix, this replaces the process by the
    same command line under the new environment (before anything is imported or written), so that the
    command's own imports read the cached bytecode too. Elsewhere it returns and changes nothing.
    """
    if not sys.executable:  # an embedded interpreter: nothing to start again
        return
    if cache_bytecode(os.path.join(compile_cache_root(), "bytecode"), probe):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
