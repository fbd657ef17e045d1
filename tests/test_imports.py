"""Start-up cost and the direction of imports: a study's driver (validate, plan, run, report) loads neither
torch nor the network, and imports run one way, kernels <- model <- ablate, statistics <- report."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "studies" / "quickstart.yaml")
HEAVY = ("torch", "datasets", "tokenizers", "model.gpt", "kernels")


def loaded_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter has loaded after running `code`."""
    check = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


def test_driver_modules_do_not_load_torch_or_the_model():
    assert loaded_after("import ablate.cli, ablate.launch, ablate.design, ablate.config") == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["validate", QUICKSTART], ["plan", QUICKSTART]])
def test_checking_a_study_loads_neither_torch_nor_datasets(argv):
    code = (
        f"sys.argv = ['ablate', *{argv!r}]\n"
        "from ablate.cli import main\n"
        "try:\n    main()\nexcept SystemExit as done:\n    assert done.code in (0, None), done.code"
    )
    assert loaded_after(code) == "[]"


def test_the_model_still_loads_on_first_use():
    import model

    assert model.GPT.__name__ == "GPT" and "plain" in model.LOSSES


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (absolute names; `from a import b` counts a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


# a folder of the repository -> module prefixes none of its files may import
FORBIDDEN = {
    "kernels": ("model", "ablate"),
    "model": ("ablate",),
    "ablate/analysis": ("matplotlib", "seaborn", "ablate.report", "ablate.figures", "ablate.bench"),
    "ablate/report": ("ablate.bench",),
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_run_one_way(folder):
    upward = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / folder).glob("*.py"))
        for name in imported_modules(path)
        if any(name == prefix or name.startswith(prefix + ".") for prefix in FORBIDDEN[folder])
    }
    assert not upward


def test_the_product_never_imports_the_measurement_scripts():
    product = [p for p in (ROOT / "ablate").rglob("*.py") if "bench" not in p.relative_to(ROOT).parts]
    found = {
        f"{p.relative_to(ROOT)} imports {n}"
        for p in product
        for n in imported_modules(p)
        if n.startswith("ablate.bench")
    }
    assert not found


def test_a_trial_on_prepared_data_never_loads_hugging_face_datasets(tmp_path):
    """Every trial's process imports the training loop and maps the prepared data; `datasets` (0.4 s a
    process) loads only where data is built."""
    from ablate.data import prepare
    from ablate.data_config import DataConfig

    cfg = {"corpus_docs": 20, "tokenizer": "bytes", "val_tokens": 256, "cache_dir": str(tmp_path)}
    prepare(DataConfig(**cfg), 32)  # built here, as `ablate run` does before its trials start
    trial = (
        "import ablate.train, ablate.trial\n"
        "from ablate.data_config import DataConfig\n"
        f"assert ablate.train.prepare(DataConfig(**{cfg!r}), 32).n_train_sequences() > 0"
    )
    assert "datasets" not in loaded_after(trial)
