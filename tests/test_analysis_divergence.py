"""Divergence: rates per cell, the factor test (logistic, Fisher under separation), treatment sensitivity."""

import math

import numpy as np
import pandas as pd
import pytest

from ablate.analysis import analyze
from ablate.analysis.divergence import treat
from ablate.analysis.simulate import PlantedStudy, simulate_trials

LEVELS = {"metric": ("sdpa", "rbf"), "position": ("rope", "susie", "none")}


def study_with(divergence: dict) -> PlantedStudy:
    return PlantedStudy(levels=LEVELS, main_effects={"position": {"susie": -0.03}}, divergence=divergence)


def test_rates_per_cell_count_each_status():
    trials = simulate_trials(study_with({}), n_seeds=4, rng=np.random.default_rng(0))
    rbf_none = trials.index[(trials["metric"] == "rbf") & (trials["position"] == "none")]
    trials.loc[rbf_none[:2], ["status", "val_loss"]] = ["diverged", np.nan]
    trials.loc[rbf_none[2], "status"] = "failed"
    per_cell = analyze(trials, list(LEVELS), "val_loss", n_boot=50).divergence.per_cell
    row = per_cell.set_index(["metric", "position"]).loc[("rbf", "none")]
    assert (row["trials"], row["diverged"], row["failed"]) == (3, 2, 1)
    assert row["rate"] == pytest.approx(2 / 3)
    assert per_cell["diverged"].sum() == 2


def test_logistic_test_finds_the_factor_that_drives_divergence():
    study = study_with({("metric", "sdpa"): 0.1, ("metric", "rbf"): 0.5})
    trials = simulate_trials(study, n_seeds=25, rng=np.random.default_rng(1))
    tests = analyze(trials, list(LEVELS), "val_loss", n_boot=50).divergence.tests.set_index("factor")
    assert set(tests["method"]) == {"logistic LR"}
    assert tests.loc["metric", "significant"]
    assert tests.loc["metric", "p_adj"] < 1e-4


def test_separation_falls_back_to_fisher_exact_tests():
    study = study_with({("metric", "rbf"): 0.5})
    trials = simulate_trials(study, n_seeds=10, rng=np.random.default_rng(2))
    tests = analyze(trials, list(LEVELS), "val_loss", n_boot=50).divergence.tests.set_index("factor")
    assert tests.loc["metric", "method"] == "Fisher exact"
    assert tests.loc["position", "method"] == "Fisher exact (Monte Carlo)"
    assert tests.loc["metric", "significant"]


def test_treatments_cap_and_rank_diverged_runs():
    data = pd.DataFrame(
        {"status": ["finished", "finished", "diverged", "failed"], "val_loss": [3.0, 12.0, np.nan, np.nan]}
    )
    assert list(treat(data, "val_loss", "excluded", None)["val_loss"]) == [3.0, 12.0]
    cap = math.log(50_000)
    assert list(treat(data, "val_loss", "capped", 50_000)["val_loss"]) == [3.0, cap, cap]
    assert list(treat(data, "val_loss", "ranks", None)["val_loss"]) == [1.0, 2.0, 3.0]


def test_sensitivity_flags_conclusions_that_depend_on_diverged_runs():
    # metric does not change the loss of finished runs, but rbf diverges often: dropping diverged
    # runs hides it, capping them at ln(vocab) makes metric matter.
    study = study_with({("metric", "rbf"): 0.4})
    trials = simulate_trials(study, n_seeds=8, rng=np.random.default_rng(3))
    result = analyze(trials, list(LEVELS), "val_loss", vocab_size=50_000, n_boot=50).divergence
    table = result.sensitivity.set_index("term")
    assert list(result.sensitivity.columns[2:]) == ["p_adj_excluded", "p_adj_capped", "p_adj_ranks", "agree"]
    assert table.loc["metric", "p_adj_excluded"] > 0.05
    assert table.loc["metric", "p_adj_capped"] < 0.05
    assert not table.loc["metric", "agree"]
    assert table.loc["position", "p_adj_ranks"] < 0.05  # ranks keep the real loss effect visible
    assert table.loc["metric:position", "agree"]
    assert result.conclusions_differ


def test_capped_treatment_is_skipped_with_a_note_without_vocab_size():
    trials = simulate_trials(study_with({}), n_seeds=3, rng=np.random.default_rng(4))
    result = analyze(trials, list(LEVELS), "val_loss", n_boot=50).divergence
    assert "p_adj_capped" not in result.sensitivity.columns
    assert any("vocab_size not given" in note for note in result.notes)
    assert result.tests.empty
