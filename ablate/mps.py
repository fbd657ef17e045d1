"""NVIDIA MPS: a control daemon private to one command, and how its clients name their GPUs.

Processes that share a GPU time-slice it; as clients of an MPS daemon their kernels share its
multiprocessors instead. A study with `resources.mps` runs one daemon for its trials
(`ablate.launch.mps_daemon`); `python -m ablate.bench.packing --mps` runs one for its copies.

The daemon serves the devices of its own CUDA_VISIBLE_DEVICES, and a client's CUDA_VISIBLE_DEVICES is
read against those, by position, not against the host's ids (`client_devices`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
PIPE = "CUDA_MPS_PIPE_DIRECTORY"  # the daemon's and its clients': where they meet
LOG = "CUDA_MPS_LOG_DIRECTORY"  # the daemon's and its servers' logs
THREADS = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"  # a client's share of the multiprocessors, read at CUDA's start
SERVED = "ABLATE_MPS_DEVICES"  # a study daemon's CUDA_VISIBLE_DEVICES, for its trials; unset: every GPU
STOP_TIMEOUT_S = 60.0


def daemon_env(folder: Path, base: Mapping[str, str]) -> dict[str, str]:
    """`base` with the pipe and log directories of a daemon private to `folder`."""
    return {**base, PIPE: str(folder / "mps-pipe"), LOG: str(folder / "mps-log")}


def start_daemon(folder: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Start a control daemon private to `folder`, in `base` (default: this process's environment);
    the environment it runs in, for `stop_daemon`. A daemon that does not start raises RuntimeError
    with its message.

    Its output goes to a file, not a pipe: the daemon forks into the background, and a pipe it kept
    open would never reach end of file.
    """
    env = daemon_env(folder, os.environ if base is None else base)
    for key in (PIPE, LOG):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    output = Path(env[LOG]) / "start.txt"
    with output.open("wb") as out:
        code = subprocess.run([CONTROL, "-d"], env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        said = " ".join(output.read_text(errors="replace").split())[-500:] or "no message"
        raise RuntimeError(f"`{CONTROL} -d` failed (exit {code}): {said}")
    return env


def stop_daemon(env: Mapping[str, str]) -> bool:
    """Ask the daemon started in `env` to quit (once its clients have exited); False if it did not answer
    within STOP_TIMEOUT_S."""
    try:
        subprocess.run([CONTROL], input=b"quit\n", env=env, check=False, timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False
    return True


def visible_list(value: str) -> list[str]:
    """The device ids of a CUDA_VISIBLE_DEVICES value ("1, 3" -> ["1", "3"])."""
    return [d.strip() for d in value.split(",") if d.strip()]


def client_devices(devices: Sequence[str], served: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for an MPS client that is to use `devices` (ids as the daemon's own
    CUDA_VISIBLE_DEVICES names them) of a daemon started with CUDA_VISIBLE_DEVICES=`served`.

    The client's value is read against the daemon's devices: a client of a daemon on "1,3" that says
    "3" asks for a fourth device of two, so it says "1", the position of "3". A daemon started without
    CUDA_VISIBLE_DEVICES (`served` None) serves every GPU in CUDA's order, and its positions are the ids.
    """
    if served is None:
        return ",".join(devices)
    ids = visible_list(served)
    missing = [d for d in devices if d not in ids]
    if missing:
        raise ValueError(f"GPU(s) {', '.join(missing)} are not among the MPS daemon's ({', '.join(ids)})")
    return ",".join(str(ids.index(d)) for d in devices)


def client_env(daemon: Mapping[str, str]) -> dict[str, str]:
    """The environment of an MPS client that uses every device of the daemon started in `daemon`.

    Without a CUDA_VISIBLE_DEVICES of its own, though, a client's torch counts the host's GPUs through
    NVML (which knows nothing of MPS) and may ask for one the daemon does not serve. So where the daemon
    has one, the client names the daemon's devices by position: "0", ..., "k-1".
    """
    env = dict(daemon)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = client_devices(visible_list(visible), visible)
    return env


def worker_env(daemon: Mapping[str, str]) -> dict[str, str]:
    """What a study's driver exports to its Ray workers, clients of the daemon started in `daemon`: its
    pipe directory, and its CUDA_VISIBLE_DEVICES (as SERVED) where it has one, against which each trial
    translates the GPU ids Ray gives it (`client_devices`)."""
    env = {PIPE: daemon[PIPE]}
    if "CUDA_VISIBLE_DEVICES" in daemon:
        env[SERVED] = daemon["CUDA_VISIBLE_DEVICES"]
    return env
