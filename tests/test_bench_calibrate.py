"""The calibration benchmark: its truth matches the planted study, and a small run prints its table."""

import numpy as np

from ablate.bench.calibrate import SCENARIOS, format_table, main, run_scenario, truth_of


def scenario(name: str):
    return next(item for item in SCENARIOS if item.name == name)


def test_truth_marks_planted_terms_and_null_ones():
    null = truth_of(scenario("null, 3 seeds"))
    assert len(null.null_terms) == 15 and not null.divergent_cells
    assert all(np.allclose(values, 0.0) for parts in null.comparisons.values() for values in parts.values())
    planted = truth_of(scenario("main effect + crossover, 3 seeds"))
    assert {"position", "metric:registers"}.isdisjoint(planted.null_terms)
    assert "metric" in planted.null_terms and "registers" in planted.null_terms  # a pure crossover
    dead = truth_of(scenario("null loss, one cell fully diverged, 3 seeds"))
    assert dead.divergent_cells == {("rbf", "none", "1", "learnable")}
    assert dead.divergent_factors == {"metric", "position", "registers", "gamma_schedule"}


def test_a_small_run_summarises_every_column(capsys):
    summary = run_scenario(scenario("main effect + crossover, 5 seeds"), n_studies=3, seed=1)
    assert summary["studies"] == 3 and summary["any claim"] == 1.0
    assert 0.0 <= summary["coverage"] <= 1.0 and summary["intervals"] == 3 * 7
    assert "power position:" in summary["power"]
    table = format_table([summary])
    assert table.splitlines()[2].startswith("| main effect + crossover, 5 seeds | 3 | 100.0% |")
    main(["--studies", "2", "--scenario", "null, 5 seeds"])
    assert "| null, 5 seeds | 2 |" in capsys.readouterr().out
