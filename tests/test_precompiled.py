"""Precompiled steps: a cell's compiled step is saved once and loaded by its later trials, untraced, with the
same losses as a trial that traced it; a file is only ever used for the model, call and code it was made for.

On CPU the steps are compiled with AOTAutograd's `aot_eager` backend (quick, and savable as inductor's
output is, from torch 2.13; inductor on older torch); the `gpu` test runs inductor with CUDA graphs and
the fused loss.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from test_compile import kept_trial

import ablate.precompiled as precompiled
from ablate.train import forget_compiled
from kernels.flex import flex_attention_rbf, prepare_causal_mask
from model import GPT
from model.config import GPTConfig


def _doubled_sum(x):
    return (2 * x).sum()


@functools.cache
def savable_backend() -> str:
    """aot_eager where this torch saves its output (quick), else inductor: torch 2.11 compiles only
    inductor's output ahead of time ("expected OutputCode")."""
    try:
        with precompiled._aot_compile_enabled():
            compiled = torch.compile(_doubled_sum, fullgraph=True, backend="aot_eager")
            compiled.aot_compile(((torch.ones(2, requires_grad=True),), {}))
    except Exception:
        return "inductor"
    return "aot_eager"


@pytest.fixture
def steps(tmp_path, monkeypatch):
    """A compile cache of the test's own steps, and no step loaded before or after the test. The steps
    are compiled with `savable_backend`, and so are the trials that do not precompile: both run the
    same code."""
    monkeypatch.setenv("ABLATE_COMPILE_CACHE", str(tmp_path / "compile"))
    backend = savable_backend()
    monkeypatch.setattr(precompiled, "BACKEND", backend)
    real = torch.compile

    def compile_with(model, **kwargs):
        return real(model, **{"backend": backend, **kwargs})

    monkeypatch.setattr(torch, "compile", compile_with)
    forget_compiled(graphs=False)
    yield tmp_path / "compile" / "steps"
    forget_compiled(graphs=False)


def same(values, expected):
    """Bit for bit under `aot_eager`. Under inductor (torch 2.11) the same cell's trials on several CPU
    threads differed by 7e-8, relatively, in a loss: there the same step is the same to 1e-6."""
    if savable_backend() == "aot_eager":
        return values == expected
    return values == pytest.approx(expected, rel=1e-6, abs=0)


# The CPU trials' model has one layer: what these tests check (a step saved, loaded, refused, replaced)
# does not depend on its depth, and each trial traces and compiles its step (this module ran in 54 s on a
# 2-core machine, 74 s with two layers).
LAYERS = 1


def trial(tmp_path, cell: str, seed: int = 0, **settings) -> tuple:
    """(result, train losses, frames dynamo traced) of one CPU trial with precompiled steps on."""
    return kept_trial(tmp_path, cell, seed, n_layers=LAYERS, **{"precompile": True, **settings})


def test_a_saved_step_serves_the_next_trial_untraced_with_the_same_losses(tmp_path, steps):
    first, first_losses, traced = trial(tmp_path, "rbf-susie-register-warmup", seed=3)
    assert traced == 1 and first.summary["compile/step_loaded"] == 0.0  # traced, compiled and saved
    assert len(list(steps.glob("*.bin"))) == 1 and not list(steps.glob("*.partial"))
    loaded, losses, traced = trial(tmp_path, "rbf-susie-register-warmup", seed=3)
    assert traced == 0 and loaded.summary["compile/step_loaded"] == 1.0  # from the file: no trace
    assert same(losses, first_losses) and same(loaded.val_loss, first.val_loss)
    # the trial that traces its model as torch.compile does: the same losses (bit for bit on aot_eager)
    plain, plain_losses, traced = trial(tmp_path, "rbf-susie-register-warmup", seed=3, precompile=False)
    assert traced == 1 and "compile/step_loaded" not in plain.summary
    assert same(plain_losses, losses) and same(plain.val_loss, loaded.val_loss)


def test_each_model_has_its_own_step(tmp_path, steps):
    for cell in ("sdpa-rope", "penalty-rope-learnable"):
        trial(tmp_path, cell)
    other_seed, _, traced = trial(tmp_path, "penalty-rope-learnable", seed=1)  # a seed is not a new step
    assert traced == 0 and other_seed.summary["compile/step_loaded"] == 1.0
    assert len(list(steps.glob("*.bin"))) == 2


def test_a_kept_step_is_reused_without_reading_its_file_again(tmp_path, steps):
    trial(tmp_path, "sdpa-rope", reuse_compiled=True)
    (path,) = precompiled.LOADED
    path.unlink()  # the process keeps the step it loaded: its next trial of the cell needs no file
    result, _, traced = trial(tmp_path, "sdpa-rope", seed=1, reuse_compiled=True)
    assert traced == 0 and result.summary["compile/step_loaded"] == 1.0 and not path.exists()


def test_a_damaged_file_is_compiled_again_and_replaced(tmp_path, steps):
    _, losses, _ = trial(tmp_path, "sdpa-rope")
    (path,) = steps.glob("*.bin")
    path.write_bytes(b"not a step")
    forget_compiled(graphs=False)
    with pytest.warns(UserWarning, match="did not load"):
        again, again_losses, traced = trial(tmp_path, "sdpa-rope")
    assert traced == 1 and again.summary["compile/step_loaded"] == 0.0 and same(again_losses, losses)
    assert path.read_bytes() != b"not a step"  # replaced by the step traced again


def test_a_saved_step_whose_guards_refuse_the_model_is_traced_again(tmp_path, steps, monkeypatch):
    _, losses, _ = trial(tmp_path, "rbf-none-cosine")
    (path,) = steps.glob("*.bin")
    forget_compiled(graphs=False)
    trial(tmp_path, "sdpa-rope")
    (sdpa,) = (p for p in steps.glob("*.bin") if p != path)
    sdpa_step = sdpa.read_bytes()
    sdpa.replace(path)  # a step traced for another model, under this one's name (as a key missing a setting)
    forget_compiled(graphs=False)
    with pytest.warns(UserWarning, match="does not fit this model"):
        again, again_losses, traced = trial(tmp_path, "rbf-none-cosine")
    assert traced == 1 and again.summary["compile/step_loaded"] == 0.0 and same(again_losses, losses)
    assert path.read_bytes() != sdpa_step  # replaced by the step traced again


def test_a_model_the_step_refuses_compiles_as_torch_compile_does(tmp_path, steps, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("graph break")

    monkeypatch.setattr(precompiled.PrecompiledStep, "_compile_and_save", refuse)
    with pytest.warns(UserWarning, match="could not be compiled ahead of time"):
        result, _, traced = trial(tmp_path, "sdpa-rope")
    assert result.status == "finished" and traced == 1 and result.summary["compile/step_loaded"] == 0.0
    assert not list(steps.glob("*.bin"))


def test_a_step_is_never_used_for_another_model_call_or_source(monkeypatch):
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, context=16, vocab_size=64))
    x = torch.zeros(2, 16, dtype=torch.long)
    key = precompiled.step_key(model, (x, x), {"loss": "plain"}, None, "inductor")
    assert key == precompiled.step_key(
        GPT(dataclasses.replace(model.cfg)), (x, x), {"loss": "plain"}, None, "inductor"
    )  # a new model of the same settings (another seed) uses the same step
    others = [
        precompiled.step_key(
            GPT(dataclasses.replace(model.cfg, metric="rbf")), (x, x), {"loss": "plain"}, None, "inductor"
        ),
        precompiled.step_key(model, (x[:1], x[:1]), {"loss": "plain"}, None, "inductor"),
        precompiled.step_key(model, (x, x), {"loss": "chunked"}, None, "inductor"),
        precompiled.step_key(model, (x, x), {"loss": "plain"}, "reduce-overhead", "inductor"),
        precompiled.step_key(model, (x, x), {"loss": "plain"}, None, "aot_eager"),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        others.append(precompiled.step_key(model, (x, x), {"loss": "plain"}, None, "inductor"))
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        others.append(precompiled.step_key(model, (x, x), {"loss": "plain"}, None, "inductor"))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("ABLATE_KEY_NORM", "loop")
    others.append(precompiled.step_key(model, (x, x), {"loss": "plain"}, None, "inductor"))
    monkeypatch.delenv("ABLATE_KEY_NORM")
    monkeypatch.setattr(precompiled, "source_digest", lambda: "edited model source")
    others.append(precompiled.step_key(model, (x, x), {"loss": "plain"}, None, "inductor"))
    assert len({key, *others}) == len(others) + 1


def test_the_source_digest_follows_every_edit_of_the_model_and_kernel_files(tmp_path):
    import shutil

    import kernels
    import model

    copies = []
    for package in (model, kernels):  # copies of the two packages, to edit
        copies.append(tmp_path / package.__name__)
        shutil.copytree(
            Path(package.__file__).parent, copies[-1], ignore=shutil.ignore_patterns("__pycache__")
        )
    digest = precompiled.tree_digest(copies)
    assert digest == precompiled.source_digest()  # the packages themselves, as the key reads them
    (copies[1] / "notes.txt").write_text("not code")
    assert precompiled.tree_digest(copies) == digest
    for edited in (copies[0] / "gpt.py", copies[1] / "autotune_table.json"):
        original = edited.read_bytes()
        edited.write_bytes(original + b"\n")
        assert precompiled.tree_digest(copies) != digest, edited.name
        edited.write_bytes(original)
    (copies[0] / "gpt.py").rename(copies[0] / "gpt2.py")  # a renamed file, same bytes
    assert precompiled.tree_digest(copies) != digest


def test_a_saved_step_loads_with_cuda_graphs_where_its_compile_mode_records_them():
    from torch._inductor import config

    for mode, graphs in [
        ("reduce-overhead", True),
        ("max-autotune", True),
        ("max-autotune-no-cudagraphs", False),
        (None, False),
    ]:
        with precompiled._graphs_config(mode):
            assert config.triton.cudagraphs is graphs, mode


def test_precompile_needs_compile_and_is_on_by_default_on_cuda():
    from ablate.config import RunConfig, from_dict

    def train_config(**settings):
        return from_dict(RunConfig, {"train": settings}).train

    with pytest.raises(ValueError, match="precompile needs compile: true"):
        train_config(precompile=True)
    default = train_config(compile=True)
    assert default.precompiles("cuda") and not default.precompiles("cpu")
    assert not train_config().precompiles("cuda")  # nothing compiled, nothing saved
    assert train_config(compile=True, precompile=True).precompiles("cpu")
    assert not train_config(compile=True, precompile=False).precompiles("cuda")


@pytest.mark.slow
def test_a_new_process_loads_the_step_another_saved(tmp_path, steps):
    """What a study's workers do: the first process of a cell saves its step, the next one only loads it."""
    # both processes train with one CPU thread (torch's thread count is guarded, and earlier tests in this
    # process may have changed it), as a study's trials share their `resources.cpu`
    threads = torch.get_num_threads()
    try:
        saved, losses, traced = trial(tmp_path, "penalty-rope-register-separate-lam", threads=1)  # saved here
    finally:
        torch.set_num_threads(threads)
    assert traced == 1 and saved.summary["compile/step_loaded"] == 0.0
    script = textwrap.dedent(
        f"""
        import json, sys
        import ablate.precompiled as precompiled
        from ablate.logger import RecordingLogger
        from ablate.train import train
        from torch._dynamo.utils import counters
        sys.path.insert(0, "tests")
        from test_compile import CELLS, cell_run

        precompiled.BACKEND = {savable_backend()!r}
        cell = CELLS["penalty-rope-register-separate-lam"]
        log = RecordingLogger()
        run = cell_run({str(tmp_path)!r}, cell, device="cpu", n_layers={LAYERS}, precompile=True, threads=1)
        result = train(run, log)
        print(json.dumps({{"loaded": result.summary["compile/step_loaded"],
                           "traced": counters["stats"]["unique_graphs"],
                           "losses": [v for _, v in log.series("train/loss")]}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "ABLATE_COMPILE_CACHE": str(steps.parent)},
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    other = json.loads(done.stdout.strip().splitlines()[-1])
    assert (other["loaded"], other["traced"]) == (1.0, 0), done.stderr[-3000:]
    assert other["losses"] == losses


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["penalty-rope-learnable", "rbf-none-cosine"])  # Triton kernel; flex
def test_a_saved_fast_path_step_trains_as_a_traced_one_on_cuda(tmp_path, monkeypatch, cell):
    """Inductor, CUDA graphs and the fused loss: the loaded step replays graphs and trains as the traced one."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("ABLATE_COMPILE_CACHE", str(tmp_path / "compile"))
    forget_compiled(graphs=True)
    fast = {"device": "cuda", "cuda_graphs": True, "loss": "fused"}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the saved step")  # one that does not load warns
            runs = [
                kept_trial(tmp_path, cell, 0, precompile=precompile, **fast)
                for precompile in (True, True, False)
            ]
    finally:
        forget_compiled(graphs=True)
    (saved, saved_losses, _), (loaded, losses, traced), (plain, plain_losses, plain_traced) = runs
    assert saved.summary["compile/step_loaded"] == 0.0
    # evaluation runs the eager model, whose FlexAttention (at N = 256) compiles apart in every trial:
    # the loaded trial traces exactly the step's frame fewer than the trial that traces its step
    assert loaded.summary["compile/step_loaded"] == 1.0 and traced == plain_traced - 1
    assert losses == pytest.approx(plain_losses, rel=1e-3) and losses == pytest.approx(saved_losses, rel=1e-3)
    assert loaded.val_loss == pytest.approx(plain.val_loss, rel=1e-3)


class FlexAttention(torch.nn.Module):
    """Projections and FlexAttention: a trace of it guards an imported module (dynamo's ImportSource)."""

    cfg = "flex attention, no grad"

    def __init__(self):
        super().__init__()
        # q, k and v from buffers of their own: inductor's CPU flex refuses one buffer for all three
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        return flex_attention_rbf(self.q(x), self.k(x), self.v(x), torch.ones(2), torch.full((2,), 0.5))


def test_a_step_that_guards_an_imported_module_loads(steps):
    """torch 2.11 could not read such a guard back outside a trace: the rbf and penalty cells, whose
    seed-size step runs FlexAttention, were traced again in every trial."""
    prepare_causal_mask(16, "cpu")
    model, x = FlexAttention(), torch.randn(1, 2, 16, 8)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        saved = precompiled.PrecompiledStep(model, mode=None)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                expected = saved(x)
            refused = [str(w.message) for w in caught if "compiled ahead of time" in str(w.message)]
        except Exception as err:  # compiled at its first call instead, and failed there too
            refused = [f"{type(err).__name__}: {err}"]
            if savable_backend() != "inductor":
                raise
        if refused and savable_backend() == "inductor":  # torch 2.11 saves only inductor's output
            pytest.skip(f"inductor cannot compile CPU FlexAttention on this machine ({refused[0][:200]})")
        precompiled.forget()
        loaded = precompiled.PrecompiledStep(model, mode=None)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the saved step")  # one that does not load warns
            out = loaded(x)
    assert saved.loaded is False and loaded.loaded is True
    assert torch.equal(out, expected)


def test_a_step_that_cannot_be_saved_still_trains_and_leaves_no_file(tmp_path, steps, monkeypatch):
    from torch._dynamo.aot_compile import AOTCompiledFunction

    def half_written(self, path, external_data=None):
        Path(path).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", half_written)
    with pytest.warns(UserWarning, match="could not be saved"):
        result, _, traced = trial(tmp_path, "sdpa-rope")
    assert result.status == "finished" and traced == 1
    assert not list(steps.iterdir())  # neither the step nor its half-written file
