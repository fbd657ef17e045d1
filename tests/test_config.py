"""Malformed run configs (`ablate train run.yaml --set ...`): one clear error naming the key, exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ablate.cli import app

VALID = b"""model: {n_layers: 1, d_model: 32, n_heads: 2, context: 32}
data: {source: stories, tokenizer: bytes, corpus_docs: 20, val_tokens: 256}
train: {tokens: 512, batch_size: 4, device: cpu}
"""

# (id, run.yaml bytes, --set overrides, fragments the error must contain)
CASES = [
    ("duplicate-section", VALID + b"model: {n_layers: 2}\n", [], ["key 'model' is given twice", "line 1"]),
    ("duplicate-key", VALID.replace(b"tokens: 512", b"tokens: 512, tokens: 1024"), [], ["key 'tokens'"]),
    ("not-utf8", VALID + b"# caf\xe9\n", [], ["not UTF-8", "byte 0xe9 on line 4"]),
    (
        "alias-bomb",
        b"a: &a [" + b"x, " * 99 + b"x]\nb: &b [" + b"*a, " * 99 + b"*a]\nc: [" + b"*b, " * 99 + b"*b]\n",
        [],
        ["expands to more than 100,000 values"],
    ),
    ("bool-for-int", VALID, ["model.registers=true"], ["model.registers: expected int, got true"]),
    ("text-for-int", VALID, ["train.tokens=lots"], ["train.tokens: expected int, got 'lots'"]),
    (
        "diverge-loss-negative",
        VALID,
        ["train.diverge_loss=-1"],
        ["train.diverge_loss:", "must be a loss > 0"],
    ),
    ("diverge-loss-nan", VALID, ["train.diverge_loss=.nan"], ["train.diverge_loss:", "> 0"]),
    ("lr-zero", VALID, ["optim.lr=0"], ["optim.lr:", "finite number > 0"]),
    ("bad-override-value", VALID, ["model.metric={a: 1, a: 2}"], ["model.metric", "given twice"]),
    ("long-value-not-echoed", VALID, ["model.metric=" + "x" * 100_000], ["model.metric", "xxx"]),
]


@pytest.mark.parametrize(
    ("text", "overrides", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_run_config_is_one_clear_error_with_exit_2(tmp_path, text, overrides, fragments):
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    args = ["train", str(path), *[item for o in overrides for item in ("--set", o)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message[:2000]!r}"
    assert "Traceback" not in result.output and len(result.stderr) < 3000


@pytest.mark.parametrize("command", ["status", "report", "ui"])
def test_commands_that_read_the_store_refuse_an_unknown_tracking_scheme(tmp_path, command):
    from pathlib import Path

    quickstart = (Path(__file__).parent.parent / "studies" / "quickstart.yaml").read_text()
    path = tmp_path / "study.yaml"
    path.write_text(quickstart)
    result = CliRunner().invoke(app, [command, str(path), "--tracking-uri", "bogus://nowhere/x"])
    assert result.exit_code == 2, result.output
    assert "--tracking-uri: MLflow cannot store runs at 'bogus://nowhere/x'" in " ".join(
        result.stderr.split()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


@pytest.mark.parametrize("command", ["run", "status", "report", "ui"])
def test_a_store_that_is_not_an_mlflow_database_is_a_clean_error(tmp_path, command):
    from pathlib import Path

    quickstart = (Path(__file__).parent.parent / "studies" / "quickstart.yaml").read_text()
    path = tmp_path / "study.yaml"
    path.write_text(quickstart)
    store = tmp_path / "runs" / "quickstart" / "mlflow.db"
    store.parent.mkdir(parents=True)
    store.write_text("not a database")
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert (
        f"cannot read the tracking store at sqlite:///{store}" in message
        and "file is not a database" in message
    )
    assert store.read_text() == "not a database" and sorted(p.name for p in store.parent.iterdir()) == [
        "mlflow.db"
    ]


def test_yaml_numbers_without_a_dot_still_read_as_numbers(tmp_path):
    from ablate.config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 1e-4, min_lr: 1e-6}\n")  # YAML 1.1 reads 1e-4 as text
    cfg = load_run_config(path)
    assert (cfg.optim.lr, cfg.optim.min_lr) == (1e-4, 1e-6)
