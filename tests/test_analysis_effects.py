"""Effects in nats with t intervals of the one model: planted effects recovered, coverage near 95% at 3 and
5 seeds, seeds kept together, interval and p-value in agreement."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ablate.analysis import analyze
from ablate.analysis.cells import CellTable
from ablate.analysis.effects import main_effects
from ablate.analysis.simulate import PlantedStudy, simulate_trials

PLANTED = PlantedStudy(
    levels={"a": ("x", "y"), "b": ("p", "q", "r")},
    main_effects={"a": {"y": -0.02}, "b": {"q": 0.01, "r": -0.005}},
    interactions={("a", "b"): {("y", "q"): 0.03}},
    noise_sd=0.01,
    seed_sd=0.01,
)
REFERENCE = {"a": "x", "b": "p"}


def true_effects(study: PlantedStudy) -> pd.DataFrame:
    """Marginal-mean differences vs the reference and deviations from the grand mean, from true cells."""
    cells = study.factor_space().cells()
    cells["mean"] = [study.cell_mean(cell) for cell in cells.to_dict("records")]
    rows = []
    for factor, reference in REFERENCE.items():
        marginal = cells.groupby(factor, sort=False)["mean"].mean()
        for level, value in marginal.items():
            rows.append(
                {
                    "factor": factor,
                    "level": level,
                    "true_effect": value - cells["mean"].mean(),
                    "true_diff": value - marginal[reference],
                }
            )
    return pd.DataFrame(rows)


def covered(effects: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    joined = effects.merge(truth, on=["factor", "level"])
    joined["effect_covered"] = joined["effect_ci_low"].le(joined["true_effect"]) & joined[
        "effect_ci_high"
    ].ge(joined["true_effect"])
    joined["diff_covered"] = joined["diff_vs_reference_ci_low"].le(joined["true_diff"]) & joined[
        "diff_vs_reference_ci_high"
    ].ge(joined["true_diff"])
    return joined


def test_planted_effects_are_recovered_within_their_intervals():
    trials = simulate_trials(PLANTED, n_seeds=10, rng=np.random.default_rng(4))
    analysis = analyze(trials, ["a", "b"], "val_loss")
    joined = covered(analysis.primary.effects, true_effects(PLANTED))
    assert len(joined) == 5
    assert joined["effect_covered"].all()
    changed = joined[joined["level"] != joined["reference"]]
    assert changed["diff_covered"].all()
    significant = analysis.primary.anova.set_index("term")["significant"]
    assert significant.to_dict() == {"a": True, "b": True, "a:b": True}


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_intervals_cover_the_truth_near_ninety_five_percent(n_seeds):
    # the cluster bootstrap this replaced covered 71-78% at 3 seeds (min-max of 3 per-seed values)
    n_studies = 300
    rng = np.random.default_rng(8 + n_seeds)
    cells = PLANTED.factor_space().cells()
    truth = true_effects(PLANTED)
    hits = []
    for _ in range(n_studies):
        trials = simulate_trials(PLANTED, n_seeds, rng)
        table = CellTable(trials, ["a", "b"], "val_loss", cells, np.arange(n_seeds))
        effects = main_effects(table, ["a", "b"], REFERENCE)
        hits.append(covered(effects, truth)[["effect_covered", "diff_covered"]].to_numpy())
    rates = np.mean(hits, axis=0)
    low, high = stats.binom.interval(0.999, n_studies, 0.95)
    effect_rates = rates[:, 0]
    diff_rates = rates[truth["true_diff"].to_numpy() != 0, 1]
    assert np.all((effect_rates >= low / n_studies) & (effect_rates <= high / n_studies)), rates
    assert np.all((diff_rates >= low / n_studies) & (diff_rates <= high / n_studies)), rates


def test_seeds_stay_together_offsets_cancel_in_contrasts_not_in_means():
    # Huge seed offsets shared by every trial of a seed cancel within a seed; a model that treated
    # trials as independent would give intervals as wide as the offsets.
    study = PlantedStudy(
        levels={"a": ("x", "y")}, main_effects={"a": {"y": -0.05}}, noise_sd=0.001, seed_sd=1.0
    )
    trials = simulate_trials(study, n_seeds=8, rng=np.random.default_rng(0))
    effects = analyze(trials, ["a"], "val_loss").primary.effects.set_index("level")
    width = effects.loc["y", "diff_vs_reference_ci_high"] - effects.loc["y", "diff_vs_reference_ci_low"]
    assert width < 0.01
    assert effects.loc["y", "mean_ci_high"] - effects.loc["y", "mean_ci_low"] > 0.5


def test_interval_and_p_value_of_a_contrast_agree():
    # one model: the 95% interval excludes zero exactly when p < 0.05, at any number of seeds
    rng = np.random.default_rng(3)
    cells = PLANTED.factor_space().cells()
    for n_seeds in (2, 3, 5):
        trials = simulate_trials(PLANTED, n_seeds, rng)
        table = CellTable(trials, ["a", "b"], "val_loss", cells, np.arange(n_seeds))
        weights = rng.normal(size=(50, len(cells)))
        weights -= weights.mean(axis=1, keepdims=True)
        summary = table.summarise(weights)
        excludes = (summary["ci_low"] > 0) | (summary["ci_high"] < 0)
        assert (excludes == (summary["p"] < 0.05)).all()
        assert 0 < excludes.sum() < len(weights) or n_seeds == 2


def test_a_constant_response_gives_exact_zero_contrasts_and_intervals():
    # every trial reached a target at the same token count (7.344M): the contrasts and their intervals are
    # exactly 0, not rounding noise of the values' magnitude, which changes with the numpy/BLAS build
    cells = PLANTED.factor_space().cells()
    trials = simulate_trials(PLANTED, 5, np.random.default_rng(0)).assign(val_loss=7_344_000.0)
    table = CellTable(trials, ["a", "b"], "val_loss", cells, np.arange(5))
    weights = np.random.default_rng(1).normal(size=(20, len(cells)))
    weights -= weights.mean(axis=1, keepdims=True)
    summary = table.summarise(weights)
    assert (summary[["estimate", "ci_low", "ci_high"]].to_numpy() == 0.0).all()
