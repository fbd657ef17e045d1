"""Loading and validating a trials table; parsing comparisons; inferring `when` conditions."""

import numpy as np
import pandas as pd
import pytest

from ablate.analysis import Comparison, StudyDataError, analyze, load_trials, parse_comparison
from ablate.analysis.factors import build_factor_space
from ablate.analysis.simulate import replication_study, simulate_trials
from ablate.analysis.table import prepare_trials

FACTORS = ["metric", "position", "registers", "register_init"]


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    return simulate_trials(replication_study(), n_seeds=2, rng=np.random.default_rng(0))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_load_with_text_levels_and_empty_conditional_values(tmp_path, trials, suffix):
    path = tmp_path / f"trials{suffix}"
    trials.to_csv(path, index=False) if suffix == ".csv" else trials.to_parquet(path)
    loaded = prepare_trials(load_trials(path, FACTORS), FACTORS, ["val_loss"])
    assert sorted(loaded["registers"].unique()) == ["0", "1", "4"]
    assert loaded.loc[loaded["registers"] == "0", "register_init"].isna().all()
    assert loaded["val_loss"].isna().sum() == trials["val_loss"].isna().sum()


def test_numeric_levels_lose_the_float_suffix():
    table = pd.DataFrame({"seed": [0, 1], "status": ["finished"] * 2, "r": [1.0, 4.0], "y": [1.0, 2.0]})
    assert list(prepare_trials(table, ["r"], ["y"])["r"]) == ["1", "4"]


def test_missing_file_and_unknown_format_are_user_errors(tmp_path):
    with pytest.raises(StudyDataError, match="not found"):
        load_trials(tmp_path / "nope.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(StudyDataError, match=r"\.csv or \.parquet"):
        load_trials(tmp_path / "t.xlsx")


def test_missing_column_names_the_available_columns(trials):
    with pytest.raises(StudyDataError, match=r"\['temperature'\].*its columns are"):
        prepare_trials(trials, ["metric", "temperature"], ["val_loss"])


def test_bad_status_and_seed_are_rejected(trials):
    broken = trials.assign(status="done")
    with pytest.raises(StudyDataError, match=r"unknown status.*finished"):
        prepare_trials(broken, ["metric"], ["val_loss"])
    with pytest.raises(StudyDataError, match="seed"):
        prepare_trials(trials.assign(seed=0.5), ["metric"], ["val_loss"])


def test_parse_comparison_reads_both_sides_and_an_optional_name():
    comparison = parse_comparison("paper: metric=sdpa, position=rope -> metric=rbf,position=susie")
    assert comparison.name == "paper"
    assert comparison.baseline == {"metric": "sdpa", "position": "rope"}
    assert comparison.target == {"metric": "rbf", "position": "susie"}
    assert parse_comparison("a=1 -> a=2").name == "a=1 -> a=2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("metric=sdpa metric=rbf", "one '->'"),
        ("metric=sdpa -> metric=rbf -> metric=penalty", "one '->'"),
        ("metric -> metric=rbf", "not 'factor=level'"),
        ("metric=sdpa,metric=rbf -> metric=rbf", "given twice"),
    ],
)
def test_parse_comparison_rejects_bad_syntax(text, message):
    with pytest.raises(ValueError, match=message):
        parse_comparison(text)


def test_parse_comparison_names_valid_factors_and_levels():
    levels = {"metric": ("sdpa", "rbf"), "position": ("rope", "susie")}
    with pytest.raises(ValueError, match=r"unknown factor 'gamma'.*\['metric', 'position'\]"):
        parse_comparison("gamma=1 -> gamma=2", levels)
    with pytest.raises(ValueError, match=r"unknown level 'rfb'.*\['sdpa', 'rbf'\]"):
        parse_comparison("metric=sdpa -> metric=rfb", levels)


def test_conditions_are_inferred_from_empty_values(trials):
    table = prepare_trials(trials, FACTORS, ["val_loss"])
    design = build_factor_space(table, FACTORS, None, {})
    assert design.conditions == {"register_init": {"registers": ("1", "4")}}
    assert len(design.cells()) == 3 * 3 * (1 + 2 + 2)


def test_unexplained_empty_values_and_wrong_conditions_are_errors(trials):
    table = prepare_trials(trials, FACTORS, ["val_loss"])
    table.loc[0, "metric"] = np.nan
    with pytest.raises(StudyDataError, match="'metric' is empty"):
        build_factor_space(table, FACTORS, None, {})
    table = prepare_trials(trials, FACTORS, ["val_loss"])
    with pytest.raises(StudyDataError, match="must be set exactly where registers in"):
        build_factor_space(table, FACTORS, {"register_init": {"registers": ["4"]}}, {})


def test_analyze_rejects_unknown_comparison_levels_and_adjustments(trials):
    with pytest.raises(StudyDataError, match="unknown level 'flash'"):
        analyze(trials, FACTORS, "val_loss", comparisons=["metric=sdpa -> metric=flash"])
    with pytest.raises(StudyDataError, match="unknown adjustment"):
        analyze(trials, FACTORS, "val_loss", adjust="bonferroni")


def test_comparison_levels_given_as_numbers_or_booleans_become_text():
    comparison = Comparison("c", {"registers": 0, "learnable": True}, {"registers": 4.0, "learnable": False})
    assert comparison.baseline == {"registers": "0", "learnable": "true"}
    assert comparison.target == {"registers": "4", "learnable": "false"}
