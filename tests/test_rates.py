"""`ablate plan` prices a GPU study from the nearest measured rate (ablate/rates.json) and names it."""

from pathlib import Path

from typer.testing import CliRunner

from ablate import rates
from ablate.cli import app

STUDIES = Path(__file__).resolve().parents[1] / "studies"
ROWS = [
    {"vocab": 8192, "trials_per_gpu": 1, "tokens_per_trial": 25_000_000, "tokens_per_s_per_gpu": 1.0},
    {"vocab": 8192, "trials_per_gpu": 1, "tokens_per_trial": None, "tokens_per_s_per_gpu": 2.0},
    {"vocab": 50257, "trials_per_gpu": 1, "tokens_per_trial": None, "tokens_per_s_per_gpu": 3.0},
    {"vocab": 50257, "trials_per_gpu": 4, "tokens_per_trial": None, "tokens_per_s_per_gpu": 4.0},
]


def test_nearest_row_by_vocabulary_then_packing_then_trial_length():
    assert rates.nearest(8192, 1, 20_000_000, ROWS).tokens_per_s_per_gpu == 1.0  # a short-trial study
    assert rates.nearest(8192, 1, 500_000_000, ROWS).tokens_per_s_per_gpu == 2.0  # long trials
    assert rates.nearest(32000, 1, 500_000_000, ROWS).tokens_per_s_per_gpu == 3.0  # nearer 50257 than 8192
    assert rates.nearest(50257, 4, 500_000_000, ROWS).tokens_per_s_per_gpu == 4.0
    assert rates.nearest(50257, 1, 1e6, []) is None


def test_nearest_row_under_mps_when_two_rows_differ_only_in_it():
    rows = [*ROWS, {**ROWS[3], "mps": True, "tokens_per_s_per_gpu": 5.0}]
    assert rates.nearest(50257, 4, 500_000_000, rows).tokens_per_s_per_gpu == 4.0
    assert rates.nearest(50257, 4, 500_000_000, rows, mps=True).tokens_per_s_per_gpu == 5.0
    assert rates.nearest(50257, 1, 500_000_000, rows, mps=True).tokens_per_s_per_gpu == 3.0  # packing first
    assert (
        "trial(s) per GPU, MPS,"
        in rates.Rate(5.0, {**rows[-1], **{k: "x" for k in ("what", "command", "gpu", "date")}}).describe()
    )


def test_vocabulary_from_the_data_settings():
    assert rates.study_vocab({"source": "random:50257"}) == (50257, False)
    assert rates.study_vocab({"source": "pkg:english-v1", "tokenizer": "bpe:8192"}) == (8192, False)
    assert rates.study_vocab({"tokenizer": "hf:EleutherAI/gpt-neo-125M"}) == (50257, True)


def test_every_shipped_row_is_complete():
    for row in rates.load_rows():
        assert {"gpu", "vocab", "trials_per_gpu", "tokens_per_s_per_gpu", "date", "what", "command"} <= set(
            row
        )
        assert row["tokens_per_s_per_gpu"] > 0


def test_plan_names_the_measurement_it_used():
    # decomposition.yaml: bpe:8192, four trials per GPU under MPS, 25M tokens per trial, CUDA graphs
    row = rates.nearest(8192, 4, 25_000_000, mps=True).row
    result = CliRunner().invoke(app, ["plan", str(STUDIES / "decomposition.yaml")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    per_trial = row["tokens_per_s_per_gpu"] / 4
    assert f"{per_trial:,.0f} tokens/s per trial" in text and row["what"] in text
    assert "an assumed rate" not in text


def test_plan_keeps_the_assumed_rate_off_the_fast_path():
    result = CliRunner().invoke(app, ["plan", str(STUDIES / "gpu_short.yaml")])  # eager: no CUDA graphs
    assert result.exit_code == 0, result.output
    assert "an assumed rate" in " ".join(result.output.split())


def test_a_steady_rate_gets_the_measured_fixed_costs_and_a_study_rate_does_not():
    fixed = rates.fixed_costs()
    assert fixed.per_trial_s > 0 and fixed.start_s > 0
    steady = CliRunner().invoke(app, ["plan", str(STUDIES / "decomposition.yaml")])  # a steady row
    text = " ".join(steady.output.split())
    assert steady.exit_code == 0, steady.output
    assert f"plus {fixed.per_trial_s:g} s fixed per trial" in text and fixed.row["what"] in text
    assert f"{fixed.start_s:g} s of wall clock per launch" in text
    study = CliRunner().invoke(app, ["plan", str(STUDIES / "gpu_scaling.yaml")])  # a study's own rate
    assert study.exit_code == 0, study.output
    assert "fixed per trial" not in " ".join(study.output.split())


def test_fixed_seconds_are_added_to_every_trial():
    from ablate.design import load_design, trial_hours

    design = load_design(STUDIES / "decomposition.yaml")
    bare, fixed = trial_hours(design, 1e6), trial_hours(design, 1e6, fixed_s=36.0)
    assert len(bare) == len(fixed) == 80
    assert all(abs(f - b - 0.01) < 1e-12 for b, f in zip(bare, fixed, strict=True))  # 36 s = 0.01 h
