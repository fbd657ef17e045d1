"""Simulated studies with planted effects, for tests and the report benchmark."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ablate.analysis.factors import FactorSpace
from ablate.levels import NOT_APPLICABLE


@dataclass(frozen=True)
class PlantedStudy:
    """True cell means = base + main effects + two-way interactions; noise per trial and per seed.

    Departures a real study may show: `seed_factor_sd` (per factor, a random effect per seed and level:
    seeds differ in how much the factor helps), `level_variance` (noise variance multiplied in cells
    with that factor level), `failed_rate` (trials lost to infrastructure), `divergence_rate` (every
    trial), `divergence` (per factor level) and `dead_cells` (cells where every trial diverges)."""

    levels: dict[str, tuple[str, ...]]
    main_effects: dict[str, dict[str, float]] = field(default_factory=dict)
    interactions: dict[tuple[str, str], dict[tuple[str, str], float]] = field(default_factory=dict)
    conditions: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    divergence: dict[tuple[str, str], float] = field(default_factory=dict)
    base: float = 3.5
    noise_sd: float = 0.01
    seed_sd: float = 0.005
    seed_factor_sd: dict[str, float] = field(default_factory=dict)
    level_variance: dict[tuple[str, str], float] = field(default_factory=dict)
    failed_rate: float = 0.0
    divergence_rate: float = 0.0
    dead_cells: tuple[tuple[tuple[str, str], ...], ...] = ()

    def factor_space(self) -> FactorSpace:
        reference = {name: levels[0] for name, levels in self.levels.items()}
        return FactorSpace(tuple(self.levels), dict(self.levels), dict(self.conditions), reference)

    def cell_mean(self, cell: dict[str, str]) -> float:
        value = self.base
        for factor, effects in self.main_effects.items():
            value += effects.get(cell.get(factor, NOT_APPLICABLE), 0.0)
        for (first, second), effects in self.interactions.items():
            value += effects.get((cell.get(first), cell.get(second)), 0.0)
        return value

    def divergence_probability(self, cell: dict[str, str]) -> float:
        chance = [p for (factor, level), p in self.divergence.items() if cell.get(factor) == level]
        if any(all(cell.get(name) == level for name, level in dead) for dead in self.dead_cells):
            return 1.0
        return max([*chance, self.divergence_rate], default=0.0)

    def noise_scale(self, cell: dict[str, str]) -> float:
        variance = math.prod(v for (name, level), v in self.level_variance.items() if cell.get(name) == level)
        return self.noise_sd * math.sqrt(variance)


def _seed_factor_effects(study: PlantedStudy, n_seeds: int, rng: np.random.Generator) -> dict:
    # (seed, factor, level) -> offset; empty (no draws) unless the study asks for them
    return {
        (seed, name, level): rng.normal(0.0, sd)
        for name, sd in study.seed_factor_sd.items()
        for seed in range(n_seeds)
        for level in study.levels[name]
    }


def simulate_trials(study: PlantedStudy, n_seeds: int, rng: np.random.Generator) -> pd.DataFrame:
    """One row per (cell, seed) with status, val_loss and two diagnostics; n/a levels left empty."""
    cells = study.factor_space().cells().to_dict("records")
    seed_offsets = rng.normal(0.0, study.seed_sd, size=n_seeds)
    random_effects = _seed_factor_effects(study, n_seeds, rng)
    rows = []
    for seed in range(n_seeds):
        for cell in cells:
            loss = study.cell_mean(cell) + seed_offsets[seed] + rng.normal(0.0, study.noise_scale(cell))
            loss += sum(random_effects.get((seed, name, level), 0.0) for name, level in cell.items())
            diverged = rng.random() < study.divergence_probability(cell)
            failed = study.failed_rate > 0 and rng.random() < study.failed_rate
            status = "failed" if failed else "diverged" if diverged else "finished"
            lost = status != "finished"
            rows.append(
                {
                    "trial_id": f"t{len(rows):05d}",
                    **{name: (np.nan if level == NOT_APPLICABLE else level) for name, level in cell.items()},
                    "seed": seed,
                    "status": status,
                    "diverged_step": 400 if status == "diverged" else np.nan,
                    "val_loss": np.nan if lost else loss,
                    "sink_mass": np.nan if lost else rng.beta(2, 5),
                    "key_norm_mean": np.nan if lost else rng.normal(4.0, 0.3),
                }
            )
    return pd.DataFrame(rows)


def simulate_curves(trials: pd.DataFrame, n_points: int, rng: np.random.Generator) -> pd.DataFrame:
    """Long-format loss curves ending at each trial's val_loss (diverged curves stop early)."""
    frames = []
    steps = np.linspace(100, 1000, n_points).astype(int)
    for trial in trials.itertuples():
        final = trial.val_loss if math.isfinite(trial.val_loss) else 4.0
        shown = steps[steps < 400] if trial.status == "diverged" else steps
        loss = final + 3.0 * np.exp(-shown / 250.0) + rng.normal(0.0, 0.005, size=len(shown))
        frames.append(
            pd.DataFrame(
                {"trial_id": trial.trial_id, "step": shown, "tokens": shown * 4096, "val_loss": loss}
            )
        )
    return pd.concat(frames, ignore_index=True)


def replication_study() -> PlantedStudy:
    """The RBF replication design (45 cells) with plausible planted effects in nats."""
    return PlantedStudy(
        levels={
            "metric": ("sdpa", "penalty", "rbf"),
            "position": ("rope", "susie", "none"),
            "registers": ("0", "1", "4"),
            "register_init": ("zeros", "normal"),
        },
        main_effects={
            "metric": {"penalty": -0.010, "rbf": -0.012},
            "position": {"susie": -0.030, "none": 0.050},
            "registers": {"1": -0.005, "4": -0.006},
            "register_init": {"normal": 0.004},
        },
        interactions={("metric", "position"): {("rbf", "rope"): 0.010, ("penalty", "rope"): 0.004}},
        conditions={"register_init": {"registers": ("1", "4")}},
        divergence={("position", "none"): 0.08},
    )
