"""Tiny CPU studies for the end-to-end tests, and the one study that several test modules read.

`run_every_outcome` runs test_launch's study of every outcome (finished, diverged, failed) with real
Ray Tune, real MLflow (SQLite) and the real training loop, then `ablate report` on it. It runs once per
test session (the `every_outcome` fixture in conftest.py): test_launch checks its record and report,
test_ui_browser browses it in the MLflow UI. Tests only read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RESPONSES = ["val_loss", "key_norm_mean", "sink_first_token", "attn_entropy"]


def tiny_fixed(cache: Path, tokens: int) -> dict:
    return {
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context": 32},
        "data": {"tokenizer": "bpe:300", "corpus_docs": 100, "val_tokens": 1024, "cache_dir": str(cache)},
        "optim": {"warmup_steps": 2},
        "train": {"tokens": tokens, "batch_size": 8, "eval_every": 10, "log_every": 2, "device": "cpu"},
    }


def write_study(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trial_runs(client, experiment: str) -> list:
    """Every trial run (child run) of the experiment, retried attempts included."""
    from ablate import tracking

    exp = client.get_experiment_by_name(experiment)
    return tracking.search(client, exp.experiment_id, "tags.`ablate.kind` = 'trial'")


@dataclass
class EveryOutcome:
    design: Any  # ablate.design.Design
    summary: Any  # ablate.launch.RunSummary
    client: Any  # mlflow.MlflowClient on the study's store
    runs: list  # its trial runs
    report: Path  # where `ablate report` wrote
    report_result: Any  # typer's Result of that command: exit code and output


def every_outcome_spec(cache: Path) -> dict:
    """12 trials, up to 4 at once (8 normal, 2 NaN, 2 raising).

    Four at once still write to one store together, and run every outcome beside others; twelve worker
    processes at once, each importing torch, took most of the study's time on a 2-core machine."""
    return {
        "name": "concurrent",
        "description": "every outcome at once",
        "factors": {
            "metric": {"levels": ["sdpa", "rbf"]},
            "registers": {"levels": [0, 1]},
            "fault": {
                "key": "train.fault",
                "levels": {"none": None, "nan": "nan@3", "raise": "raise@1"},
                "when": {"metric": ["sdpa"], "registers": [0]},
            },
        },
        "seeds": 2,
        "fixed": tiny_fixed(cache, tokens=12288),
        "responses": {"primary": "val_loss", "secondary": RESPONSES[1:]},
        "resources": {"cpu": 0.16},
        "max_concurrent": 4,
        "retries": 1,
        "tracking": {
            "flush_seconds": 0,
            "system_metrics_interval": 0.5,
        },  # flush on every call: most contention
    }


def run_every_outcome(folder: Path) -> EveryOutcome:
    """The study, run by the in-process driver (which must not initialise CUDA), then reported."""
    import pytest
    import torch
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from ablate.cli import app
    from ablate.design import load_design
    from ablate.launch import LaunchOptions, run_study

    design = load_design(write_study(folder / "study", every_outcome_spec(folder / "cache")))

    def no_cuda(*args, **kwargs):
        raise AssertionError("the driver initialised CUDA")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "_lazy_init", no_cuda)
        summary = run_study(design, LaunchOptions())
    client = MlflowClient(design.tracking_uri())
    runs = trial_runs(client, "concurrent")
    report = folder / "report"
    result = CliRunner().invoke(app, ["report", str(design.source), "--out", str(report)])
    return EveryOutcome(design, summary, client, runs, report, result)
