"""Conditional factors: the crossed frame, nested frames, and which trials each test used."""

import numpy as np
import pandas as pd
import pytest

from ablate.analysis import analyze
from ablate.analysis.simulate import PlantedStudy, simulate_trials

STUDY = PlantedStudy(
    levels={"metric": ("sdpa", "rbf"), "registers": ("0", "1", "4"), "register_init": ("zeros", "normal")},
    main_effects={"metric": {"rbf": -0.02}, "registers": {"4": -0.01}, "register_init": {"normal": 0.03}},
    conditions={"register_init": {"registers": ("1", "4")}},
)
FACTORS = ["metric", "registers", "register_init"]


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    return simulate_trials(STUDY, n_seeds=6, rng=np.random.default_rng(9))


@pytest.fixture(scope="module")
def analysis(trials):
    return analyze(trials, FACTORS, "val_loss")


def test_crossed_frame_holds_the_conditional_factor_at_its_reference(analysis, trials):
    crossed = analysis.frames.set_index("frame").loc["crossed"]
    assert crossed["factors"] == "metric, registers"
    assert crossed["trials"] == "trials where register_init is zeros or n/a"
    expected = trials[trials["register_init"].isna() | (trials["register_init"] == "zeros")]
    assert crossed["n_trials"] == len(expected) == 2 * 3 * 6
    assert set(crossed["trial_ids"].split()) == set(expected["trial_id"])


def test_nested_frame_tests_the_conditional_factor_where_it_applies(analysis, trials):
    name = "register_init within registers in {1, 4}"
    nested = analysis.frames.set_index("frame").loc[name]
    assert nested["factors"] == "metric, registers, register_init"
    assert nested["n_trials"] == int(trials["register_init"].notna().sum()) == 2 * 2 * 2 * 6
    anova = analysis.primary.anova
    nested_terms = set(anova.loc[anova["frame"] == name, "term"])
    assert nested_terms == {
        "register_init",
        "metric:register_init",
        "registers:register_init",
        "metric:registers:register_init",
    }
    row = anova.set_index(["frame", "term"]).loc[(name, "register_init")]
    assert row["significant"]
    effect = analysis.primary.effects.set_index(["factor", "level"]).loc[("register_init", "normal")]
    assert effect["diff_vs_reference_ci_low"] <= 0.03 <= effect["diff_vs_reference_ci_high"]


def test_given_conditions_match_the_inferred_ones(trials, analysis):
    given = analyze(trials, FACTORS, "val_loss", conditions={"register_init": {"registers": ["1", "4"]}})
    pd.testing.assert_frame_equal(given.primary.anova, analysis.primary.anova)


def test_diverged_and_failed_trials_are_counted_not_silently_dropped(trials):
    changed = trials.copy()
    changed.loc[[0, 7], "status"] = "failed"
    changed.loc[[3], ["status", "val_loss"]] = ["diverged", np.nan]
    result = analyze(changed, FACTORS, "val_loss")
    frames = result.frames.set_index("frame")
    lost = changed.loc[[0, 3, 7]]
    in_crossed = lost["register_init"].isna() | (lost["register_init"] == "zeros")
    assert frames.loc["crossed", "n_failed"] == int((lost["status"] == "failed")[in_crossed].sum())
    assert frames.loc["crossed", "n_used"] == frames.loc["crossed", "n_trials"] - int(in_crossed.sum())
    assert "2 failed" in result.notes[0] and "1 diverged" in result.notes[0]
    assert set(result.primary.anova.loc[result.primary.anova["frame"] == "crossed", "anova_type"]) == {
        "split-plot"
    }
