"""Malformed study files: each gets one clear error (file, key path, valid choices) and exit status 2."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from ablate.cli import app
from ablate.responses import RESPONSES
from ablate.spec import load_study

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
        ["responses.secondary:", "unknown response 'sink_mass'", ", ".join(list(RESPONSES)[:3])],
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
        "mps-not-a-bool",
        edit(_set("resources", {"gpu": 0.25, "mps": "yes"})),
        ["resources.mps:", "expected true, false or auto, got 'yes'"],
    ),
    (
        "mps-without-gpu",
        edit(_set("resources.mps", True)),
        [
            "resources.mps:",
            "trials get no GPU",
            "set resources.gpu (e.g. 0.25: four trials per GPU) or mps: false",
        ],
    ),
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
        ["cell:", "width=40, heads=8", "head_dim=5 must be even"],
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
    # a key given twice: YAML would keep the last one and silently change the study
    ("duplicate-top-key", VALID + "seeds: 3\n", ["key 'seeds' is given twice", "line 7"]),
    (
        "duplicate-factor",
        VALID.replace("factors:\n", "factors:\n  registers: {levels: [0, 2]}\n"),
        ["key 'registers' is given twice", "line 4"],
    ),
    (
        "duplicate-nested-key",
        VALID.replace("{tokens: 4096, batch_size: 4}", "{tokens: 4096, batch_size: 4, tokens: 8192}"),
        ["key 'tokens' is given twice", "first on line 10"],
    ),
    # levels that resolve to one configuration, and values YAML would coerce
    (
        "levels-same-name",
        edit(_set("factors.layers", {"key": "model.n_layers", "levels": [1, 1.0]})),
        ["factors.layers.levels:", "duplicate level names: 1"],  # 1.0 is spelled 1, as a table reads it back
    ),
    (
        "named-levels-same-config",
        edit(_set("factors.scale", {"key": "model.gamma_scale", "levels": {"a": 2, "b": 2.0, "c": 1}})),
        ["factors.scale.levels:", "levels a and b give the same configuration"],
    ),
    (
        "bool-for-int-level",
        edit(_set("factors.layers", {"key": "model.n_layers", "levels": [True, False]})),
        ["factors.layers.levels.true:", "model.n_layers: expected int, got true"],
    ),
    (
        "bool-for-int-fixed",
        edit(_set("fixed.train.batch_size", True)),
        ["fixed.train.batch_size:", "got true"],
    ),
    (
        "text-for-float",
        edit(_set("fixed.optim.lr", "fast")),
        ["fixed.optim.lr:", "expected float, got 'fast'"],
    ),
    ("bool-for-float", edit(_set("fixed.optim.lr", False)), ["fixed.optim.lr:", "expected float, got false"]),
    (
        "diverge-loss-negative",
        edit(_set("fixed.train.diverge_loss", -1)),
        ["fixed.train.diverge_loss:", "must be a loss > 0"],
    ),
    ("diverge-loss-zero", edit(_set("fixed.train.diverge_loss", 0)), ["fixed.train.diverge_loss:", "> 0"]),
    ("lr-zero", edit(_set("fixed.optim.lr", 0)), ["fixed.optim.lr:", "finite number > 0"]),
    ("threads-zero", edit(_set("fixed.train.threads", 0)), ["fixed.train.threads:", ">= 1"]),
    # comparisons must compare like with like
    (
        "comparison-different-factors",
        edit(
            _set("comparisons", [{"name": "x", "baseline": {"metric": "sdpa"}, "target": {"registers": 1}}])
        ),
        ["comparisons[0].baseline:", "no level of registers", "comparisons[0].target:", "no level of metric"],
    ),
    (
        "comparison-missing-factor",
        edit(
            _set(
                "comparisons",
                [{"name": "x", "baseline": {"metric": "sdpa", "registers": 0}, "target": {"metric": "rbf"}}],
            )
        ),
        ["comparisons[0].target:", "no level of registers but the other side does (registers=0)"],
    ),
    (
        "comparison-factor-that-does-not-apply",
        edit(
            _set(
                "comparisons",
                [
                    {
                        "name": "x",
                        "baseline": {"registers": 0, "register_init": "zero"},
                        "target": {"registers": 1, "register_init": "normal"},
                    }
                ],
            )
        ),
        ["comparisons[0].baseline.register_init:", "does not apply where registers in [1]"],
    ),
    # bytes, sizes and limits: a clean error in bounded time, never an echo of the whole input
    ("not-utf8", VALID.encode().replace(b"name: demo", b"name: d\xe9mo"), ["not UTF-8", "0xe9 on line 2"]),
    (
        "alias-bomb",
        "name: bomb\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        )
        + "seeds: *i\n",
        ["expands to more than 100,000 values"],
    ),
    ("deep-nesting", "name: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
    ("huge-seeds", edit(_set("seeds", 100_000_000)), ["seeds:", "100,000,000 seeds", "at most 1,000"]),
    ("huge-seed-value", edit(_set("seeds", [0, 2**40])), ["seeds:", "at most 2147483647"]),
    (
        "too-many-trials",
        edit(
            lambda t: t.update(seeds=1000, factors={**t["factors"], "position": {"levels": ["rope", "none"]}})
        ),
        ["factors:", "1,000 seeds is more than 10,000 trials", "split the study"],
    ),
    (
        "too-many-levels",
        edit(_set("factors.registers.levels", list(range(2000)))),
        ["factors.registers.levels:", "2,000 levels", "at most 1,000"],
    ),
    (
        "long-text-is-not-echoed",
        edit(_set("fixed.model.metric", "x" * 200_000)),
        ["fixed.model.metric", "xxx"],
    ),
    (
        "tracking-uri-unknown-scheme",
        edit(_set("tracking.uri", "bogus://nowhere/x")),
        ["tracking.uri:", "MLflow cannot store runs at 'bogus://nowhere/x'", "sqlite:///PATH"],
    ),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_study_is_one_clear_error_with_exit_2(tmp_path, text, fragments):
    path = write(tmp_path, text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message[:3000]!r}"
    assert "Traceback" not in result.output
    assert len(result.stderr) < 3000  # never the whole input echoed back


def write(folder, text: str | bytes):
    path = folder / "study.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def test_there_are_at_least_twenty_malformed_cases():
    assert len(CASES) >= 20


def test_missing_file_names_it(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.stderr and "cannot read" in result.stderr


RUN_ONLY = [  # studies that validate but cannot run here: (id, change, fragments of the error)
    ("output-under-a-file", _set("output", "study.yaml/runs"), ["output:", "is a file, not a folder"]),
    (
        "output-in-proc",
        _set("output", "/proc/ablate-test/x"),
        ["output:", "cannot create /proc/ablate-test/x"],
    ),
    (
        "sqlite-under-a-file",
        _set("tracking.uri", "sqlite:///study.yaml/mlflow.db"),
        ["tracking.uri:", "is a file, not a folder"],
    ),
    (
        "server-not-answering",
        _set("tracking.uri", "http://127.0.0.1:9"),  # the discard port: nothing listens there
        ["tracking.uri:", "no MLflow server answers at 127.0.0.1:9"],
    ),
    (  # counted as the Ray that the run would start counts them, before it starts
        "more-cpus-than-the-machine",
        _set("resources", {"cpu": 4096, "gpu": 0}),
        ["resources.cpu:", "each trial asks for 4096 CPU but this machine has", "lower resources.cpu"],
    ),
    (
        "more-gpus-than-the-machine",
        _set("resources", {"cpu": 1, "gpu": 64}),
        ["resources.gpu:", "each trial asks for 64 GPU but this machine has", "resources.gpu: 0"],
    ),
]


RUN_CASES = [  # validation errors `run` reports the same way, and the run-only ones
    *[c for c in CASES if c[0] in ("zero-seeds", "unknown-level-value", "cell-incompatible")],
    *[c for c in CASES if c[0] in ("duplicate-factor", "not-utf8", "alias-bomb", "huge-seeds")],
    *[c for c in CASES if c[0] == "tracking-uri-unknown-scheme"],
    *[(name, edit(change), fragments) for name, change, fragments in RUN_ONLY],
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_with_a_bad_study_launches_and_writes_nothing(tmp_path, text, fragments):
    path = write(tmp_path, text)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


MPS_CASES = [  # (id, GPUs here, the control program's path, command-line options, fragments of the error)
    ("no-gpu", 0, "/usr/bin/nvidia-cuda-mps-control", [], ["this machine has none", "set mps: false"]),
    ("no-control", 1, None, [], ["`nvidia-cuda-mps-control`, which is not on PATH here", "set mps: false"]),
    (
        "cluster",
        1,
        "/usr/bin/nvidia-cuda-mps-control",
        ["--ray-address", "127.0.0.1:9"],
        ["drop --ray-address"],
    ),
]


@pytest.mark.parametrize(
    ("gpus", "control", "options", "fragments"), [c[1:] for c in MPS_CASES], ids=[c[0] for c in MPS_CASES]
)
def test_run_with_mps_where_it_cannot_run_launches_and_writes_nothing(
    tmp_path, monkeypatch, gpus, control, options, fragments
):
    import ablate.preflight

    monkeypatch.setattr(ablate.preflight, "local_gpu_count", lambda: gpus)
    monkeypatch.setattr(ablate.preflight.shutil, "which", lambda name: control)
    path = write(tmp_path, edit(_set("resources", {"cpu": 1, "gpu": 0.25, "mps": True})))
    result = CliRunner().invoke(app, ["run", str(path), *options])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    for fragment in ["resources.mps:", *fragments]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_mps_is_off_unless_asked_for(tmp_path):
    assert load_study(write(tmp_path, VALID)).resources.mps is False
    for value in (True, False, "auto"):
        study = load_study(write(tmp_path, edit(_set("resources", {"gpu": 0.25, "mps": value}))))
        assert study.resources.mps is value


def test_run_checks_a_tracking_uri_given_on_the_command_line(tmp_path):
    path = write(tmp_path, VALID)
    result = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", "bogus://nowhere"])
    assert result.exit_code == 2
    assert "--tracking-uri: MLflow cannot store runs" in " ".join(result.stderr.split())
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


def test_version():
    from importlib import metadata

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ablate {metadata.version('ablate')}"


def test_quickstart_ships_the_repository_study_and_keeps_a_users_edits(tmp_path):
    from importlib import resources
    from pathlib import Path

    shipped = (resources.files("ablate") / "studies" / "quickstart.yaml").read_text()
    assert shipped == (Path(__file__).parent.parent / "studies" / "quickstart.yaml").read_text()
    (tmp_path / "quickstart.yaml").write_text(shipped.replace("seeds: 2", "seeds: 3"))
    result = CliRunner().invoke(app, ["quickstart", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "differs from the shipped quickstart" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart.yaml"]  # nothing run, nothing written


@pytest.mark.parametrize("own_tmpdir", [False, True])
def test_a_second_run_of_a_study_on_this_machine_is_refused_while_the_first_runs(
    tmp_path, monkeypatch, own_tmpdir
):
    import os
    import tempfile

    from ablate import launch
    from ablate.design import load_design

    path = write(tmp_path, VALID)
    options = launch.LaunchOptions(None, None, False, None)
    with launch.one_driver(load_design(path), options):  # the first run, still going
        if own_tmpdir:  # the second run started where $TMPDIR names another folder (a batch job's own)
            (tmp_path.parent / "other_tmp").mkdir(exist_ok=True)
            monkeypatch.setenv("TMPDIR", str(tmp_path.parent / "other_tmp"))
            monkeypatch.setattr(tempfile, "tempdir", None)  # read $TMPDIR again
        result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert f"another `ablate run` of this study is running (pid {os.getpid()})" in message
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # nothing written
    with launch.one_driver(load_design(path), options):  # released when the first ended
        pass


def test_a_study_asks_for_mps_when_true_or_auto_with_trials_sharing_a_gpu():
    from ablate.spec import Resources

    asks = {
        (mps, gpu): Resources(mps=mps, gpu=gpu).asks_for_mps
        for mps in (True, False, "auto")
        for gpu in (0.25, 1.0)
    }
    assert asks == {
        (True, 0.25): True,
        (True, 1.0): True,
        (False, 0.25): False,
        (False, 1.0): False,
        ("auto", 0.25): True,
        ("auto", 1.0): False,
    }
    assert not Resources(mps="auto", gpu=0.0).asks_for_mps
