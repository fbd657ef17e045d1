"""Shapley decomposition of comparisons and ablation paths."""

import numpy as np
import pandas as pd
import pytest

from ablate.analysis import StudyDataError, analyze
from ablate.analysis.simulate import PlantedStudy, replication_study, simulate_trials

THREE = {"a": ("a0", "a1"), "b": ("b0", "b1", "b2"), "c": ("c0", "c1")}
COMPARISON = "a=a0,b=b0,c=c0 -> a=a1,b=b2,c=c1"


def test_shapley_values_sum_exactly_to_the_total_with_interactions():
    study = PlantedStudy(
        levels=THREE,
        main_effects={"a": {"a1": -0.03}, "b": {"b2": -0.01}, "c": {"c1": 0.02}},
        interactions={("a", "b"): {("a1", "b2"): 0.05}, ("b", "c"): {("b2", "c1"): -0.04}},
    )
    trials = simulate_trials(study, n_seeds=4, rng=np.random.default_rng(1))
    result = analyze(trials, list(THREE), "val_loss", comparisons=[COMPARISON]).comparisons[0]
    total = result.total["estimate"].iloc[0]
    assert result.shapley["estimate"].sum() == pytest.approx(total, abs=1e-12)
    assert result.shapley["share"].sum() == pytest.approx(1.0, abs=1e-9)
    for order in ("forward", "reverse"):
        steps = result.paths[result.paths["order"] == order]
        assert steps["delta"].sum() == pytest.approx(total, abs=1e-12)


def test_without_interaction_shapley_equals_the_main_effect_differences():
    # Exactly additive cell means (seed offsets only, no trial noise): every path and every Shapley
    # value equals the factor's marginal difference between its target and baseline levels.
    study = PlantedStudy(
        levels=THREE,
        main_effects={"a": {"a1": -0.03}, "b": {"b2": -0.01, "b1": 0.02}, "c": {"c1": 0.02}},
        noise_sd=0.0,
    )
    trials = simulate_trials(study, n_seeds=3, rng=np.random.default_rng(2))
    analysis = analyze(trials, list(THREE), "val_loss", comparisons=[COMPARISON])
    effects = analysis.primary.effects.set_index(["factor", "level"])
    shapley = analysis.comparisons[0].shapley.set_index("player")
    for factor, level in (("a", "a1"), ("b", "b2"), ("c", "c1")):
        expected = effects.loc[(factor, level), "diff_vs_reference"]
        assert shapley.loc[factor, "estimate"] == pytest.approx(expected, abs=1e-12)
        assert shapley.loc[factor, "alone"] == pytest.approx(expected, abs=1e-12)
        assert shapley.loc[factor, "last"] == pytest.approx(expected, abs=1e-12)


def test_two_player_shapley_splits_the_interaction_evenly():
    study = PlantedStudy(
        levels={"a": ("a0", "a1"), "b": ("b0", "b1")},
        main_effects={"a": {"a1": -0.02}},
        interactions={("a", "b"): {("a1", "b1"): -0.04}},
        noise_sd=0.0,
    )
    trials = simulate_trials(study, n_seeds=3, rng=np.random.default_rng(3))
    result = analyze(trials, ["a", "b"], "val_loss", comparisons=["a=a0,b=b0 -> a=a1,b=b1"]).comparisons[0]
    shapley = result.shapley.set_index("player")["estimate"]
    assert shapley["a"] == pytest.approx(-0.02 - 0.02, abs=1e-12)
    assert shapley["b"] == pytest.approx(-0.02, abs=1e-12)
    steps = result.paths.set_index(["order", "player"])["delta"]
    assert steps[("forward", "a")] == pytest.approx(-0.02, abs=1e-12)
    assert steps[("reverse", "a")] == pytest.approx(-0.06, abs=1e-12)


def test_planted_study_shapley_intervals_cover_the_true_values():
    study = PlantedStudy(levels=THREE, main_effects={"a": {"a1": -0.03}, "c": {"c1": 0.02}}, noise_sd=0.01)
    trials = simulate_trials(study, n_seeds=10, rng=np.random.default_rng(6))
    result = analyze(trials, list(THREE), "val_loss", comparisons=[COMPARISON]).comparisons[0]
    truth = pd.Series({"a": -0.03, "b": 0.0, "c": 0.02})
    shapley = result.shapley.set_index("player")
    assert ((shapley["ci_low"] <= truth) & (truth <= shapley["ci_high"])).all()
    assert shapley.loc[["a", "c"], "p_adj"].lt(0.05).all()


def test_missing_intermediate_cell_is_reported_not_invented():
    study = PlantedStudy(levels={"a": ("a0", "a1"), "b": ("b0", "b1")}, main_effects={"a": {"a1": -0.02}})
    trials = simulate_trials(study, n_seeds=4, rng=np.random.default_rng(4))
    trials.loc[(trials["a"] == "a1") & (trials["b"] == "b0"), "status"] = "failed"
    result = analyze(trials, ["a", "b"], "val_loss", comparisons=["a=a0,b=b0 -> a=a1,b=b1"]).comparisons[0]
    assert result.missing_cells == ["a=a1, b=b0 (all 4 trials failed)"]
    assert result.shapley.empty
    assert not result.total.empty
    assert set(result.paths["order"]) == {"reverse"}


def test_conditional_factor_joins_the_factor_it_depends_on():
    trials = simulate_trials(replication_study(), n_seeds=3, rng=np.random.default_rng(5))
    comparison = (
        "metric=sdpa,position=rope,registers=0 -> metric=rbf,position=susie,registers=4,register_init=zeros"
    )
    result = analyze(
        trials,
        ["metric", "position", "registers", "register_init"],
        "val_loss",
        comparisons=[comparison],
    ).comparisons[0]
    assert result.players == ["metric", "position", "registers+register_init"]
    assert result.baseline["register_init"] == "n/a"
    assert result.missing_cells == []
    assert result.shapley["estimate"].sum() == pytest.approx(result.total["estimate"].iloc[0], abs=1e-12)


def test_unnamed_factors_are_averaged_and_listed():
    trials = simulate_trials(PlantedStudy(levels=THREE), n_seeds=3, rng=np.random.default_rng(0))
    result = analyze(trials, list(THREE), "val_loss", comparisons=["a=a0 -> a=a1"]).comparisons[0]
    assert result.averaged_over == ["b", "c"]
    assert result.players == ["a"]


def test_conditional_factor_cannot_be_set_where_it_does_not_apply():
    trials = simulate_trials(replication_study(), n_seeds=2, rng=np.random.default_rng(5))
    bad = "registers=0,register_init=zeros -> registers=1,register_init=zeros"
    with pytest.raises(StudyDataError, match="register_init applies only where registers in"):
        analyze(
            trials,
            ["metric", "position", "registers", "register_init"],
            "val_loss",
            comparisons=[bad],
        )
