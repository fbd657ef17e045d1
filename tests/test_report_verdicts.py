"""The verdict text says only what the data support: each defect of the attribution audit, pinned with a
small table that reproduced it."""

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from ablate.analysis import analyze
from ablate.analysis.anova import fit_anova
from ablate.analysis.simulate import PlantedStudy, simulate_trials
from ablate.report import write_report
from ablate.report.sections import share_text
from ablate.report.verdicts import claim_lines, share_line, verdict_sections

CUBE = {"metric": ("sdpa", "rbf"), "position": ("rope", "susie"), "registers": ("0", "1")}
PUBLISHED = "metric=sdpa,position=rope,registers=0 -> metric=rbf,position=susie,registers=1"


def binomial_high(n: int, rate: float = 0.05) -> float:
    return stats.binom.ppf(0.999, n, rate) / n


def sections_of(analysis) -> dict[str, list[str]]:
    return dict(verdict_sections(analysis))


def test_one_fully_diverged_cell_leaves_no_nan_where_estimable(tmp_path):
    # defect 1: one empty cell turned every estimate into NaN ("susie vs rope +nan nats")
    study = PlantedStudy(levels=CUBE, main_effects={"position": {"susie": -0.03}})
    trials = simulate_trials(study, n_seeds=5, rng=np.random.default_rng(0))
    dead = (trials["metric"] == "rbf") & (trials["position"] == "susie") & (trials["registers"] == "1")
    trials.loc[dead, ["status", "val_loss"]] = ["diverged", np.nan]
    analysis = analyze(trials, list(CUBE), "val_loss", comparisons=[PUBLISHED], vocab_size=50_000)
    written = write_report(analysis, tmp_path, title="dead cell")
    for name in ("report.md", "report.html", "results.json"):
        text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", written[name].read_text())
        assert not re.search(r"\bnan\b", text, re.IGNORECASE), name
    effects = analysis.primary.effects
    assert effects["diff_vs_reference"].notna().all()
    assert analysis.interactions["mean"].notna().all()
    summary = "\n".join(line for _, lines in verdict_sections(analysis) for line in lines)
    assert "metric=rbf, position=susie, registers=1 (all 5 trials diverged)" in summary
    document = json.loads(written["results.json"].read_text())
    missing = [row for row in document["tables"]["cell_means"] if row["mean"] is None]
    assert [row["note"] for row in missing] == ["not estimable: all 5 trials diverged"]


def test_estimate_interval_and_test_come_from_the_seed_adjusted_model():
    # defect 2: with unbalanced seeds the estimate came from raw cell means, the t test from the
    # seed-adjusted ones (-0.0077 [-0.0275, +0.0168] printed beside t = -19.3)
    study = PlantedStudy(
        levels={"a": ("x", "y"), "b": ("p", "q")},
        main_effects={"a": {"y": -0.027}},
        noise_sd=0.002,
        seed_sd=0.05,
    )
    trials = simulate_trials(study, n_seeds=4, rng=np.random.default_rng(1))
    trials.loc[(trials["a"] == "y") & (trials["seed"].isin([0, 1])), ["status", "val_loss"]] = [
        "diverged",
        np.nan,
    ]
    analysis = analyze(trials, ["a", "b"], "val_loss", comparisons=["a=x -> a=y"])
    finished = trials[trials["status"] == "finished"]
    ols = smf.ols("val_loss ~ C(a, Sum) * C(b, Sum) + C(seed, Sum)", finished).fit()
    adjusted = -2 * ols.params["C(a, Sum)[S.x]"]  # y - x from the sum-to-zero coefficient
    raw = finished.groupby("a")["val_loss"].mean()
    assert abs((raw["y"] - raw["x"]) - adjusted) > 0.01  # the raw difference is far off
    row = analysis.primary.effects.set_index("level").loc["y"]
    assert row["diff_vs_reference"] == pytest.approx(adjusted, abs=1e-9)
    assert row["diff_vs_reference_ci_high"] < 0 and row["diff_vs_reference_p"] < 0.05
    total = analysis.comparisons[0].total.iloc[0]
    assert total["estimate"] == pytest.approx(adjusted, abs=1e-9)
    assert (total["ci_high"] < 0) == (total["p"] < 0.05)
    shapley = analysis.comparisons[0].shapley.iloc[0]
    assert np.sign(shapley["estimate"]) == np.sign(shapley["t"])


def test_share_words_follow_the_signs():
    # defect 5: "works against the difference" for a share with the total's sign when the total
    # was not significant; shares printed as "112%" with "contributes"
    total = pd.Series({"estimate": -0.010, "p_adj": 0.30})
    row = pd.Series(
        {
            "player": "registers",
            "estimate": -0.008,
            "ci_low": -0.012,
            "ci_high": -0.004,
            "p": 0.0001,
            "p_adj": 0.001,
            "share": 0.8,
        }
    )
    line = share_line(row, total, 0.05, "nats", "val_loss")
    assert "works against" not in line and line.startswith("registers lowers the val_loss")
    significant_total = pd.Series({"estimate": -0.010, "p_adj": 0.001})
    more = row.copy()
    more["share"], more["estimate"] = 1.12, -0.0112
    assert "more than the whole difference" in share_line(more, significant_total, 0.05, "nats")
    against = row.copy()
    against["share"], against["estimate"], against["ci_low"], against["ci_high"] = -0.38, 0.0038, 0.002, 0.006
    assert "works against" in share_line(against, significant_total, 0.05, "nats")
    assert share_text(more) == "more than the total" and share_text(against) == "against the total"
    quiet = row.copy()
    quiet["p_adj"] = 0.5
    assert "'s share" not in share_line(quiet, total, 0.05, "nats")


def test_order_matters_needs_a_significant_interaction_test():
    # defect 6: a heuristic on interval widths said "order matters" in about a quarter of null studies
    study = PlantedStudy(levels=CUBE, noise_sd=0.01, seed_sd=0.005)
    rng = np.random.default_rng(6)
    fired = 0
    for _ in range(40):
        trials = simulate_trials(study, n_seeds=3, rng=rng)
        analysis = analyze(trials, list(CUBE), "val_loss", comparisons=[PUBLISHED])
        fired += any("order matters" in line for line in sections_of(analysis)["Comparisons"])
    assert fired <= 40 * binomial_high(40)
    planted = PlantedStudy(
        levels=CUBE, interactions={("metric", "position"): {("rbf", "susie"): -0.08}}, noise_sd=0.005
    )
    analysis = analyze(simulate_trials(planted, 5, rng), list(CUBE), "val_loss", comparisons=[PUBLISHED])
    lines = sections_of(analysis)["Comparisons"]
    assert any(line.strip().startswith("order matters for metric") for line in lines)
    assert not any("order matters for registers" in line for line in lines)


def test_pure_crossover_is_described_as_an_interaction_with_its_simple_effects():
    # defect 7: "metric: no detectable effect" while metric's simple effects were +0.039 and -0.039
    study = PlantedStudy(
        levels={"metric": ("sdpa", "rbf"), "position": ("rope", "susie")},
        interactions={
            ("metric", "position"): {
                ("rbf", "rope"): 0.0195,
                ("rbf", "susie"): -0.0195,
                ("sdpa", "rope"): -0.0195,
                ("sdpa", "susie"): 0.0195,
            }
        },
        noise_sd=0.005,
    )
    analysis = analyze(
        simulate_trials(study, 5, np.random.default_rng(7)), ["metric", "position"], "val_loss"
    )
    lines = sections_of(analysis)
    metric = next(line for line in lines["Factors"] if line.startswith("metric:"))
    assert metric.startswith("metric: its effect depends on position")
    index = lines["Factors"].index(metric)
    simple = " ".join(lines["Factors"][index + 1 : index + 3])
    assert re.search(r"within position=rope: rbf vs sdpa \+0\.0[34]\d", simple)
    assert re.search(r"within position=susie: rbf vs sdpa -0\.0[34]\d", simple)
    assert any("metric x position matters" in line and "crossover" in line for line in lines["Interactions"])
    assert not any(line.startswith("No other interaction") for line in lines["Interactions"])


@pytest.mark.parametrize(
    "departure",
    [{"seed_factor_sd": {"metric": 0.01}}, {"level_variance": {("metric", "rbf"): 3.0}}],
    ids=["seed x metric random effect", "one level at 3x variance"],
)
def test_term_tests_hold_their_error_rate_when_seeds_or_levels_differ(departure):
    # defect 8: with a seed x metric effect as large as the noise the pooled-residual ANOVA rejected
    # metric in 30% of null studies; with one level at 3x variance, 11% family-wise
    levels = {"metric": ("sdpa", "rbf", "penalty"), "position": ("rope", "susie", "none")}
    study = PlantedStudy(levels=levels, noise_sd=0.01, seed_sd=0.005, **departure)
    rng = np.random.default_rng(8)
    rejected = []
    for _ in range(200):
        data = simulate_trials(study, n_seeds=3, rng=rng)
        rejected.append(fit_anova(data, list(levels), "val_loss").table["p"] < 0.05)
    rates = pd.DataFrame(rejected).mean()
    assert (rates <= binomial_high(200)).all(), rates


def test_one_bad_cell_is_seen_and_named():
    # defect 9: a cell where 5 of 5 seeds diverged got p = 0.18 for every factor
    levels = {"metric": ("sdpa", "rbf", "penalty"), "position": ("rope", "susie", "none")}
    study = PlantedStudy(levels=levels, dead_cells=((("metric", "rbf"), ("position", "none")),))
    analysis = analyze(simulate_trials(study, 5, np.random.default_rng(9)), list(levels), "val_loss")
    cell = analysis.divergence.per_cell.set_index(["metric", "position"]).loc[("rbf", "none")]
    assert cell["significant"] and cell["rate_ci_low"] > 0.4 and cell["rate_ci_high"] == 1.0
    lines = sections_of(analysis)["Divergence"]
    assert any(
        line.startswith("metric=rbf, position=none diverges more often: 5 of 5 trials") for line in lines
    )


def test_capped_runs_do_not_swamp_the_loss_verdict():
    # defect 9: position's p went from 1e-58 to 0.056 when 4 capped runs were added
    levels = {"metric": ("sdpa", "rbf"), "position": ("rope", "susie", "none")}
    study = PlantedStudy(levels=levels, main_effects={"position": {"susie": -0.03, "none": 0.05}})
    trials = simulate_trials(study, 5, np.random.default_rng(10))
    clean = analyze(trials, list(levels), "val_loss", vocab_size=50_000)
    diverged = trials.copy()
    diverged.loc[[1, 8, 15, 22], ["status", "val_loss"]] = ["diverged", np.nan]
    with_capped = analyze(diverged, list(levels), "val_loss", vocab_size=50_000)
    assert not with_capped.divergence.sensitivity.empty
    for analysis in (clean, with_capped):
        assert any(line.startswith("position: matters") for line in sections_of(analysis)["Factors"])


def test_two_seeds_skip_the_degenerate_equal_variance_check_without_warnings():
    # quickstart: the check printed inf, p = 0 with 2 seeds and scipy warned on every report
    study = PlantedStudy(levels=CUBE, main_effects={"metric": {"rbf": 0.02}})
    trials = simulate_trials(study, 2, np.random.default_rng(11))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        analysis = analyze(trials, list(CUBE), "val_loss")
    check = analysis.diagnostics.set_index("check").loc["equal variance across cells (Brown-Forsythe)"]
    assert check["note"].startswith("skipped:") and np.isnan(check["p"])


def test_no_other_interaction_only_after_a_listed_one():
    study = PlantedStudy(levels=CUBE, main_effects={"metric": {"rbf": 0.02}})
    analysis = analyze(simulate_trials(study, 3, np.random.default_rng(12)), list(CUBE), "val_loss")
    interactions = sections_of(analysis)["Interactions"]
    assert interactions[0].startswith("No interaction is detectable")


def test_null_studies_rarely_claim_anything():
    # 8.8% of null studies made a claim somewhere when every family was adjusted on its own
    study = PlantedStudy(levels=CUBE, noise_sd=0.01, seed_sd=0.005)
    rng = np.random.default_rng(13)
    claimed = 0
    for _ in range(60):
        analysis = analyze(simulate_trials(study, 3, rng), list(CUBE), "val_loss", comparisons=[PUBLISHED])
        claimed += bool(claim_lines(verdict_sections(analysis)))
    assert claimed <= 60 * binomial_high(60)


@pytest.mark.parametrize("n_factors", [3, 4])
def test_one_seed_gives_a_clear_note_and_a_report_not_a_traceback(tmp_path, n_factors):
    # issue 20: `ablate analyze` with one seed and three factors raised a statsmodels ValueError;
    # the shipped gpu_short study has one seed and four factors
    levels = {
        "metric": ("sdpa", "rbf", "penalty"),
        "position": ("rope", "susie", "none"),
        "registers": ("0", "1"),
        "gamma_schedule": ("constant", "warmup", "learnable"),
    }
    levels = dict(list(levels.items())[:n_factors])
    study = PlantedStudy(levels=levels, main_effects={"position": {"susie": -0.05, "none": 0.08}})
    trials = simulate_trials(study, 1, np.random.default_rng(14))
    analysis = analyze(trials, list(levels), "val_loss")
    assert any(note.startswith("one seed:") for note in analysis.notes)
    anova = analysis.primary.anova
    assert set(anova["order"]) == set(range(1, n_factors)) and set(anova["anova_type"]) == {"pooled"}
    assert anova.set_index("term").loc["position", "significant"]
    written = write_report(analysis, tmp_path, title="one seed")
    assert written["report.html"].is_file()
    single = analyze(trials[trials["metric"] == "sdpa"].assign(metric="sdpa"), ["position"], "val_loss")
    assert single.primary.anova.empty
    assert any("one seed and one factor" in note for note in single.notes)
