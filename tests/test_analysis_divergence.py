"""Divergence: rates and tests per cell, the factor test (logistic, Fisher under separation), the capped
reanalysis (reference only), and nothing of it when nothing diverged."""

import math

import numpy as np
import pandas as pd
import pytest

from ablate.analysis import analyze
from ablate.analysis.divergence import treat
from ablate.analysis.simulate import PlantedStudy, simulate_trials
from ablate.report.verdicts import verdict_sections

LEVELS = {"metric": ("sdpa", "rbf"), "position": ("rope", "susie", "none")}


def study_with(divergence: dict) -> PlantedStudy:
    return PlantedStudy(levels=LEVELS, main_effects={"position": {"susie": -0.03}}, divergence=divergence)


def test_rates_per_cell_count_each_status():
    trials = simulate_trials(study_with({}), n_seeds=4, rng=np.random.default_rng(0))
    rbf_none = trials.index[(trials["metric"] == "rbf") & (trials["position"] == "none")]
    trials.loc[rbf_none[:2], ["status", "val_loss"]] = ["diverged", np.nan]
    trials.loc[rbf_none[2], "status"] = "failed"
    per_cell = analyze(trials, list(LEVELS), "val_loss").divergence.per_cell
    row = per_cell.set_index(["metric", "position"]).loc[("rbf", "none")]
    assert (row["trials"], row["diverged"], row["failed"]) == (3, 2, 1)
    assert row["rate"] == pytest.approx(2 / 3)
    assert per_cell["diverged"].sum() == 2


def test_logistic_test_finds_the_factor_that_drives_divergence():
    study = study_with({("metric", "sdpa"): 0.1, ("metric", "rbf"): 0.5})
    trials = simulate_trials(study, n_seeds=25, rng=np.random.default_rng(1))
    tests = analyze(trials, list(LEVELS), "val_loss").divergence.tests.set_index("factor")
    assert set(tests["method"]) == {"logistic LR"}
    assert tests.loc["metric", "significant"]
    assert tests.loc["metric", "p_adj"] < 1e-3


def test_separation_falls_back_to_fisher_exact_tests():
    study = study_with({("metric", "rbf"): 0.5})
    trials = simulate_trials(study, n_seeds=10, rng=np.random.default_rng(2))
    tests = analyze(trials, list(LEVELS), "val_loss").divergence.tests.set_index("factor")
    assert tests.loc["metric", "method"] == "Fisher exact"
    assert tests.loc["position", "method"] == "Fisher exact (Monte Carlo)"
    assert tests.loc["metric", "significant"]


def test_treatments_exclude_or_cap_diverged_runs():
    data = pd.DataFrame(
        {"status": ["finished", "finished", "diverged", "failed"], "val_loss": [3.0, 12.0, np.nan, np.nan]}
    )
    assert list(treat(data, "val_loss", "excluded", None)["val_loss"]) == [3.0, 12.0]
    cap = math.log(50_000)
    assert list(treat(data, "val_loss", "capped", 50_000)["val_loss"]) == [3.0, cap, cap]
    with pytest.raises(ValueError, match="valid"):
        treat(data, "val_loss", "ranks", None)


def test_capped_reanalysis_is_shown_for_reference_and_never_claims():
    # metric does not change the loss of finished runs, but rbf diverges often: capping diverged runs
    # at ln(vocab) makes metric "matter" in the capped table; the verdict's loss claims ignore it.
    study = study_with({("metric", "rbf"): 0.4})
    trials = simulate_trials(study, n_seeds=8, rng=np.random.default_rng(3))
    analysis = analyze(trials, list(LEVELS), "val_loss", vocab_size=50_000)
    table = analysis.divergence.sensitivity.set_index("term")
    assert list(analysis.divergence.sensitivity.columns[2:]) == ["p_adj_excluded", "p_adj_capped", "agree"]
    assert table.loc["metric", "p_adj_excluded"] > 0.05
    assert table.loc["metric", "p_adj_capped"] < 0.05
    lines = dict(verdict_sections(analysis))
    assert any(line.startswith("metric: no detectable effect") for line in lines["Factors"])
    assert any(line.startswith("metric changes the divergence rate") for line in lines["Divergence"])


def test_nothing_about_divergence_is_tested_or_reanalysed_when_nothing_diverged():
    # defect: the rank-transform sensitivity ran without divergence and flagged "verdicts change"
    # in about half of the planted studies (plain ranks invent interactions when effects are large)
    study = PlantedStudy(
        levels={"a": ("x", "y"), "b": ("p", "q"), "c": ("u", "v")},
        main_effects={"a": {"y": -0.2}, "b": {"q": -0.2}, "c": {"v": -0.2}},
        noise_sd=0.01,
    )
    trials = simulate_trials(study, n_seeds=3, rng=np.random.default_rng(5))
    analysis = analyze(trials, ["a", "b", "c"], "val_loss", vocab_size=50_000)
    assert analysis.divergence.sensitivity.empty and analysis.divergence.tests.empty
    assert analysis.divergence.per_cell["p"].isna().all()
    assert dict(verdict_sections(analysis))["Divergence"] == ["0 of 24 trials diverged (0.0%)."]


def test_capped_reanalysis_is_skipped_with_a_note_without_vocab_size():
    trials = simulate_trials(study_with({("metric", "rbf"): 0.3}), n_seeds=3, rng=np.random.default_rng(4))
    result = analyze(trials, list(LEVELS), "val_loss").divergence
    assert result.sensitivity.empty
    assert any("vocab_size not given" in note for note in result.notes)
