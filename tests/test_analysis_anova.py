"""ANOVA: a hand-computed split-plot 2x2, missing trials and cells, null calibration, power (MDE)."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ablate.analysis import analyze
from ablate.analysis.anova import fit_anova, term_statistics
from ablate.analysis.multiplicity import adjust
from ablate.analysis.power import minimum_detectable_effect, noncentrality_for_power
from ablate.analysis.simulate import PlantedStudy, simulate_trials
from ablate.analysis.threads import one_blas_thread

N_STUDIES = 200


def binomial_bounds(rate: float, n: int, confidence: float = 0.999) -> tuple[float, float]:
    low, high = stats.binom.interval(confidence, n, rate)
    return low / n, high / n


def two_by_two(n_seeds: int = 5, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [
        {"a": a, "b": b, "seed": s, "status": "finished", "y": rng.normal(3.0 + 0.1 * (a == "x"), 0.1)}
        for s in range(n_seeds)
        for a in ("x", "z")
        for b in ("u", "v")
    ]
    return pd.DataFrame(rows)


def test_two_by_two_matches_split_plot_sums_of_squares_computed_by_hand():
    data = two_by_two()
    y, grand = data["y"], data["y"].mean()
    mean_a = data.groupby("a")["y"].transform("mean")
    mean_b = data.groupby("b")["y"].transform("mean")
    mean_seed = data.groupby("seed")["y"].transform("mean")
    mean_cell = data.groupby(["a", "b"])["y"].transform("mean")
    ss = {
        "a": ((mean_a - grand) ** 2).sum(),
        "b": ((mean_b - grand) ** 2).sum(),
        "a:b": ((mean_cell - mean_a - mean_b + grand) ** 2).sum(),
    }
    # each term's error is its interaction with seed (df 1 x 4)
    mean_a_seed = data.groupby(["a", "seed"])["y"].transform("mean")
    mean_b_seed = data.groupby(["b", "seed"])["y"].transform("mean")
    error = {
        "a": ((mean_a_seed - mean_a - mean_seed + grand) ** 2).sum(),
        "b": ((mean_b_seed - mean_b - mean_seed + grand) ** 2).sum(),
    }
    error["a:b"] = ((y - grand) ** 2).sum() - sum(ss.values()) - ((mean_seed - grand) ** 2).sum()
    error["a:b"] -= error["a"] + error["b"]
    fit = fit_anova(data, ["a", "b"], "y")
    assert fit.typ == "split-plot"
    for term, value in ss.items():
        row = fit.table.loc[term]
        assert row["sum_sq"] == pytest.approx(value, rel=1e-9)
        assert row["df_error"] == 4
        assert row["ms_error"] * 4 == pytest.approx(error[term], rel=1e-9)
        f_value = value / (error[term] / 4)
        assert row["F"] == pytest.approx(f_value, rel=1e-9)
        assert row["p"] == pytest.approx(stats.f.sf(f_value, 1, 4), rel=1e-9)


def test_effect_sizes_follow_their_formulas():
    data = two_by_two()
    fit = fit_anova(data, ["a", "b"], "y")
    row = term_statistics(fit).set_index("term").loc["a"]
    ms_error = fit.table.loc["a", "ms_error"]
    ss, ss_error = row["sum_sq"], ms_error * fit.table.loc["a", "df_error"]
    assert row["partial_eta2"] == pytest.approx(ss / (ss + ss_error))
    omega = (ss - ms_error) / (ss + (len(data) - 1) * ms_error)
    assert row["partial_omega2"] == pytest.approx(max(0.0, omega))
    assert row["share"] == pytest.approx(ss / ((data["y"] - data["y"].mean()) ** 2).sum())


def test_missing_trials_are_filled_and_cost_error_degrees_of_freedom():
    data = two_by_two().drop(index=[0, 5])
    analysis = analyze(data, ["a", "b"], "y")
    anova = analysis.primary.anova.set_index("term")
    # Yates: the 2 filled values cost 2 of the additive residual's (4 - 1)(5 - 1) = 12 df
    assert anova["df_resid"].tolist() == pytest.approx([4 * (1 - 2 / 12)] * 3)
    assert analysis.frames.loc[0, "n_used"] == len(data)
    assert analysis.primary.effects["diff_vs_reference"].notna().all()


def test_empty_cell_keeps_every_estimable_quantity_and_names_what_is_not():
    # defect: one empty cell turned every cell mean, level effect and two-way table into NaN
    data = two_by_two()
    data = data[~((data["a"] == "x") & (data["b"] == "u"))]
    analysis = analyze(data, ["a", "b"], "y")
    assert list(analysis.primary.anova["term"]) == ["a", "b"]
    assert any("a=x, b=u" in note and "not tested" in note for note in analysis.notes)
    effects = analysis.primary.effects
    assert effects[["mean", "mean_ci_low", "diff_vs_reference_ci_high"]].notna().all().all()
    means = analysis.cell_means.set_index(["a", "b"])
    assert means["mean"].notna().sum() == 3 and np.isnan(means.loc[("x", "u"), "mean"])
    assert means.loc[("x", "u"), "note"] == "not estimable: no trials"


def test_null_studies_reject_each_term_at_the_nominal_rate():
    study = PlantedStudy(levels={"a": ("x", "y"), "b": ("p", "q", "r")}, noise_sd=0.01, seed_sd=0.01)
    rng = np.random.default_rng(11)
    pvalues, familywise = [], []
    with one_blas_thread():
        for _ in range(N_STUDIES):
            data = simulate_trials(study, n_seeds=4, rng=rng)
            table = term_statistics(fit_anova(data, ["a", "b"], "val_loss"))
            pvalues.append(table.set_index("term")["p"])
            familywise.append(bool((adjust(table["p"], "holm") < 0.05).any()))
    rates = (pd.DataFrame(pvalues) < 0.05).mean()
    low, high = binomial_bounds(0.05, N_STUDIES)
    assert list(rates.index) == ["a", "b", "a:b"]
    assert all(low <= rate <= high for rate in rates), rates
    assert np.mean(familywise) <= high


def test_mde_formula_gives_eighty_percent_power_in_simulation():
    noise, n_seeds = 0.01, 4
    levels = {"a": ("x", "y"), "b": ("p", "q")}
    n, df_resid = 4 * n_seeds, n_seeds - 1  # the error of a is a x seed
    mde, meaning = minimum_detectable_effect([2], 1, df_resid, n, noise**2)
    assert meaning == "difference between two levels"
    study = PlantedStudy(levels=levels, main_effects={"a": {"y": mde}}, noise_sd=noise, seed_sd=0.02)
    rng = np.random.default_rng(5)
    rejected, reported = [], []
    with one_blas_thread():
        for _ in range(N_STUDIES):
            table = term_statistics(fit_anova(simulate_trials(study, n_seeds, rng), list(levels), "val_loss"))
            row = table.set_index("term").loc["a"]
            rejected.append(row["p"] < 0.05)
            reported.append(row["mde"])
    low, high = binomial_bounds(0.80, N_STUDIES)
    assert low <= np.mean(rejected) <= high
    assert np.median(reported) == pytest.approx(mde, rel=0.15)


def test_noncentrality_solves_the_power_equation():
    lam = noncentrality_for_power(2, 30)
    critical = stats.f.isf(0.05, 2, 30)
    assert stats.ncf.sf(critical, 2, 30, lam) == pytest.approx(0.80, abs=1e-8)


@pytest.mark.parametrize(("method", "reference"), [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjustment_matches_statsmodels_and_skips_missing(method, reference):
    pvalues = np.random.default_rng(2).uniform(0, 0.2, size=12)
    expected = multipletests(pvalues, method=reference)[1]
    np.testing.assert_allclose(adjust(pvalues, method), expected, rtol=1e-12)
    with_gap = adjust([0.01, np.nan, 0.04], method)
    assert np.isnan(with_gap[1])
    np.testing.assert_allclose(with_gap[[0, 2]], multipletests([0.01, 0.04], method=reference)[1])


def test_constant_response_is_noted_instead_of_tested():
    data = two_by_two().assign(flat=1.0)
    analysis = analyze(data, ["a", "b"], "y", secondary=["flat"])
    assert analysis.secondary["flat"].anova.empty
    assert any("'flat' is constant" in note for note in analysis.secondary["flat"].notes)


def test_terms_that_are_zero_up_to_rounding_are_not_tested():
    """A token count to a target that cells share exactly makes terms and their seed interactions zero;
    computed, they are rounding noise, and noise over noise is any F at all. Here b and a:b are zero up
    to 1e-8 tokens on 1.2e7 (far below the table's rounding floor): untested, with no sum of squares,
    while a, whose effect varies by seed, is tested as before."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(4):
        gain = 275_400.0 + 40_000.0 * s  # a's effect differs by seed: its error is not zero
        for a in ("x", "z"):
            for b in ("u", "v"):
                y = 12_484_800.0 - (gain if a == "z" else 0.0) + rng.uniform(-1e-8, 1e-8)
                rows.append({"a": a, "b": b, "seed": s, "status": "finished", "y": y})
    table = term_statistics(fit_anova(pd.DataFrame(rows), ["a", "b"], "y")).set_index("term")
    for term in ("b", "a:b"):
        assert np.isnan(table.loc[term, "F"]) and np.isnan(table.loc[term, "p"]), table.loc[term]
        assert table.loc[term, "sum_sq"] == 0.0
    assert np.isfinite(table.loc["a", "F"]) and table.loc["a", "p"] < 1e-3
