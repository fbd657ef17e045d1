"""Malformed study files: each gets one clear error (file, key path, valid choices) and exit status 2."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from ablate.cli import app
from ablate.spec import RESPONSES, load_study

VALID = """
name: demo
factors:
  metric: {levels: [sdpa, rbf, penalty]}
  registers: {levels: [0, 1]}
  register_init: {levels: [zero, normal], when: {registers: [1]}}
seeds: 2
fixed:
  model: {n_layers: 1, d_model: 32, n_heads: 2, context: 32}
  train: {tokens: 4096, batch_size: 4}
responses: {primary: val_loss, secondary: [key_norm_mean]}
comparisons:
  - {name: published, baseline: {metric: sdpa, registers: 0}, target: {metric: rbf, registers: 1}}
resources: {cpu: 1, gpu: 0}
"""


def edit(change) -> str:
    """The valid study with `change(tree)` applied."""
    tree = yaml.safe_load(VALID)
    change(tree)
    return yaml.safe_dump(tree, sort_keys=False)


def _set(path: str, value):
    def change(tree):
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    return change


def _drop(path: str):
    def change(tree):
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node[part]
        del node[leaf]

    return change


FRACTIONAL = """
name: frac
factors:
  a: {key: model.metric, levels: [sdpa, rbf]}
  b: {key: model.position, levels: [rope, susie]}
  c: {key: model.registers, levels: [0, 1]}
  d: {key: model.bias, levels: [true, false]}
seeds: 1
fixed: {model: {n_layers: 1, d_model: 32, n_heads: 2, context: 32}}
design: {type: fractional, generators: ["D=ABC"]}
"""

# (id, study text, fragments the error must contain: key path and the choices/fix)
CASES = [
    (
        "unknown-top-key",
        edit(_set("factor", {})),
        ["factor:", "unknown key", "valid keys here: name, description, factors"],
    ),
    (
        "unknown-factor-key",
        edit(_set("factors.metric.level", [1])),
        ["factors.metric.level:", "levels, key, when"],
    ),
    (
        "unknown-level-value",
        edit(_set("factors.metric.levels", ["sdpa", "rbf", "rbff"])),
        ["factors.metric.levels.rbff", "choose one of ['sdpa', 'rbf', 'penalty']"],
    ),
    (
        "when-missing-factor",
        edit(_set("factors.register_init.when", {"regs": [1]})),
        ["factors.register_init.when.regs", "unknown factor 'regs'", "factors: metric, registers"],
    ),
    (
        "when-unknown-level",
        edit(_set("factors.register_init.when", {"registers": [2]})),
        ["factors.register_init.when.registers", "unknown level '2' of registers", "levels: 0, 1"],
    ),
    (
        "when-declared-later",
        edit(
            lambda t: t["factors"].update(
                {"metric": {"levels": ["sdpa", "rbf"], "when": {"register_init": ["zero"]}}}
            )
        ),
        ["factors.metric.when.register_init", "declare register_init before metric"],
    ),
    ("zero-seeds", edit(_set("seeds", 0)), ["seeds:", "at least one seed"]),
    ("empty-seed-list", edit(_set("seeds", [])), ["seeds:", "at least one seed"]),
    (
        "seeds-wrong-type",
        edit(_set("seeds", "three")),
        ["seeds:", "a number of seeds or a list of integer seeds"],
    ),
    ("duplicate-seeds", edit(_set("seeds", [0, 0])), ["seeds:", "distinct"]),
    ("missing-name", edit(_drop("name")), ["name:", "required key is missing"]),
    ("name-with-space", edit(_set("name", "my study")), ["name:", "no spaces"]),
    ("no-factors", edit(_set("factors", {})), ["factors:", "at least one factor"]),
    (
        "one-level",
        edit(_set("factors.metric.levels", ["sdpa"])),
        ["factors.metric.levels:", "at least two levels"],
    ),
    (
        "duplicate-levels",
        edit(_set("factors.metric.levels", ["sdpa", "sdpa"])),
        ["duplicate level names: sdpa"],
    ),
    (
        "levels-not-list",
        edit(_set("factors.metric.levels", "sdpa")),
        ["factors.metric.levels:", "a list of levels"],
    ),
    ("unknown-fixed-section", edit(_set("fixed.modle", {})), ["fixed.modle:", "model, data, optim, train"]),
    ("unknown-model-key", edit(_set("fixed.model.n_layer", 2)), ["fixed.model.n_layer:", "n_layers"]),
    ("fixed-wrong-type", edit(_set("fixed.train.tokens", "lots")), ["fixed.train.tokens:", "expected int"]),
    (
        "fixed-bad-tokenizer",
        edit(_set("fixed.data", {"tokenizer": "bpe:10"})),
        ["fixed.data.tokenizer:", "bpe:<vocab>"],
    ),
    ("fixed-sets-seed", edit(_set("fixed.seed", 3)), ["fixed.seed:", "seeds come from"]),
    (
        "factor-unknown-config-key",
        edit(_set("factors.metric.key", "model.metrc")),
        ["factors.metric.levels.sdpa:", "model.metrc: unknown key", "metric"],
    ),
    (
        "factor-sets-seed",
        edit(_set("factors.seed", {"key": "seed", "levels": [1, 2]})),
        ["factors.seed:", "set by `seeds`"],
    ),
    (
        "two-factors-one-key",
        edit(_set("factors.other", {"key": "model.metric", "levels": ["sdpa", "rbf"]})),
        ["factors.other:", "model.metric is already set by factor metric"],
    ),
    (
        "unknown-response",
        edit(_set("responses.secondary", ["sink_mass"])),
        ["responses.secondary:", "unknown response 'sink_mass'", ", ".join(RESPONSES[:3])],
    ),
    (
        "comparison-unknown-factor",
        edit(
            _set("comparisons", [{"name": "x", "baseline": {"metrik": "sdpa"}, "target": {"metric": "rbf"}}])
        ),
        ["comparisons[0].baseline.metrik", "unknown factor 'metrik'"],
    ),
    (
        "comparison-unknown-level",
        edit(
            _set("comparisons", [{"name": "x", "baseline": {"metric": "sdpa"}, "target": {"metric": "rfb"}}])
        ),
        ["comparisons[0].target.metric", "unknown level 'rfb' of metric", "levels: sdpa, rbf, penalty"],
    ),
    (
        "comparison-same",
        edit(
            _set("comparisons", [{"name": "x", "baseline": {"metric": "sdpa"}, "target": {"metric": "sdpa"}}])
        ),
        ["comparisons[0]", "the same configuration"],
    ),
    (
        "gpu-fraction",
        edit(_set("resources.gpu", 1.5)),
        ["resources.gpu:", "a fraction in [0, 1] or a whole number"],
    ),
    ("cpu-zero", edit(_set("resources.cpu", 0)), ["resources.cpu:", "greater than 0"]),
    (
        "cuda-settings-without-gpu",
        edit(_set("fixed.train", {"tokens": 4096, "device": "cuda", "loss": "fused"})),
        ["resources.gpu:", "train.device: cuda, train.loss: fused need a GPU", "set resources.gpu"],
    ),
    (
        "max-concurrent-zero",
        edit(_set("max_concurrent", 0)),
        ["max_concurrent:", "greater than or equal to 1"],
    ),
    ("design-type", edit(_set("design", {"type": "partial"})), ["design.type:", "'full' or 'fractional'"]),
    (
        "cell-incompatible",
        edit(
            lambda t: t["factors"].update(
                {
                    "width": {"key": "model.d_model", "levels": [40, 64]},
                    "heads": {"key": "model.n_heads", "levels": [4, 8]},
                }
            )
        ),
        ["cell:", "width=40 heads=8", "head_dim=5 must be even"],
    ),
    (
        "fractional-three-levels",
        FRACTIONAL.replace("levels: [sdpa, rbf]", "levels: [sdpa, rbf, penalty]"),
        ["factors.a:", "two-level factors"],
    ),
    (
        "fractional-unknown-letter",
        FRACTIONAL.replace("D=ABC", "D=ABZ"),
        ["design.generators[0]:", "unknown factor 'Z'", "A=a, B=b, C=c, D=d"],
    ),
    (
        "fractional-wrong-resolution",
        FRACTIONAL.replace('["D=ABC"]', '["D=AB"], resolution: 4'),
        ["design.resolution:", "resolution III (3), not 4"],
    ),
    ("not-a-mapping", "- name: demo\n", ["the top level must be a mapping"]),
    ("bad-yaml", "name: [unclosed\n", ["not valid YAML"]),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_study_is_one_clear_error_with_exit_2(tmp_path, text, fragments):
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(text))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in result.output


def test_there_are_at_least_twenty_malformed_cases():
    assert len(CASES) >= 20


def test_missing_file_names_it(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.stderr and "cannot read" in result.stderr


@pytest.mark.parametrize("case", ["zero-seeds", "unknown-level-value", "cell-incompatible"])
def test_run_with_a_bad_study_launches_and_writes_nothing(tmp_path, case):
    text = next(c[1] for c in CASES if c[0] == case)
    path = tmp_path / "study.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_valid_study_validates(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(VALID)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "9 cells x 2 seeds = 18 trials" in result.output


def test_named_levels_plain_levels_and_seed_count(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        edit(
            _set(
                "factors.temperature",
                {"levels": {"1x": {"model.gamma_scale": 1.0}, "2x": {"model": {"gamma_scale": 2.0}}}},
            )
        )
    )
    study = load_study(path)
    assert study.seed_list == [0, 1]
    assert study.factors["temperature"].settings("temperature") == {
        "1x": {"model.gamma_scale": 1.0},
        "2x": {"model.gamma_scale": 2.0},
    }
    assert study.factors["registers"].settings("registers") == {
        "0": {"model.registers": 0},
        "1": {"model.registers": 1},
    }
    assert study.factors["register_init"].condition() == {"registers": ["1"]}


def test_shipped_studies_validate():
    from pathlib import Path

    studies = sorted((Path(__file__).parent.parent / "studies").glob("*.yaml"))
    assert {p.stem for p in studies} >= {"quickstart", "full_factorial", "seed_replication", "temperature"}
    for path in studies:
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, (path, result.output)
