"""ANOVA: a hand-computed 2x2 with seed blocks, unbalanced designs, null calibration, power (MDE)."""

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


def test_two_by_two_matches_sums_of_squares_computed_by_hand():
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
        "seed": ((mean_seed - grand) ** 2).sum(),
    }
    ss_resid = ((y - grand) ** 2).sum() - sum(ss.values())
    df_resid = len(data) - 1 - 3 - (data["seed"].nunique() - 1)
    fit = fit_anova(data, ["a", "b"], "y")
    assert fit.typ == "II"
    assert fit.df_resid == df_resid == 12
    assert fit.table.loc["Residual", "sum_sq"] == pytest.approx(ss_resid, rel=1e-9)
    for term, value in ss.items():
        assert fit.table.loc[term, "sum_sq"] == pytest.approx(value, rel=1e-9)
        if term != "seed":
            f_value = value / (ss_resid / df_resid)
            assert fit.table.loc[term, "F"] == pytest.approx(f_value, rel=1e-9)
            assert fit.table.loc[term, "p"] == pytest.approx(stats.f.sf(f_value, 1, df_resid), rel=1e-9)


def test_effect_sizes_follow_their_formulas():
    data = two_by_two()
    fit = fit_anova(data, ["a", "b"], "y")
    row = term_statistics(fit).set_index("term").loc["a"]
    ss, ss_resid, mse = row["sum_sq"], fit.table.loc["Residual", "sum_sq"], fit.mse
    assert row["partial_eta2"] == pytest.approx(ss / (ss + ss_resid))
    assert row["partial_omega2"] == pytest.approx(max(0.0, (ss - mse) / (ss + (len(data) - 1) * mse)))
    assert row["share"] == pytest.approx(ss / ((data["y"] - data["y"].mean()) ** 2).sum())


def test_unbalanced_design_switches_to_type_three_and_says_so():
    data = two_by_two().drop(index=[0, 5])
    analysis = analyze(data, ["a", "b"], "y", n_boot=50)
    assert set(analysis.primary.anova["anova_type"]) == {"III"}
    assert analysis.frames.loc[0, "n_used"] == len(data)


def test_empty_cell_pools_the_interaction_into_the_residual_with_a_note():
    data = two_by_two()
    data = data[~((data["a"] == "x") & (data["b"] == "u"))]
    analysis = analyze(data, ["a", "b"], "y", n_boot=50)
    assert list(analysis.primary.anova["term"]) == ["a", "b"]
    assert any("pooled into the residual" in note for note in analysis.notes)
    assert any("cells without usable trials: a=x, b=u" in note for note in analysis.notes)


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
    n, df_resid = 4 * n_seeds, 4 * n_seeds - 4 - (n_seeds - 1)
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
    analysis = analyze(data, ["a", "b"], "y", secondary=["flat"], n_boot=20)
    assert analysis.secondary["flat"].anova.empty
    assert any("'flat' is constant" in note for note in analysis.secondary["flat"].notes)
