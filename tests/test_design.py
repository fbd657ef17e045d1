"""Design expansion: full factorial, `when` conditions, fractional factorial, identifiers and configs."""

from __future__ import annotations

import itertools
import math

import pytest
import yaml

from ablate.config import RunConfig, from_dict
from ablate.design import detectable_effects, expand
from ablate.spec import Study, StudyError

BASE = {
    "name": "demo",
    "seeds": 2,
    "fixed": {
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context": 32},
        "train": {"tokens": 4096},
    },
    "resources": {"cpu": 2},
}


def study(factors: dict, **extra) -> Study:
    return Study.model_validate({**BASE, "factors": factors, **extra})


REPLICATION = {
    "metric": {"levels": ["sdpa", "rbf", "penalty"]},
    "position": {"levels": ["rope", "susie", "none"]},
    "registers": {"levels": [0, 1]},
    "register_init": {"levels": ["zero", "normal"], "when": {"registers": [1]}},
}


def test_full_factorial_crosses_every_level_in_declaration_order():
    design = expand(
        study({"metric": {"levels": ["sdpa", "rbf"]}, "position": {"levels": ["rope", "susie", "none"]}})
    )
    assert [tuple(c.levels.values()) for c in design.cells] == list(
        itertools.product(["sdpa", "rbf"], ["rope", "susie", "none"])
    )
    assert len(design.trials) == 12
    assert [t.seed for t in design.trials] == [0] * 6 + [1] * 6  # complete replicates first


def test_when_condition_nests_a_factor_inside_the_levels_where_it_applies():
    design = expand(study(REPLICATION))
    assert len(design.cells) == 3 * 3 * (1 + 2)
    for cell in design.cells:
        assert ("register_init" in cell.levels) == (cell.levels["registers"] == "1")
    without = next(t for t in design.trials if t.cell.levels["registers"] == "0")
    cfg = from_dict(RunConfig, without.tree)
    assert cfg.model.registers == 0 and cfg.model.register_init == "zero"  # the default stays
    table = design.table()
    assert set(table.loc[table["registers"] == "0", "register_init"]) == {""}


def test_trial_config_is_fixed_plus_levels_plus_seed_and_threads():
    factors = {
        "metric": {"levels": ["sdpa", "penalty"]},
        "temperature": {
            "levels": {"1x": {"model.gamma_scale": 1.0}, "2x": {"model": {"gamma_scale": 2.0, "lam": 0.1}}}
        },
    }
    design = expand(study(factors))
    trial = next(
        t
        for t in design.trials
        if t.cell.levels == {"metric": "penalty", "temperature": "2x"} and t.seed == 1
    )
    cfg = from_dict(RunConfig, trial.tree)
    assert (cfg.model.metric, cfg.model.gamma_scale, cfg.model.lam, cfg.seed) == ("penalty", 2.0, 0.1, 1)
    assert cfg.model.n_layers == 1 and cfg.train.tokens == 4096
    assert cfg.train.threads == 2  # one torch thread per CPU of the trial's resources
    assert BASE["fixed"]["model"] == {
        "n_layers": 1,
        "d_model": 32,
        "n_heads": 2,
        "context": 32,
    }  # not mutated


def test_identifiers_are_unique_and_stable_under_reordering_and_new_levels():
    design = expand(study(REPLICATION))
    ids = [t.trial_id for t in design.trials]
    assert len(set(ids)) == len(ids)
    reordered = dict(reversed(list(REPLICATION.items())))
    reordered = {
        "registers": REPLICATION["registers"],
        **{k: v for k, v in reordered.items() if k != "registers"},
    }
    assert {t.trial_id for t in expand(study(reordered)).trials} == set(ids)
    wider = {
        **REPLICATION,
        "registers": {"levels": [0, 1, 2]},
        "register_init": {**REPLICATION["register_init"]},
    }
    wider["register_init"]["when"] = {"registers": [1, 2]}
    grown = {t.trial_id for t in expand(study(wider, seeds=3)).trials}
    assert set(ids) < grown  # new levels and seeds add trials; the existing ones keep their ids


def test_config_hash_follows_the_settings():
    first = expand(study(REPLICATION)).trials[0]
    changed = Study.model_validate(
        {**BASE, "factors": REPLICATION, "fixed": {**BASE["fixed"], "train": {"tokens": 8192}}}
    )
    second = expand(changed).trials[0]
    assert first.trial_id == second.trial_id
    assert first.config_hash != second.config_hash
    assert first.config_hash == expand(study(REPLICATION)).trials[0].config_hash


TWO_LEVEL = {
    "a": {"key": "model.metric", "levels": ["sdpa", "rbf"]},
    "b": {"key": "model.position", "levels": ["rope", "susie"]},
    "c": {"key": "model.registers", "levels": [0, 1]},
    "d": {"key": "model.bias", "levels": [True, False]},
    "e": {"key": "model.gamma_scale", "levels": [1.0, 2.0]},
}


def _coded(design, factor):
    levels = design.study.factors[factor].level_names()
    return [1 if c.levels[factor] == levels[1] else -1 for c in design.cells]


def test_fractional_factorial_follows_its_generators_and_is_orthogonal():
    design = expand(study(TWO_LEVEL, design={"type": "fractional", "generators": ["D=ABC", "E=-AB"]}))
    assert len(design.cells) == 8
    a, b, c, d, e = (_coded(design, f) for f in "abcde")
    assert d == [x * y * z for x, y, z in zip(a, b, c, strict=True)]
    assert e == [-x * y for x, y in zip(a, b, strict=True)]
    for u, v in itertools.combinations([a, b, c, d, e], 2):
        assert sum(u) == 0 and sum(x * y for x, y in zip(u, v, strict=True)) == 0  # balanced, orthogonal
    assert design.resolution == 3  # I = ABCD = ABE = CDE
    a_line = next(line for line in design.aliases() if line.startswith("a = "))
    assert set(a_line.removeprefix("a = ").split(" = ")) == {"b*e", "b*c*d"}


def test_fractional_resolution_iv_and_names_in_generators():
    design = expand(
        study(
            dict(list(TWO_LEVEL.items())[:4]),
            design={"type": "fractional", "generators": ["d=a*b*c"], "resolution": 4},
        )
    )
    assert len(design.cells) == 8 and design.resolution == 4
    assert "a*b = c*d" in design.aliases()


@pytest.mark.parametrize(
    ("generators", "fragment"),
    [
        (["D=AB", "E=AB"], "resolution II"),
        (["D=A"], "two or more"),
        (["D=ABD"], "two or more"),
        (["D=ABC", "E=AD"], "base factors"),
    ],
)
def test_bad_fractional_generators_are_errors(generators, fragment):
    with pytest.raises(StudyError, match=fragment):
        expand(study(TWO_LEVEL, design={"type": "fractional", "generators": generators}))


def test_detectable_effect_shrinks_with_seeds_and_needs_replication():
    few, many = (expand(study(REPLICATION, seeds=n)) for n in (2, 8))
    effect = {r["term"]: r["mde"] for r in detectable_effects(few, 0.02)}
    more = {r["term"]: r["mde"] for r in detectable_effects(many, 0.02)}
    assert 0 < more["metric"] < effect["metric"]
    assert "registers*register_init" not in effect  # nested: no interaction with its parent
    one_seed = detectable_effects(expand(study(REPLICATION, seeds=1)), 0.02)
    assert all(math.isnan(r["mde"]) for r in one_seed)


def test_study_yaml_round_trip_matches_the_schema(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "factors": REPLICATION}, sort_keys=False))
    from ablate.design import load_design

    design = load_design(path)
    assert design.output_dir == (tmp_path / "runs" / "demo").resolve()
    assert design.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/runs/demo/mlflow.db"
    assert design.tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert design.experiment == "demo"


def test_plan_prints_design_cost_and_detectable_effects(tmp_path):
    from typer.testing import CliRunner

    from ablate.cli import app

    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({**BASE, "factors": REPLICATION, "resources": {"cpu": 1, "gpu": 0.5}}, sort_keys=False)
    )
    result = CliRunner().invoke(app, ["plan", str(path), "--tokens-per-s", "1024", "--seed-sd", "0.02"])
    assert result.exit_code == 0, result.output
    assert "27 cells x 2 seeds = 54 trials" in result.output
    minutes = 54 * 4096 / 1024 / 60  # 3.6
    assert f"{minutes:.1f} min of trial time at 1,024 tokens/s" in result.output
    assert f"GPU time: {minutes * 0.5:.1f} min (0.5 GPU per trial)" in result.output
    assert "assumed rate" not in result.output
    mde = next(
        r["mde"] for r in detectable_effects(expand(study(REPLICATION)), 0.02) if r["term"] == "metric"
    )
    assert f"{mde:.4g}" in result.output


def test_plan_assumes_a_rate_that_fits_the_resources_asked_for():
    from pathlib import Path

    from typer.testing import CliRunner

    from ablate.cli import CPU_TOKENS_PER_S, app

    quickstart = Path(__file__).parent.parent / "studies" / "quickstart.yaml"
    result = CliRunner().invoke(app, ["plan", str(quickstart)])
    assert result.exit_code == 0, result.output
    minutes = 36 * 100_000 / CPU_TOKENS_PER_S / 60  # 1 CPU per trial, no GPU
    assert f"at {CPU_TOKENS_PER_S:,.0f} tokens/s per trial" in result.output
    assert f"CPU time: {minutes:.1f} min (1 CPU per trial, no GPU)" in result.output
    assert "assumed rate" in result.output


def test_paths_in_a_study_file_are_read_against_its_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ablate.cli import app
    from ablate.design import load_design

    folder = tmp_path / "project"
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "a.txt").write_text("one story.\n\nanother story.\n")
    spec = {
        **BASE,
        "factors": {"metric": {"levels": ["sdpa", "rbf"]}},
        "fixed": {**BASE["fixed"], "data": {"source": "docs/*.txt", "cache_dir": "cache"}},
        "output": "out",
        "tracking": {"uri": "sqlite:///store/mlflow.db"},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the same study, validated from another folder

    result = CliRunner().invoke(app, ["validate", "../project/study.yaml"])
    assert result.exit_code == 0, result.output
    design = load_design(path)
    data = design.run_tree(design.trials[0])["data"]
    assert data == {
        "source": str(folder.resolve() / "docs/*.txt"),
        "cache_dir": str(folder.resolve() / "cache"),
    }
    assert design.trials[0].tree["data"]["source"] == "docs/*.txt"  # the settings as written (config hash)
    assert design.output_dir == folder.resolve() / "out"
    assert design.tracking_uri() == f"sqlite:///{folder.resolve()}/store/mlflow.db"
    assert not (elsewhere / "docs").exists() and list(elsewhere.iterdir()) == []


def test_a_missing_relative_source_is_reported_against_the_study_folder(tmp_path):
    from ablate.design import load_design

    spec = {**BASE, "factors": {"metric": {"levels": ["sdpa", "rbf"]}}}
    spec["fixed"] = {**BASE["fixed"], "data": {"source": "missing/*.txt"}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyError, match=r"fixed\.data\.source"):
        load_design(path)


def test_large_designs_fail_without_being_expanded():
    from ablate.spec import MAX_TRIALS

    wide = {  # 2^40 cells: generated lazily, so the limit is found after MAX_TRIALS + 1 of them
        f"f{i}": {"key": "model.gamma_scale" if i == 0 else "model.gamma", "levels": [1.0, 2.0]}
        for i in range(40)
    }
    with pytest.raises(StudyError, match=f"more than {MAX_TRIALS:,} trials"):
        expand(study(wide, seeds=1))
    fractional = {f"f{i}": {"key": "model.gamma_scale", "levels": [1.0, 2.0]} for i in range(41)}
    generators = {"type": "fractional", "generators": ["f40=f0*f1"]}
    with pytest.raises(StudyError, match="2\\^40 = 1,099,511,627,776 cells"):
        expand(study(fractional, seeds=1, design=generators))
