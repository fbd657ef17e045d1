"""What `ablate run` checks before it writes anything: the tracking store, the output folder, the GPUs
and, for `resources.mps`, NVIDIA MPS.

The run creates its output folder, its SQLite store and its parent run only after these pass, so a
mistake leaves nothing behind. Each failure is a StudyError naming the key to fix.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from ablate.config import brief
from ablate.mps import CONTROL
from ablate.spec import StudyError

STORES = "sqlite:///PATH, postgresql+psycopg2://USER:PASSWORD@HOST/DB, http(s)://HOST:PORT or file:///PATH"
CONNECT_TIMEOUT_S = 5.0


def check_tracking_uri(
    uri: str, key: str = "tracking.uri", source: str | None = None, *, probe: bool = True
) -> None:
    """MLflow can open `uri`: a known scheme; with `probe`, a SQLite file that can be created and a
    server that answers."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:
        raise StudyError([(key, f"MLflow cannot store runs at {brief(uri)}; use {STORES}")], source) from None
    if not probe:
        return
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if database.is_dir():
            raise StudyError(
                [(key, f"{database} is a folder; name the SQLite file, e.g. .../mlflow.db")], source
            )
        check_writable(database.parent, key, source)
    elif uri.startswith(("http://", "https://")):
        _check_reachable(uri, key, source)


def _check_reachable(uri: str, key: str, source: str | None) -> None:
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise StudyError([(key, f"{brief(uri)} has no valid port")], source) from None
    try:
        socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        message = f"no MLflow server answers at {parts.hostname}:{port} ({reason}); start `mlflow server` or fix the URI"
        raise StudyError([(key, message)], source) from None


def check_writable(folder: Path, key: str, source: str | None = None) -> None:
    """`folder` exists or can be created, and files can be written in it (probed, nothing left behind)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StudyError([(key, f"cannot create {folder}: {existing} is a file, not a folder")], source)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ablate-probe-", dir=existing))
    except OSError as err:
        message = (
            f"cannot create {folder}: {existing} is not writable ({err.strerror}); choose another folder"
        )
        raise StudyError([(key, message)], source) from None


def local_gpu_count() -> int | None:
    """The GPUs a local Ray would see here (without initialising CUDA), or None if unknown."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        count = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    except Exception:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def local_cpu_count() -> int:
    """The CPUs a local Ray would see here (its own count: the process's CPU affinity and cgroup limit)."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except Exception:
        return os.cpu_count() or 1


def starts_local_ray(ray_address: str | None) -> bool:
    """Whether `ablate run` starts a Ray of its own on this machine (no address, none running here)."""
    if ray_address:
        return False
    ray = sys.modules.get("ray")  # a Ray started by this process already (not imported just to ask)
    return ray is None or not ray.is_initialized()


def too_few(kind: str, asked: float, have: float, source: str | None, where: str) -> StudyError:
    """The error for a trial that asks for more CPUs or GPUs than `where` has (the same every time)."""
    hint = "set resources.gpu: 0 to train on CPU" if kind == "GPU" else "lower resources.cpu"
    message = (
        f"each trial asks for {asked:g} {kind} but {where} has {have:g}; "
        f"{hint}, or join a larger cluster with --ray-address"
    )
    return StudyError([(f"resources.{kind.lower()}", message)], source)


def check_local_cpus(asked: float, ray_address: str | None, source: str | None = None) -> None:
    """Before starting a local Ray: a trial that asks for more CPUs than this machine has fails at once."""
    if starts_local_ray(ray_address) and asked > (have := local_cpu_count()):
        raise too_few("CPU", asked, have, source, "this machine")


def check_local_gpus(asked: float, ray_address: str | None, source: str | None = None) -> None:
    """Before starting a local Ray: a trial that asks for a GPU fails at once on a machine without one."""
    if asked <= 0 or ray_address:
        return
    have = local_gpu_count()
    if have is not None and asked > have:
        raise too_few("GPU", asked, have, source, "this machine")


def mps_unavailable(ray_address: str | None) -> tuple[str, str] | None:
    """Why an MPS daemon that this run starts could not serve its trials here, and what to do; None if
    it can.

    The daemon is started on this machine for the Ray this run starts (`ablate.launch.mps_daemon`):
    workers of a cluster's nodes, or of a Ray this process already runs, would never be its clients.
    """
    if ray_address:
        return (
            "mps starts an MPS daemon for the local Ray this run starts, not on a cluster's nodes",
            f"drop --ray-address, or set mps: false and run `{CONTROL} -d` on each node before `ray start`",
        )
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return (
            "Ray already runs in this process, and its workers cannot become clients of a daemon started now",
            "run the study in a process of its own (`ablate run`)",
        )
    if local_gpu_count() == 0:
        return "mps runs trials on GPUs, under an MPS daemon, but this machine has none", "set mps: false"
    if shutil.which(CONTROL) is None:
        return (
            f"mps needs NVIDIA's `{CONTROL}`, which is not on PATH here",
            "install the NVIDIA driver's utilities (it ships with them) or set mps: false",
        )
    return None


def check_mps(ray_address: str | None, source: str | None = None) -> None:
    """Before starting a local Ray for a study with `resources.mps: true`: MPS can serve its trials here."""
    if (why := mps_unavailable(ray_address)) is not None:
        raise StudyError([("resources.mps", "; ".join(why))], source)
