"""Calibration of the verdict on simulated studies of the shipped designs' shapes.

    python -m ablate.bench.calibrate [--studies 500] [--scenario NAME ...] [--jobs 1] [--seed 0]

For each scenario it simulates studies, runs `analyze` (primary response only, no report) and prints:
the share of studies whose verdict text makes any claim (`verdicts.claim_lines`); the family-wise error
of each family (a claim about a quantity whose true value is zero: ANOVA terms, comparisons with their
Shapley values and order tests, divergence tests); the coverage of the 95% intervals of level
differences, comparison totals and Shapley values; and the power for planted effects. Shapes: the
full factorial (3 x 3 x 2 x 3 cells, 3 seeds, studies/full_factorial.yaml) and the seed replication
(2 x 2 x 2 cells, 5 seeds, studies/seed_replication.yaml), with their comparisons.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ablate.analysis import Comparison, analyze
from ablate.analysis.anova import term_basis
from ablate.analysis.cells import CellTable
from ablate.analysis.effects import main_effects
from ablate.analysis.shapley import decompose
from ablate.analysis.simulate import PlantedStudy, simulate_trials
from ablate.analysis.threads import one_blas_thread
from ablate.report.verdicts import claim_lines, verdict_sections

TOLERANCE = 1e-9


@dataclass(frozen=True)
class Shape:
    """A shipped design: levels, seeds and comparisons."""

    levels: dict[str, tuple[str, ...]]
    n_seeds: int
    comparisons: tuple[Comparison, ...]


FULL_FACTORIAL = Shape(
    levels={
        "metric": ("sdpa", "rbf", "penalty"),
        "position": ("rope", "susie", "none"),
        "registers": ("0", "1"),
        "gamma_schedule": ("constant", "warmup", "learnable"),
    },
    n_seeds=3,
    comparisons=(
        Comparison(
            "rbf_vs_sdpa",
            {"metric": "sdpa", "position": "rope", "registers": "0", "gamma_schedule": "constant"},
            {"metric": "rbf", "position": "susie", "registers": "1", "gamma_schedule": "constant"},
        ),
        Comparison(
            "geometry_only",
            {"metric": "sdpa", "position": "rope", "registers": "0", "gamma_schedule": "constant"},
            {"metric": "penalty", "position": "rope", "registers": "0", "gamma_schedule": "constant"},
        ),
    ),
)
SEED_REPLICATION = Shape(
    levels={"metric": ("sdpa", "rbf"), "position": ("rope", "susie"), "register_init": ("normal", "zero")},
    n_seeds=5,
    comparisons=(
        Comparison(
            "published",
            {"metric": "sdpa", "position": "rope", "register_init": "normal"},
            {"metric": "rbf", "position": "susie", "register_init": "zero"},
        ),
    ),
)


@dataclass(frozen=True)
class Scenario:
    """A shape, the departures from the null it plants, and which planted terms count for power."""

    name: str
    shape: Shape
    study: dict = field(default_factory=dict)
    planted_terms: tuple[str, ...] = ()
    described: tuple[str, ...] = ()  # factors whose line must say "depends on"


CROSSOVER_3 = {
    ("metric", "registers"): {
        ("rbf", "0"): 0.02,
        ("rbf", "1"): -0.02,
        ("sdpa", "0"): -0.02,
        ("sdpa", "1"): 0.02,
    }
}
CROSSOVER_5 = {
    ("metric", "register_init"): {
        ("rbf", "normal"): 0.02,
        ("rbf", "zero"): -0.02,
        ("sdpa", "normal"): -0.02,
        ("sdpa", "zero"): 0.02,
    }
}
DEAD_CELL = ((("metric", "rbf"), ("position", "none"), ("registers", "1"), ("gamma_schedule", "learnable")),)

SCENARIOS = (
    Scenario("null, 3 seeds", FULL_FACTORIAL),
    Scenario("null, 5 seeds", SEED_REPLICATION),
    Scenario(
        "main effect + crossover, 3 seeds",
        FULL_FACTORIAL,
        {"main_effects": {"position": {"susie": -0.03, "none": 0.03}}, "interactions": CROSSOVER_3},
        planted_terms=("position", "metric:registers"),
        described=("metric", "registers"),
    ),
    Scenario(
        "main effect + crossover, 5 seeds",
        SEED_REPLICATION,
        {"main_effects": {"position": {"susie": -0.03}}, "interactions": CROSSOVER_5},
        planted_terms=("position", "metric:register_init"),
        described=("metric", "register_init"),
    ),
    Scenario(
        "null, one level at 3x variance, 3 seeds",
        FULL_FACTORIAL,
        {"level_variance": {("position", "none"): 3.0}},
    ),
    Scenario(
        "null, one level at 3x variance, 5 seeds",
        SEED_REPLICATION,
        {"level_variance": {("position", "susie"): 3.0}},
    ),
    Scenario(
        "null, seed x metric effect = noise, 3 seeds", FULL_FACTORIAL, {"seed_factor_sd": {"metric": 0.01}}
    ),
    Scenario(
        "null, seed x metric effect = noise, 5 seeds", SEED_REPLICATION, {"seed_factor_sd": {"metric": 0.01}}
    ),
    Scenario("null, 10% trials failed, 3 seeds", FULL_FACTORIAL, {"failed_rate": 0.10}),
    Scenario("null loss, one cell fully diverged, 3 seeds", FULL_FACTORIAL, {"dead_cells": DEAD_CELL}),
    Scenario("null, 5% diverged at random, 3 seeds", FULL_FACTORIAL, {"divergence_rate": 0.05}),
)


def planted(scenario: Scenario) -> PlantedStudy:
    return replace(PlantedStudy(levels=scenario.shape.levels, noise_sd=0.01, seed_sd=0.005), **scenario.study)


# ----- truth ------------------------------------------------------------------------------------------


def noise_free(study: PlantedStudy) -> pd.DataFrame:
    """One trial per cell at its true mean (seed 0), every trial finished."""
    cells = study.factor_space().cells()
    return cells.assign(
        val_loss=[study.cell_mean(cell) for cell in cells.to_dict("records")], seed=0, status="finished"
    )


@dataclass
class Truth:
    effects: pd.DataFrame  # factor, level -> true diff vs reference
    comparisons: dict[str, dict[str, np.ndarray]]  # name -> {"total", "shapley", "order"}
    null_terms: set[str]
    divergent_cells: set[tuple[str, ...]]
    divergent_factors: set[str]


def truth_of(scenario: Scenario) -> Truth:
    study = planted(scenario)
    design = study.factor_space()
    factors = list(design.factors)
    data = noise_free(study)
    table = CellTable(data, factors, "val_loss", design.cells(), [0])
    effects = main_effects(table, factors, design.reference)[["factor", "level", "diff_vs_reference"]]
    comparisons = {}
    for comparison in scenario.shape.comparisons:
        result = decompose(comparison, design, table)
        comparisons[comparison.name] = {
            "total": result.total["estimate"].to_numpy(),
            "shapley": result.shapley["estimate"].to_numpy(),
            "order": result.shapley["order_difference"].to_numpy(),
        }
    null_terms = {
        ":".join(term)
        for size in range(1, len(factors) + 1)
        for term in _combinations(factors, size)
        if np.abs(term_basis(table.cells, factors, term) @ table.means).max() < TOLERANCE
    }
    rates = np.array([study.divergence_probability(cell) for cell in table.cells.to_dict("records")])
    cells = {
        tuple(row)
        for row, rate in zip(table.cells.itertuples(index=False), rates, strict=True)
        if rate > rates.min()
    }
    divergent_factors = {
        name for name in factors if table.cells.assign(rate=rates).groupby(name)["rate"].mean().nunique() > 1
    }
    return Truth(effects, comparisons, null_terms, cells, divergent_factors)


def _combinations(factors: Sequence[str], size: int):
    import itertools

    return itertools.combinations(factors, size)


# ----- one study --------------------------------------------------------------------------------------


def score(scenario: Scenario, truth: Truth, seed: int) -> dict:
    """Simulate and analyse one study; what it claimed, what was false, what its intervals covered."""
    study = planted(scenario)
    trials = simulate_trials(study, scenario.shape.n_seeds, np.random.default_rng(seed))
    factors = list(study.levels)
    # no vocab_size: the capped reanalysis is shown for reference only and feeds no verdict
    analysis = analyze(trials, factors, "val_loss", comparisons=list(scenario.shape.comparisons))
    claims = claim_lines(verdict_sections(analysis))
    anova = analysis.primary.anova
    significant = set(anova.loc[anova["significant"], "term"]) if not anova.empty else set()
    covered, intervals = _effect_coverage(analysis.primary.effects, truth.effects)
    comparison_false = False
    for result in analysis.comparisons:
        true = truth.comparisons[result.name]
        for frame, column, values in (
            (result.total, "p_adj", true["total"]),
            (result.shapley, "p_adj", true["shapley"]),
            (result.shapley, "order_p_adj", true["order"]),
        ):
            if frame.empty or column not in frame:
                continue
            rejected = (frame[column] < analysis.alpha).to_numpy()
            comparison_false |= bool((rejected & (np.abs(values) < TOLERANCE)).any())
        for frame, values in ((result.total, true["total"]), (result.shapley, true["shapley"])):
            if not frame.empty:
                inside = (frame["ci_low"] <= values + TOLERANCE) & (values - TOLERANCE <= frame["ci_high"])
                covered += int(inside.sum())
                intervals += int(frame["ci_low"].notna().sum())
    return {
        "any_claim": bool(claims),
        "false_anova": bool(significant & truth.null_terms),
        "false_comparison": comparison_false,
        "false_divergence": _false_divergence(analysis, truth),
        "covered": covered,
        "intervals": intervals,
        **{f"power {term}": term in significant for term in scenario.planted_terms},
        **{
            f"'depends on' for {name}": any(
                line.startswith(f"{name}: its effect depends on") for line in claims
            )
            for name in scenario.described
        },
    }


def _effect_coverage(effects: pd.DataFrame, truth: pd.DataFrame) -> tuple[int, int]:
    joined = effects[effects["level"] != effects["reference"]].merge(
        truth, on=["factor", "level"], suffixes=("", "_true")
    )
    inside = (joined["diff_vs_reference_ci_low"] <= joined["diff_vs_reference_true"] + TOLERANCE) & (
        joined["diff_vs_reference_true"] - TOLERANCE <= joined["diff_vs_reference_ci_high"]
    )
    return int(inside.sum()), int(joined["diff_vs_reference_ci_low"].notna().sum())


def _false_divergence(analysis, truth: Truth) -> bool:
    divergence = analysis.divergence
    false = False
    if not divergence.tests.empty:
        rejected = set(divergence.tests.loc[divergence.tests["significant"], "factor"])
        false |= bool(rejected - truth.divergent_factors)
    cells = divergence.per_cell
    if "significant" in cells:
        flagged = cells[cells["significant"].fillna(False).astype(bool)]
        keys = {tuple(row) for row in flagged[list(analysis.factors)].itertuples(index=False)}
        false |= bool(keys - truth.divergent_cells)
    return false


# ----- a scenario, the table ----------------------------------------------------------------------------


def run_scenario(scenario: Scenario, n_studies: int, seed: int, jobs: int = 1) -> dict:
    """Score `n_studies` simulated studies of one scenario and summarise them."""
    truth = truth_of(scenario)
    seeds = [seed * 1_000_003 + i for i in range(n_studies)]
    start = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_score_star, [(scenario, truth, s) for s in seeds], chunksize=8))
    else:
        with one_blas_thread():
            rows = [score(scenario, truth, s) for s in seeds]
    elapsed = time.perf_counter() - start
    scores = pd.DataFrame(rows)
    summary = {
        "scenario": scenario.name,
        "studies": n_studies,
        "any claim": scores["any_claim"].mean(),
        "FWER ANOVA": scores["false_anova"].mean(),
        "FWER comparisons": scores["false_comparison"].mean(),
        "FWER divergence": scores["false_divergence"].mean(),
        "coverage": scores["covered"].sum() / max(1, scores["intervals"].sum()),
        "intervals": int(scores["intervals"].sum()),
        "s/study": elapsed / n_studies,
    }
    power = [column for column in scores.columns if column.startswith(("power", "'depends on'"))]
    summary["power"] = "; ".join(f"{column}: {100 * scores[column].mean():.0f}%" for column in power)
    return summary


def _score_star(arguments):
    scenario, truth, seed = arguments
    with one_blas_thread():
        return score(scenario, truth, seed)


def format_table(summaries: list[dict]) -> str:
    """A Markdown table of the summaries."""
    header = "| scenario | studies | any claim | FWER ANOVA | FWER comparisons | FWER divergence | 95% CI coverage (intervals) | power |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        lines.append(
            f"| {s['scenario']} | {s['studies']} | {100 * s['any claim']:.1f}% | {100 * s['FWER ANOVA']:.1f}% | "
            f"{100 * s['FWER comparisons']:.1f}% | {100 * s['FWER divergence']:.1f}% | "
            f"{100 * s['coverage']:.1f}% ({s['intervals']}) | {s['power'] or '-'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=500, help="simulated studies per scenario")
    parser.add_argument("--scenario", action="append", help="run only scenarios whose name contains this")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.scenario or any(part in s.name for part in args.scenario)]
    summaries = []
    for scenario in chosen:
        summaries.append(run_scenario(scenario, args.studies, args.seed, args.jobs))
        print(f"{scenario.name}: {summaries[-1]['s/study']:.2f} s/study", flush=True)
    print(format_table(summaries))


if __name__ == "__main__":
    main()
