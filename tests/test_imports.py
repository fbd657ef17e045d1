"""Start-up cost: a study's driver (validate, plan, run, report) loads neither torch nor the network."""

import subprocess
import sys


def test_driver_modules_do_not_load_torch_or_the_model():
    code = (
        "import sys, ablate.cli, ablate.launch, ablate.design, ablate.config; "
        "print(sorted(m for m in ('torch', 'model.gpt', 'kernels') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_model_still_loads_on_first_use():
    import model

    assert model.GPT.__name__ == "GPT" and "plain" in model.LOSSES
