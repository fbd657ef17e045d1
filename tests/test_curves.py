"""Effects over training and tokens to a target loss: planted effects recovered from loss curves, the
Shapley split exact at every step, censoring counted, and both sections in the written report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ablate.analysis import curves
from ablate.report import from_table
from ablate.spec import Responses

STEPS = range(0, 201, 20)
TOKENS_PER_STEP = 1000


def planted(seeds: int = 6, noise: float = 0.01) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Penalty lowers the loss by 0.1 throughout; 2x temperature by 0.4 early, fading to 0 by the end."""
    rng = np.random.default_rng(0)
    seed_shift = rng.normal(0, 0.05, size=seeds)  # shared by every cell of a seed: a block effect
    trials, points = [], []
    for penalty in ("off", "on"):
        for temperature in ("1x", "2x"):
            for seed in range(seeds):
                trial_id = f"{penalty}-{temperature}-s{seed}"
                trials.append(
                    {"trial_id": trial_id, "penalty": penalty, "temperature": temperature, "seed": seed}
                )
                for step in STEPS:
                    loss = 6 - 2 * step / 200 + seed_shift[seed] + rng.normal(0, noise)
                    loss -= 0.1 * (penalty == "on") + 0.4 * np.exp(-step / 30) * (temperature == "2x")
                    points.append({"trial_id": trial_id, "step": step, "tokens": step * TOKENS_PER_STEP,
                                   "val_loss": loss})  # fmt: skip
    table = pd.DataFrame(trials).assign(status="finished")
    table["val_loss"] = [p["val_loss"] for p in points if p["step"] == STEPS[-1]]
    return table, pd.DataFrame(points)


PUBLISHED = curves.ComparisonSides(
    "published", {"penalty": "off", "temperature": "1x"}, {"penalty": "on", "temperature": "2x"},
    ["penalty", "temperature"],
)  # fmt: skip
REFERENCE = {"penalty": "off", "temperature": "1x"}


@pytest.fixture(scope="module")
def over_training() -> pd.DataFrame:
    trials, points = planted()
    return curves.effects_over_training(trials, points, ["penalty", "temperature"], REFERENCE, [PUBLISHED])


def statistic(table: pd.DataFrame, kind: str, name: str, term: str) -> pd.DataFrame:
    return table[(table["kind"] == kind) & (table["name"] == name) & (table["term"] == term)]


def test_planted_effects_are_recovered_at_every_step_with_covering_intervals(over_training):
    penalty = statistic(over_training, "effect", "penalty", "on vs off")
    temperature = statistic(over_training, "effect", "temperature", "2x vs 1x")
    assert len(penalty) == len(STEPS) and (penalty["n_trials"] == 24).all()
    truth = -0.4 * np.exp(-temperature["step"].to_numpy() / 30)
    assert np.allclose(penalty["estimate"], -0.1, atol=0.02)
    assert np.allclose(temperature["estimate"], truth, atol=0.02)
    assert (temperature["ci_low"] <= truth + 1e-9).mean() >= 0.8 and (
        temperature["ci_high"] >= truth - 1e-9
    ).mean() >= 0.8
    assert (penalty["ci_high"] - penalty["ci_low"] < 0.05).all()


def test_a_fading_effect_reads_as_fading_and_a_constant_one_as_persisting(over_training):
    shape = {
        (kind, name, term): curves.shape_of(curves.trend(group))
        for (kind, name, term), group in over_training.groupby(["kind", "name", "term"])
    }
    assert shape[("effect", "temperature", "2x vs 1x")] == "fades"
    assert shape[("effect", "penalty", "on vs off")] == "persists"
    assert shape[("shapley", "published", "temperature")] == "fades"


def test_the_shapley_split_sums_to_the_total_at_every_step(over_training):
    total = statistic(over_training, "total", "published", "").set_index("step")["estimate"]
    parts = over_training[over_training["kind"] == "shapley"].groupby("step")["estimate"].sum()
    assert np.allclose(parts, total)
    early = statistic(over_training, "shapley", "published", "temperature").iloc[1]
    assert early["estimate"] < -0.2  # most of the early gain is the temperature's


def test_tokens_to_target_is_the_first_evaluation_at_or_below_it():
    points = pd.DataFrame({"trial_id": ["a"] * 4 + ["b"] * 4, "step": [0, 1, 2, 3] * 2,
                           "tokens": [0, 10, 20, 30] * 2,
                           "val_loss": [5.0, 4.0, 3.5, 3.6, 5.0, 4.5, 4.2, 4.1]})  # fmt: skip
    reached = curves.tokens_to_target(points, [4.0, 3.5]).set_index("trial_id")
    assert reached.loc["a", "tokens_to_4"] == 10 and reached.loc["a", "tokens_to_3.5"] == 20
    assert np.isnan(reached.loc["b", "tokens_to_4"]) and np.isnan(reached.loc["b", "tokens_to_3.5"])


def test_target_effects_count_trials_that_never_reach_the_target():
    trials, points = planted(seeds=4)
    points.loc[points["trial_id"] == "off-1x-s0", "val_loss"] += 10.0  # this trial never gets there
    trials = curves.with_tokens_to_targets(trials, points, [5.5])
    effects = curves.target_effects(trials, ["penalty", "temperature"], REFERENCE, [5.5], [PUBLISHED])
    assert (effects["not_reached"] == 1).all()
    temperature = effects[(effects["kind"] == "effect") & (effects["name"] == "temperature")].iloc[0]
    assert temperature["estimate"] < 0  # the 2x cells reach 5.5 sooner
    cells = curves.reached_by_cell(trials, ["penalty", "temperature"], [5.5])
    assert cells["reached"].tolist() == [3, 4, 4, 4] and (cells["trials"] == 4).all()


def test_report_has_both_sections_tables_and_figure(tmp_path):
    trials, points = planted()
    trials.to_csv(tmp_path / "trials.csv", index=False)
    points.to_csv(tmp_path / "curves.csv", index=False)
    out = tmp_path / "report"
    code = from_table(
        tmp_path / "trials.csv", ["penalty", "temperature"], "val_loss",
        ["penalty=off,temperature=1x -> penalty=on,temperature=2x"], out,
        curves=tmp_path / "curves.csv", targets=[5.0],
    )  # fmt: skip
    assert code == 0
    text = (out / "report.md").read_text()
    assert "## Effects over training" in text and "## Tokens to a target loss" in text
    assert text.index("## Tokens to a target loss") < text.index("## Methods")
    assert "temperature 2x vs 1x: fades" in text
    assert "converges faster" in text
    table = pd.read_csv(out / "tables" / "effects_over_training.csv")
    assert {"kind", "name", "term", "step", "tokens", "estimate", "ci_low", "ci_high"} <= set(table.columns)
    assert (out / "figures" / "effects_over_training.png").stat().st_size > 1000
    assert not pd.read_csv(out / "tables" / "tokens_to_target.csv").empty


@pytest.mark.parametrize("targets", [[-1.0], [0.0], [3.5, 3.5], [float("inf")]])
def test_bad_targets_are_rejected_with_an_example(targets):
    with pytest.raises(ValueError, match=r"targets must be distinct positive losses in nats, e.g."):
        Responses(targets=targets)


def test_a_conditional_factor_has_effects_only_where_it_applies():
    trials, points = planted(seeds=3)
    rbf = trials[(trials["penalty"] == "on") & (trials["temperature"] == "2x")].assign(
        penalty="rbf", temperature=np.nan, trial_id=lambda t: "rbf-" + t["trial_id"]
    )
    rbf_points = points[points["trial_id"].isin(rbf["trial_id"].str.removeprefix("rbf-"))]
    trials = pd.concat([trials, rbf], ignore_index=True)
    points = pd.concat(
        [points, rbf_points.assign(trial_id="rbf-" + rbf_points["trial_id"])], ignore_index=True
    )
    table = curves.effects_over_training(trials, points, ["penalty", "temperature"], REFERENCE)
    assert set(table.loc[table["name"] == "temperature", "term"]) == {"2x vs 1x"}  # no "n/a vs 1x"
    assert set(table.loc[table["name"] == "penalty", "term"]) == {"on vs off", "rbf vs off"}
