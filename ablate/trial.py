"""One trial inside its Ray worker: the Tune trainable that trains one (cell, seed) and records it.

The driver (`ablate.launch`) hands each trial a payload: its identity, its run config and where to log.
`TrialTrainable` is a Tune class trainable whose one step runs the whole trial in the worker's main
thread, and `reset_config` lets Tune run the next trial in the same process. Tune's function API runs
each trial in a thread of its own; on an H200, reused processes then crashed at the start of a compiled
trial, with a segmentation fault while the garbage collector ran in the new trial's thread (README,
"Studies on the fast path"). In the main thread no trial starts in a new thread, and compiled trials
share processes without crashing (on two H200s: 194 compiled trials in reused processes, no crash).
"""

from __future__ import annotations

import itertools
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ablate import mps, tracking
from ablate.config import RunConfig, from_dict, to_flat_dict

TAG = tracking.TAG
START = tracking.START
SKIPPED = {"status": "skipped", "val_loss": math.nan, "diverged_step": -1}  # a result recorded elsewhere
MODULE_IMPORTED = time.time()  # in a worker: when its process had started and Ray had loaded this module


class TrialTrainable(tune.Trainable):
    """A Tune trainable whose one step is one whole trial (`run`)."""

    def setup(self, config: dict[str, Any]) -> None:
        self.payload = config["trial"]

    def step(self) -> dict[str, Any]:
        use_mps_numbering()
        return {**run(self.payload), "done": True}

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The next trial in this worker process (Tune's `reuse_actors`)."""
        self.payload = new_config["trial"]
        return True


def use_mps_numbering() -> None:
    """Under a study's MPS daemon started on some GPUs (`resources.mps`), name this worker's GPUs as the
    daemon numbers them, before torch starts CUDA.

    Ray gives a worker ids from the driver's CUDA_VISIBLE_DEVICES (say "3" of "1,3"); the daemon, started
    with that list, serves those GPUs as devices 0 and 1, and a client's CUDA_VISIBLE_DEVICES counts
    among them ("1"). Ray's ids, not the variable, are the source, so a reused worker gets the same value.
    A daemon on every GPU (no `mps.SERVED`) numbers them as Ray does.
    """
    served = os.environ.get(mps.SERVED)
    if served is not None:
        ids = [str(i) for i in ray.get_gpu_ids()]
        os.environ["CUDA_VISIBLE_DEVICES"] = mps.client_devices(ids, served)


_PROCESS_TRIALS = itertools.count(1)  # trials this worker process has started (Ray reuses workers)


def run(payload: dict[str, Any]) -> dict[str, Any]:
    """One attempt at one trial, recorded in its own MLflow child run; the result Tune receives."""
    called = time.time()
    from ablate.train import train

    marks = {"module_imported": MODULE_IMPORTED, "trial_called": called, "train_imported": time.time()}
    cfg = from_dict(RunConfig, _on_this_node(payload))
    attempts = _attempts(payload)
    if tracking.done_runs(attempts):  # finished meanwhile by a worker of a killed driver
        return SKIPPED
    # which attempt this is, and how many trials its process ran before: a failure that comes with
    # a reused worker shows it in the run's tags (and in the one-line error of the closing table)
    context = {TAG + "attempt": str(len(attempts) + 1), TAG + "process_trial": str(next(_PROCESS_TRIALS))}
    logger = _open_trial_run(payload, cfg, context)
    if context[TAG + "process_trial"] == "1":  # how this process's start went (ablate.bench.study)
        logger.log_metrics({f"{START}{name}": at for name, at in marks.items()}, 0)
    try:
        result = train(cfg, logger)
    except Exception:
        logger.finish("failed", {}, tags={TAG + "error": traceback.format_exc()[-tracking.MAX_TAG_CHARS :]})
        raise
    except BaseException:
        logger.finish("interrupted", {})
        raise
    if (other := _result_exists(payload)) is not None:  # never two results for one (cell, seed)
        logger.finish("duplicate", {}, tags={TAG + "duplicate_of": other.info.run_id})
        return SKIPPED
    summary = {**tracking.final_metrics(result.summary), "steps": result.steps, "tokens": result.tokens}
    tags = {}
    if result.diverged_step is not None:
        summary["diverged_step"] = result.diverged_step
        tags[TAG + "diverged_step"] = str(result.diverged_step)
    logger.finish(result.status, summary, step=result.steps, tags=tags)
    val = result.val_loss if result.status == "finished" and result.val_loss is not None else math.nan
    return {"status": result.status, "val_loss": val, "diverged_step": result.diverged_step or -1}


def _on_this_node(payload: dict[str, Any]) -> dict:
    """The trial's run config, with this node's own `$ABLATE_CACHE` (set where its Ray started) as the
    data cache when the study names none: each node then prepares and reuses the data on its own disk."""
    tree, own = payload["tree"], Path(os.environ.get("ABLATE_CACHE") or ".").expanduser()
    if not (payload.get("node_cache") and own.is_absolute()):  # a relative path names no place on a node
        return tree
    return {**tree, "data": {**tree["data"], "cache_dir": str(own.resolve())}}


def _result_exists(payload: dict[str, Any]):
    return tracking.done_runs(_attempts(payload)).get(payload["trial_id"])


def _attempts(payload: dict[str, Any]) -> list:
    """Every run of this trial under the study's parent run so far."""
    track = payload["tracking"]
    client = tracking.MlflowClient(track["uri"])
    return tracking.trial_runs(client, track["experiment_id"], track["parent_run_id"], payload["trial_id"])


def _open_trial_run(payload: dict[str, Any], cfg: RunConfig, context: dict[str, str]) -> tracking.TrialLogger:
    track = payload["tracking"]
    tags = {
        **context,
        TAG + "trial_id": payload["trial_id"],
        TAG + "cell_id": payload["cell_id"],
        TAG + "cell": payload["label"],
        TAG + "seed": str(payload["seed"]),
        TAG + "config_hash": payload["config_hash"],
        TAG + "study": payload["study"],
        TAG + "device": _device_name(cfg),
        TAG + "gpu_ids": _gpu_ids(cfg),
        TAG + "host": os.uname().nodename,
        TAG + "node_id": _node_id(),  # several Ray nodes may share a host
        TAG + "pid": str(os.getpid()),  # Ray reuses worker processes: same pid, same warm process
    }
    client = tracking.MlflowClient(track["uri"])
    name = f"{payload['label']} seed={payload['seed']}"
    logger = tracking.TrialLogger.create(client, track["experiment_id"], track["parent_run_id"], name, tags)
    logger.flush_seconds = track["flush_seconds"]
    levels = {f"factor.{f}": level for f, level in payload["levels"].items()}
    logger.log_params(
        {
            **levels,
            "seed": payload["seed"],
            "trial_id": payload["trial_id"],
            "cell_id": payload["cell_id"],
            **to_flat_dict(cfg),
        }
    )
    if track["system_metrics"]:
        logger.start_system_metrics(track["interval"])
    return logger


def _device_name(cfg: RunConfig) -> str:
    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0)


def _gpu_ids(cfg: RunConfig) -> str:
    """The physical GPUs Ray gave this trial (comma-separated), or '' on CPU."""
    import ray

    if cfg.train.device == "cpu":
        return ""
    return ",".join(str(i) for i in ray.get_gpu_ids())


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
