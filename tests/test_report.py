"""The report: HTML (self-contained), Markdown, CSV per table, one JSON, the plain-words summary, and
the `ablate analyze` command body."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from ablate.analysis import analyze
from ablate.analysis.simulate import replication_study, simulate_curves, simulate_trials
from ablate.report import from_table, summary_text, write_report

FACTORS = ["metric", "position", "registers", "register_init"]
COMPARISON = "paper: metric=sdpa,position=rope,registers=0 -> metric=rbf,position=susie,registers=1,register_init=zeros"


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    return simulate_trials(replication_study(), n_seeds=4, rng=np.random.default_rng(0))


@pytest.fixture(scope="module")
def analysis(trials):
    return analyze(
        trials,
        FACTORS,
        "val_loss",
        comparisons=[COMPARISON],
        secondary=["sink_mass"],
        vocab_size=50_000,
    )


@pytest.fixture(scope="module")
def written(analysis, trials, tmp_path_factory):
    curves = simulate_curves(trials, n_points=5, rng=np.random.default_rng(1))
    return write_report(analysis, tmp_path_factory.mktemp("report"), curves=curves, title="Replication")


def test_every_output_file_is_written(written):
    for name in (
        "report.html",
        "report.md",
        "results.json",
        "figures/loss_curves.png",
        "figures/shapley_1.png",
    ):
        assert written[name].is_file(), name
    tables = {name for name in written if name.startswith("tables/")}
    for name in ("anova", "effects", "power", "shapley", "ablation_paths", "divergence_by_cell", "frames"):
        assert f"tables/{name}.csv" in tables


def test_html_is_self_contained_with_every_figure_embedded(written):
    html = written["report.html"].read_text()
    figures = [name for name in written if name.startswith("figures/")]
    assert len(re.findall(r"<img [^>]*src='data:image/png;base64,", html)) == len(figures) >= 8
    assert not re.search(r"(src|href)=['\"](https?:|/|figures/)", html)
    assert "explains" in html and "Trials used by each test" in html


def test_markdown_links_figures_that_exist(written):
    markdown = written["report.md"].read_text()
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", markdown)
    assert links and all(name in written for name in links)


def test_json_and_csv_hold_the_same_numbers_as_the_analysis(written, analysis):
    document = json.loads(written["results.json"].read_text())
    assert document["summary"] == summary_text(analysis)
    assert len(document["tables"]["anova"]) == len(analysis.primary.anova)
    shapley = pd.read_csv(written["tables/shapley.csv"])
    np.testing.assert_allclose(shapley["estimate"], analysis.comparisons[0].shapley["estimate"])
    assert document["comparisons"][0]["players"] == ["metric", "position", "registers+register_init"]
    frames = pd.read_csv(written["tables/frames.csv"])
    assert frames["trial_ids"].str.split().map(len).tolist() == frames["n_used"].tolist()


def test_summary_gives_a_verdict_per_factor_and_comparison(analysis):
    text = summary_text(analysis)
    for factor in FACTORS:
        assert re.search(
            rf"^  - {factor}( \(within registers in {{1, 4}}\))?: "
            "(matters|no detectable effect|its effect depends on|not significant once adjusted)",
            text,
            re.M,
        )
    assert re.search(r"paper: (the target's val_loss is lower|no detectable difference)", text)
    assert re.search(r"position explains \d+% of the difference: -0\.\d+ nats \[-0\.\d+, -0\.\d+\]", text)
    assert "adjusted p" in text and "diverged" in text


def test_from_table_prints_the_summary_and_the_paths(tmp_path, trials, capsys):
    table = tmp_path / "trials.csv"
    trials.to_csv(table, index=False)
    code = from_table(table, FACTORS, "val_loss", [COMPARISON], tmp_path / "out", secondary=["sink_mass"])
    out = capsys.readouterr().out
    assert code == 0
    assert "position" in out and str(tmp_path / "out" / "report.html") in out
    assert (tmp_path / "out" / "results.json").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"table": "missing.csv"}, "not found"),
        ({"factors": ["metric", "gamma"]}, "column(s) ['gamma'] not in the table"),
        ({"response": "val_los"}, "column(s) ['val_los'] not in the table"),
        ({"compare": ["metric=sdpa -> metric=flash"]}, "unknown level 'flash'"),
        ({"compare": ["metric=sdpa, metric=rbf"]}, "one '->'"),
        ({"adjust": "bonferroni"}, "unknown adjustment"),
    ],
)
def test_user_mistakes_give_one_error_line_and_exit_code_two(tmp_path, trials, capsys, change, message):
    table = tmp_path / "trials.parquet"
    trials.to_parquet(table)
    arguments = {
        "table": table,
        "factors": FACTORS,
        "response": "val_loss",
        "compare": [],
        "out_dir": tmp_path / "o",
    }
    arguments |= {key: tmp_path / value if key == "table" else value for key, value in change.items()}
    code = from_table(**arguments)
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: ") and error.count("\n") == 1
    assert message in error and "Traceback" not in error
