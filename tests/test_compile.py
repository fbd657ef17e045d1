"""The compiled step: every level of every shipped factor compiles once, with no graph break and no
recompilation as schedules move, evaluations interleave and steps advance.

On CPU the check runs dynamo with its `eager` backend (graph capture and guards are what recompile; the
backend that turns graphs into kernels does not change that). On a GPU (`gpu` marker) it runs the real
path, inductor with CUDA graphs and the fused loss, and compares its losses with the plain eager step.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from ablate.config import RunConfig, from_dict
from ablate.logger import RecordingLogger
from ablate.train import cudagraph_trees_for_this_thread, release_cudagraph_trees, train
from model.config import FUSED_LOSSES

# each level of each shipped factor appears at least once
CELLS = {
    "sdpa-rope": {"metric": "sdpa", "position": "rope"},
    "sdpa-2x-susie-normal-register": {
        "metric": "sdpa",
        "gamma_scale": 2.0,
        "position": "susie",
        "registers": 1,
        "register_init": "normal",
    },
    "rbf-susie-register-warmup": {
        "metric": "rbf",
        "position": "susie",
        "registers": 1,
        "gamma_schedule": "warmup",
    },
    "rbf-none-cosine": {"metric": "rbf", "position": "none", "gamma_schedule": "cosine"},
    "penalty-rope-learnable": {"metric": "penalty", "position": "rope", "gamma_schedule": "learnable"},
    "penalty-rope-register-separate-lam": {
        "metric": "penalty",
        "position": "rope",
        "registers": 1,
        "lam_schedule": "warmup",
    },
    "rbf-rope-learnable-register": {
        "metric": "rbf",
        "position": "rope",
        "registers": 1,
        "gamma_schedule": "learnable",
    },
}


def cell_run(
    cache_dir: str, model: dict, *, device: str, steps: int = 12, n_layers: int = 2, **train_settings
) -> RunConfig:
    context = 32 if device == "cpu" else 256
    tree = {
        "model": {
            "n_layers": n_layers,
            "d_model": 64,
            "n_heads": 2,
            "context": context,
            "gamma_warmup_steps": 6,
        }
        | model,
        "data": {"source": "random:512", "val_tokens": 4 * context, "cache_dir": cache_dir},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {
            "tokens": steps * 8 * context,
            "batch_size": 8,
            "eval_every": 4,
            "log_every": 2,
            "device": device,
            "compile": True,
            "reuse_compiled": False,  # each test's trials start afresh unless it says otherwise
            "precompile": False,  # and trace their step (on CUDA it is saved by default) unless it says so
        }
        | train_settings,
    }
    return from_dict(RunConfig, tree)


@pytest.fixture
def dynamo_backend(monkeypatch):
    """torch.compile with dynamo's `eager` backend: graph capture and guards without code generation."""
    real = torch.compile

    def compile_eager(model, **kwargs):
        kwargs.pop("mode", None)
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eager)


@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_compiles_once_without_graph_breaks(cell, tmp_path, dynamo_backend):
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = train(cell_run(str(tmp_path), CELLS[cell], device="cpu"), RecordingLogger())
    assert result.status == "finished"
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the whole forward


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_fast_path_matches_the_plain_step_on_cuda(cell, tmp_path):
    fast_path_matches_the_plain_step(CELLS[cell], "fused", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("loss", [name for name in FUSED_LOSSES if name != "fused"])
def test_fused_schedules_match_the_plain_step_on_cuda(loss, tmp_path):
    """The fused op's unmeasured schedules, in the graphed, compiled training step."""
    fast_path_matches_the_plain_step(CELLS["penalty-rope-register-separate-lam"], loss, tmp_path)


@pytest.mark.gpu
def test_max_autotune_fast_path_matches_the_plain_step_on_cuda(tmp_path):
    """Inductor's max-autotune (its Triton matmul templates, timed against cuBLAS) in the graphed step."""
    fast_path_matches_the_plain_step(CELLS["rbf-susie-register-warmup"], "fused", tmp_path, max_autotune=True)


def fast_path_matches_the_plain_step(cell: dict, loss: str, tmp_path, **settings) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    counters.clear()
    fast_log, plain_log = RecordingLogger(), RecordingLogger()
    fast_run = cell_run(str(tmp_path), cell, device="cuda", cuda_graphs=True, loss=loss, **settings)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast = train(fast_run, fast_log)
    assert dict(counters["graph_break"]) == {}
    plain = train(cell_run(str(tmp_path), cell, device="cuda", compile=False, loss="plain"), plain_log)
    assert fast.status == plain.status == "finished"
    fast_losses = [v for _, v in fast_log.series("train/loss")]
    plain_losses = [v for _, v in plain_log.series("train/loss")]
    assert fast_losses == pytest.approx(plain_losses, rel=2e-2)  # bf16 autocast on both sides
    assert fast.val_loss == pytest.approx(plain.val_loss, rel=1e-2)


def in_new_thread(fn):
    """fn's result, called in a thread of its own (as Ray Tune calls each trial of a reused worker)."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()))
    thread.start()
    thread.join()
    return out["value"]


def test_a_new_thread_gets_cuda_graph_tree_state():
    def state_before_and_after():
        before = torch._C._is_key_in_tls("tree_manager_containers")
        cudagraph_trees_for_this_thread()
        return before, torch._C._is_key_in_tls("tree_manager_containers")

    assert in_new_thread(state_before_and_after) == (False, True)


def test_a_trial_releases_its_cuda_graph_trees_in_its_own_thread():
    from torch._inductor import cudagraph_trees as trees

    def containers_before_and_after_release():
        cudagraph_trees_for_this_thread()
        trees.get_container(0)  # what the first graphed step of a trial creates
        before = len(trees.local.tree_manager_containers)
        release_cudagraph_trees()
        return before, len(trees.local.tree_manager_containers)

    assert in_new_thread(containers_before_and_after_release) == (1, 0)


@pytest.mark.gpu
def test_graphed_trials_one_after_another_in_one_process(tmp_path):
    """Three graphed trials of three cells in the main thread of one process, as a reused Ray worker runs
    them (ablate.trial), and the process then exits normally.

    Not in new threads: Tune's function API ran each trial in a thread of its own, and there torch 2.11's
    CUDA graphs crashed reused processes (on an H200, three graphed trials in successive threads of one
    process died with signal 11, in a trial or at exit, in 5 of 6 runs), which is why `TrialTrainable`
    runs every trial in its worker's main thread. The trials run in a process of their own so that what
    they leave behind meets the interpreter's teardown.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_compile import CELLS, cell_run
from ablate.logger import RecordingLogger
from ablate.train import train

for cell in ("rbf-susie-register-warmup", "sdpa-rope", "penalty-rope-learnable"):
    config = cell_run({str(tmp_path)!r}, CELLS[cell], device="cuda", cuda_graphs=True, loss="fused")
    print(train(config, RecordingLogger()).status, flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parent.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["finished"] * 3


# train.reuse_compiled: a process keeps its compiled steps for its next trials of the same model


@pytest.fixture
def fresh_process_state():
    """No compiled step kept from another test, and none left for the next."""
    import ablate.train

    ablate.train.forget_compiled(graphs=torch.cuda.is_available())
    torch._dynamo.reset()
    yield ablate.train.KEPT
    ablate.train.forget_compiled(graphs=torch.cuda.is_available())


def kept_trial(
    tmp_path, cell: str, seed: int, *, device: str = "cpu", n_layers: int = 2, **settings
) -> tuple:
    """(result, train losses, graphs dynamo captured) of one trial that keeps its compiled step."""
    import dataclasses

    run = cell_run(str(tmp_path), CELLS[cell], device=device, n_layers=n_layers, **settings)
    cfg = dataclasses.replace(run, seed=seed)
    log = RecordingLogger()
    counters.clear()
    result = train(cfg, log)
    return result, [v for _, v in log.series("train/loss")], counters["stats"]["unique_graphs"]


def test_a_kept_step_serves_the_next_trial_of_the_same_model_untraced(
    tmp_path, dynamo_backend, fresh_process_state
):
    _, _, traced = kept_trial(tmp_path, "sdpa-rope", 0, reuse_compiled=True)
    assert traced == 1
    result, losses, traced = kept_trial(tmp_path, "sdpa-rope", 1, reuse_compiled=True)
    assert traced == 0 and result.status == "finished"  # no trace: the kept code ran the new model
    assert result.summary["time/compile_forward_s"] == 0.0  # nor did torch count any compile time
    assert len(fresh_process_state) == 1
    # the same trial in a process that kept nothing: the same losses (the same code, seed and data)
    alone, alone_losses, traced = kept_trial(tmp_path, "sdpa-rope", 1, reuse_compiled=False)
    assert traced == 1 and not fresh_process_state  # reuse off: started afresh, kept nothing
    assert alone.summary["time/compile_forward_s"] > 0  # this trial's own trace, not the process's total
    assert losses == alone_losses and result.val_loss == alone.val_loss


def test_kept_steps_of_several_models_serve_each_untraced(tmp_path, dynamo_backend, fresh_process_state):
    for cell in ("sdpa-rope", "rbf-none-cosine"):
        assert kept_trial(tmp_path, cell, 0, reuse_compiled=True)[2] == 1
    for cell in ("sdpa-rope", "rbf-none-cosine"):
        assert kept_trial(tmp_path, cell, 1, reuse_compiled=True)[2] == 0
    assert len(fresh_process_state) == 2


def test_a_process_starts_afresh_after_serving_enough_trials(
    tmp_path, dynamo_backend, fresh_process_state, monkeypatch
):
    import ablate.train

    monkeypatch.setattr(ablate.train, "SERVE_AT_MOST", 2)
    traced = [kept_trial(tmp_path, "sdpa-rope", seed, reuse_compiled=True)[2] for seed in range(5)]
    assert traced == [1, 0, 1, 0, 1]  # each third trial finds the process started afresh
    assert kept_trial(tmp_path, "rbf-none-cosine", 0, reuse_compiled=True)[2] == 1  # a new model
    assert len(fresh_process_state) == 2
    assert kept_trial(tmp_path, "sdpa-rope", 5, reuse_compiled=True)[2] == 1  # served 2: afresh again
    assert len(fresh_process_state) == 1


def test_compiled_trials_keep_their_step_unless_told_not_to(tmp_path, dynamo_backend, fresh_process_state):
    default = from_dict(RunConfig, {"train": {"compile": True}}).train
    assert default.reuse_compiled is None and default.keeps_compiled
    assert kept_trial(tmp_path, "sdpa-rope", 0, reuse_compiled=None)[2] == 1
    assert kept_trial(tmp_path, "sdpa-rope", 1, reuse_compiled=None)[2] == 0  # the default kept it
    assert not from_dict(RunConfig, {}).train.keeps_compiled  # nothing compiled, nothing kept
    off = from_dict(RunConfig, {"train": {"compile": True, "reuse_compiled": False}}).train
    assert not off.keeps_compiled


def test_a_failed_trial_keeps_nothing(tmp_path, dynamo_backend, fresh_process_state):
    kept_trial(tmp_path, "sdpa-rope", 0, reuse_compiled=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        kept_trial(tmp_path, "sdpa-rope", 1, reuse_compiled=True, fault="raise@3")
    assert not fresh_process_state
    assert kept_trial(tmp_path, "sdpa-rope", 2, reuse_compiled=True)[2] == 1


def test_reuse_compiled_needs_compile():
    with pytest.raises(ValueError, match="reuse_compiled needs compile: true"):
        from_dict(RunConfig, {"train": {"reuse_compiled": True}})


def test_compile_threads_sizes_inductors_workers(tmp_path, dynamo_backend):
    import torch._inductor.config as inductor

    # the process's setting, restored after the test by inductor's own patch (pytest's monkeypatch, undone,
    # deletes a setting from torch's config module, and every later compilation in the process then fails)
    with inductor.patch(compile_threads=7):
        result = train(
            cell_run(str(tmp_path), CELLS["sdpa-rope"], device="cpu", compile_threads=1), RecordingLogger()
        )
        assert result.status == "finished" and inductor.compile_threads == 1
        default = train(cell_run(str(tmp_path), CELLS["sdpa-rope"], device="cpu"), RecordingLogger())
        # unset: the process's setting stays
        assert default.status == "finished" and inductor.compile_threads == 1
    assert hasattr(inductor, "compile_threads")


def test_every_compile_only_setting_is_refused_without_compile_and_reset_by_uncompiled():
    """`uncompiled()` (an eager baseline's settings) names each setting the validation ties to compile."""
    from ablate.train_config import COMPILE_ONLY, uncompiled

    set_values = {"cuda_graphs": True, "reuse_compiled": True, "precompile": True, "compile_threads": 2}
    set_values["max_autotune"] = True
    assert set(set_values) == set(COMPILE_ONLY)
    for name, value in set_values.items():
        with pytest.raises(ValueError, match=f"{name} needs compile: true"):
            from_dict(RunConfig, {"train": {name: value}})
    train_settings = {"compile": True, **set_values}
    assert from_dict(RunConfig, {"train": {**train_settings, **uncompiled()}}).train.compile is False


def test_max_autotune_is_a_compile_mode_with_or_without_graphs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="max_autotune needs compile: true"):
        from_dict(RunConfig, {"train": {"max_autotune": True}})

    def mode(**settings):
        return from_dict(RunConfig, {"train": {"compile": True, **settings}}).train.compile_mode

    assert mode() is None and mode(cuda_graphs=True) == "reduce-overhead"
    assert mode(max_autotune=True) == "max-autotune-no-cudagraphs"
    assert mode(max_autotune=True, cuda_graphs=True) == "max-autotune"
    asked = []
    real = torch.compile

    def record(model, **kwargs):  # the mode the trial asks for, compiled by dynamo's eager backend
        asked.append(kwargs.pop("mode", None))
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", record)
    run = cell_run(str(tmp_path), CELLS["sdpa-rope"], device="cpu", steps=2, max_autotune=True)
    assert train(run, RecordingLogger()).status == "finished" and asked == ["max-autotune-no-cudagraphs"]


def test_compile_threads_needs_compile_and_a_count():
    with pytest.raises(ValueError, match="compile_threads needs compile: true"):
        from_dict(RunConfig, {"train": {"compile_threads": 4}})
    with pytest.raises(ValueError, match="compile_threads must be >= 1 or null"):
        from_dict(RunConfig, {"train": {"compile": True, "compile_threads": 0}})


@pytest.mark.gpu
def test_a_kept_fast_path_step_serves_the_next_trial_on_cuda(tmp_path, fresh_process_state):
    """Inductor, CUDA graphs and the fused loss: the next trial of the same model runs the kept code
    (no trace; the graphs are recorded again for its parameters) and trains as a trial started afresh."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fast = {"cuda_graphs": True, "loss": "fused"}
    kept_trial(tmp_path, "penalty-rope-learnable", 0, device="cuda", reuse_compiled=True, **fast)
    result, losses, traced = kept_trial(
        tmp_path, "penalty-rope-learnable", 1, device="cuda", reuse_compiled=True, **fast
    )
    assert traced == 0 and result.status == "finished"
    alone, alone_losses, _ = kept_trial(
        tmp_path, "penalty-rope-learnable", 1, device="cuda", reuse_compiled=False, **fast
    )
    assert losses == pytest.approx(alone_losses, rel=1e-3)
    assert result.val_loss == pytest.approx(alone.val_loss, rel=1e-3)
