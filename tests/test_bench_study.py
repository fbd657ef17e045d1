"""The study benchmark's accounting (pure functions; the end-to-end summary is in test_launch.py)."""

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ablate.bench.study import (
    alone_seconds,
    compile_parts,
    cpus_per_trial,
    failure_lines,
    first_window_parts,
    measure_alone,
    process_gaps,
)


def test_gaps_are_per_process_and_split_by_time():
    spans = [
        ("a", 0.0, 10.0),
        ("a", 11.0, 20.0),  # gap 1
        ("b", 0.0, 5.0),
        ("b", 8.0, 15.0),  # gap 3
        ("a", 30.0, 40.0),  # gap 10
        ("b", 44.0, 50.0),  # gap 29
        ("c", 0.0, 50.0),  # one trial: no gap
    ]
    gaps = process_gaps(spans)
    assert gaps["count"] == 4 and gaps["max_s"] == 29.0 and gaps["median_s"] == 10.0
    assert gaps["first_half_mean_s"] == pytest.approx(2.0)  # the gaps before trials at 8 and 11
    assert gaps["second_half_mean_s"] == pytest.approx(19.5)  # before trials at 30 and 44


def test_no_process_with_two_trials_has_no_gaps():
    assert process_gaps([("a", 0.0, 1.0), ("b", 0.0, 2.0)]) is None


def test_alone_rate_weights_each_class_by_its_trials(tmp_path):
    spec = {
        "name": "alone",
        "factors": {"metric": {"levels": ["sdpa", "rbf"]}, "registers": {"levels": [0, 1]}},
        "seeds": 1,
        "fixed": {
            "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context": 32},
            "data": {"source": "random:300", "val_tokens": 1024, "cache_dir": str(tmp_path / "cache")},
            "train": {
                "tokens": 8 * 32 * 10,
                "batch_size": 8,
                "eval_every": 100,
                "log_every": 2,
                "device": "cpu",
            },
        },
        "resources": {"gpu": 0},
    }
    study = tmp_path / "alone.yaml"
    study.write_text(yaml.safe_dump(spec))
    result = measure_alone(study, ["metric"])
    classes = result["by_class"]
    assert list(classes) == ["metric=sdpa", "metric=rbf"]  # measured on each class's first cell
    assert all(c["trials"] == 2 and c["tokens_per_s"] > 0 for c in classes.values())
    harmonic = 4 / sum(c["trials"] / c["tokens_per_s"] for c in classes.values())
    assert result["alone_tokens_per_s"] == pytest.approx(harmonic)
    assert min(c["tokens_per_s"] for c in classes.values()) <= result["alone_tokens_per_s"]
    with pytest.raises(SystemExit, match="gamma_schedule"):
        measure_alone(study, ["gamma_schedule"])


def test_the_eager_baseline_drops_the_compiled_settings(tmp_path):
    """A study that precompiles its steps still gets its eager baseline (precompile needs compile)."""
    spec = {
        "name": "eager",
        "factors": {"metric": {"levels": ["sdpa", "rbf"]}},
        "seeds": 1,
        "fixed": {
            "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context": 32},
            "data": {"source": "random:300", "val_tokens": 1024, "cache_dir": str(tmp_path / "cache")},
            "train": {"tokens": 8 * 32 * 6, "batch_size": 8, "log_every": 2, "device": "cpu"}
            | {"compile": True, "precompile": True},
        },
        "resources": {"gpu": 0},
    }
    study = tmp_path / "eager.yaml"
    study.write_text(yaml.safe_dump(spec))
    result = measure_alone(study, ["metric"], eager=True)
    assert result["mode"] == "eager" and all(c["tokens_per_s"] > 0 for c in result["by_class"].values())


def _run(metric: str, tokens: float):
    return SimpleNamespace(data=SimpleNamespace(params={"factor.metric": metric}, metrics={"tokens": tokens}))


def test_alone_seconds_charge_each_finished_trial_at_its_class_rate():
    baseline = {
        "alone_tokens_per_s": 500.0,
        "factors": ["metric"],
        "by_class": {"metric=sdpa": {"tokens_per_s": 1000.0}, "metric=rbf": {"tokens_per_s": 250.0}},
    }
    runs = [_run("sdpa", 2000.0), _run("rbf", 2000.0), _run("rbf", 500.0)]
    assert alone_seconds(runs, baseline) == pytest.approx(2.0 + 8.0 + 2.0)
    assert alone_seconds([*runs, _run("penalty", 100.0)], baseline) is None  # a class without a rate
    assert alone_seconds(runs, {"alone_tokens_per_s": 500.0}) is None  # an old baseline: one rate


def _attempt(trial: str, status: str, error: str = "", pid: str = "1", context=None) -> SimpleNamespace:
    tags = {
        "ablate.trial_id": trial,
        "ablate.status": status,
        "ablate.cell": f"metric={trial}",
        "ablate.seed": "0",
        "ablate.host": "gpu-box",
        "ablate.pid": pid,
    }
    tags.update({f"ablate.{k}": v for k, v in (context or {}).items()})
    if error:
        tags["ablate.error"] = error
    return SimpleNamespace(data=SimpleNamespace(tags=tags, params={}, metrics={}))


def _traceback() -> str:
    import traceback

    try:
        raise RuntimeError(
            "CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA"
        )
    except RuntimeError:
        return traceback.format_exc()


def test_failed_trials_are_listed_with_their_error_in_one_line():
    runs = [
        _attempt("rbf", "failed", _traceback(), pid="11"),  # failed, then finished on its retry
        _attempt("rbf", "finished", pid="15"),
        _attempt("sdpa", "failed", "first attempt's error", pid="12"),
        _attempt("sdpa", "failed", _traceback(), pid="16", context={"process_trial": "3", "attempt": "2"}),
        _attempt("penalty", "failed", "the trial's process ended without reporting a result"),
        _attempt("mixed", "finished"),
    ]
    assert failure_lines(runs) == [
        "metric=sdpa seed=0 (gpu-box:16, trial 3 of its process, attempt 2): RuntimeError: CUDA error: an illegal memory access was "
        "encountered Compile with TORCH_USE_CUDA_DSA",
        "metric=penalty seed=0 (gpu-box:1): the trial's process ended without reporting a result",
    ]
    assert all("\n" not in line for line in failure_lines(runs))


def test_one_line_error_is_bounded_and_never_empty():
    from ablate.tracking import one_line_error

    assert one_line_error("") == "(no error recorded)"
    assert len(one_line_error("x" * 10_000)) == 240
    assert one_line_error(
        "Traceback (most recent call last):\n  File \"a.py\", line 1, in f\n    g()\nKeyError: 'k'"
    ) == ("KeyError: 'k'")


def test_the_wait_before_the_first_trial_adds_up_and_splits_by_the_workers_marks():
    from ablate.bench.study import before_first_trial

    # (seconds, epoch seconds the phase ended); `ablate run` launched at 100
    phases = {"store": (1.0, 104.0), "ray_start": (5.0, 109.0), "parent": (2.0, 111.0), "tune": (30.0, 141.0)}
    marks = {"module_imported": 115.0, "trial_called": 116.5, "train_imported": 121.0}
    split = before_first_trial(phases, 100.0, 123.0, marks)
    assert split["process start, imports, checks"] == 3.0
    assert split["Tune to the worker's trial code (actor process start, Ray and MLflow imports)"] == 4.0
    assert split["worker: the trial handed over (Tune's setup and step)"] == 1.5
    assert split["worker: imports of the training code (torch, model, kernels)"] == 4.5
    assert split["worker: opening the trial's run (config, earlier attempts, device)"] == 2.0
    assert sum(split.values()) == pytest.approx(23.0)  # the whole wait, from launch to the first run
    # runs without the marks (older records) keep the wait in Tune in one piece
    plain = before_first_trial(phases, 100.0, 123.0, {})
    assert plain["Tune to the first trial's run (actors start, import, open runs)"] == 12.0
    assert sum(plain.values()) == pytest.approx(23.0)


def test_phases_that_ran_beside_ray_start_count_only_beyond_it():
    from ablate.bench.study import before_first_trial

    # a local Ray starting (104-109) while the store and parent run (104-106.5) and the data (108-110) are
    # written beside it
    phases = {
        "store": (1.0, 104.0),
        "ray_start": (5.0, 109.0),
        "parent": (2.5, 106.5),
        "data": (2.0, 110.0),
        "tune": (30.0, 141.0),
    }
    split = before_first_trial(phases, 100.0, 123.0, {})
    assert split["Ray start"] == 5.0
    assert split["store, parent run, beyond what ran beside it"] == 0.0
    assert split["data preparation, beyond what ran beside it"] == 1.0
    assert split["between phases"] == 1.0  # 110 to 111, when Tune began
    assert sum(split.values()) == pytest.approx(23.0)


def _timed(step1: float, steps1_3: float, first_window: float) -> SimpleNamespace:
    final = "final/time/"
    metrics = {
        final + "step1_s": step1,
        final + "steps1_3_s": steps1_3,
        final + "first_window_s": first_window,
    }
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics))


def test_first_window_parts_are_the_median_trials_step_1_capture_and_other_steps():
    runs = [_timed(3.0, 4.0, 5.0), _timed(1.0, 1.5, 2.0), _timed(2.0, 3.0, 4.5)]
    unmarked = SimpleNamespace(data=SimpleNamespace(metrics={"final/time/first_window_s": 9.0}))
    parts = first_window_parts([*runs, unmarked])  # a trial without the marks (log_every < 3) is left out
    assert parts == {
        "step 1 (trace, compile or cache load)": 2.0,
        "steps 2-3 (graph warm-up, capture)": 1.0,
        "the window's other steps": 1.0,
        "trials": 3,
    }
    assert first_window_parts([unmarked]) is None


def test_a_variant_copy_takes_the_share_budget_mps_and_fixed_settings_asked_for(tmp_path):
    import shutil

    from ablate.bench.study import variant
    from ablate.design import load_design

    source = tmp_path / "gpu_scaling.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "studies" / "gpu_scaling.yaml", source)
    path = variant(source, 1.0, 2097152, "false", ["train.reuse_compiled=true", "optim.lr=0.002"])
    design = load_design(path)  # a valid study
    assert design.study.name == "gpu_scaling_gpu1p0_tok2097152_mpsfalse_reuse_compiledtrue_lr0p002"
    assert design.study.resources.gpu == 1.0 and design.study.resources.mps is False
    tree = design.run_tree(design.trials[0])
    assert tree["train"]["tokens"] == 2097152 and tree["train"]["reuse_compiled"] is True
    assert tree["optim"]["lr"] == 0.002
    assert variant(source, None, None, "auto").name == "gpu_scaling_mpsauto.yaml"
    eight = load_design(variant(source, 0.125, None, None, None, cpu=2))
    assert eight.study.name == "gpu_scaling_gpu0p125_cpu2"
    assert (eight.study.resources.gpu, eight.study.resources.cpu) == (0.125, 2)
    six = load_design(variant(source, 0.1666, None, None, None, cpu=2.5))  # Ray shares CPUs, as the study may
    assert six.study.name == "gpu_scaling_gpu0p1666_cpu2p5" and six.study.resources.cpu == 2.5
    with pytest.raises(SystemExit, match="share of CPUs above 0"):
        variant(source, None, None, None, None, cpu=0)
    with pytest.raises(SystemExit, match=r"expected SECTION\.KEY=VALUE"):
        variant(source, None, None, None, ["reuse_compiled=true"])


def test_cpus_per_trial_are_a_number_above_zero_as_resources_cpu_takes_them():
    assert cpus_per_trial("4") == 4 and isinstance(cpus_per_trial("4.0"), int)
    assert cpus_per_trial("2.5") == 2.5
    for bad in ["0", "-1", "two", "", "nan", "inf"]:
        with pytest.raises(argparse.ArgumentTypeError, match="a number above 0"):
            cpus_per_trial(bad)


def test_compile_parts_are_the_median_trials_trace_and_loads_and_every_trials_cache_events():
    def run(forward, backend, backward, hits):
        metrics = {
            "final/time/compile_forward_s": forward,
            "final/time/compile_backend_s": backend,
            "final/time/compile_backward_s": backward,
            "final/compile/fx_cache_hits": hits,
            "final/compile/aot_cache_misses": 1.0,
        }
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics))

    eager = SimpleNamespace(data=SimpleNamespace(metrics={"final/time/first_window_s": 1.0}))
    parts = compile_parts([run(4.0, 1.0, 0.5, 2.0), run(2.0, 1.5, 0.25, 2.0), run(0.0, 0.0, 0.0, 0.0), eager])
    assert parts == {
        "trace s (forward, dynamo)": 0.5,  # medians of 3.0, 0.5 and 0.0 (a kept step traced nothing)
        "forward compile or load s": 1.0,
        "backward compile or load s": 0.25,
        "fx_cache_hits": 4,
        "fx_cache_misses": 0,
        "aot_cache_hits": 0,
        "aot_cache_misses": 3,
        "trials": 3,
    }
    assert compile_parts([eager]) is None


def test_training_at_once_splits_a_gpus_time_by_how_many_trials_trained_and_their_rate():
    from ablate.bench.study import training_at_once

    # GPU "0": a trains 0-10 s at 100 tokens/s; b trains 4-8 s and 9-12 s at 50 tokens/s (evaluating
    # between); GPU "1": c trains 0-2 s at 10 tokens/s
    a = [(0.0, 10.0, 100.0)]
    b = [(4.0, 8.0, 50.0), (9.0, 12.0, 50.0)]
    c = [(0.0, 2.0, 10.0)]
    got = training_at_once({"0": [a, b], "1": [c]})
    assert got[2]["seconds"] == pytest.approx(4.0 + 1.0)  # 4-8 s and 9-10 s
    assert got[2]["tokens_per_s"] == pytest.approx(150.0)
    assert got[1]["seconds"] == pytest.approx(4.0 + 1.0 + 2.0 + 2.0)  # a 0-4 and 8-9, b 10-12, c
    # tokens over GPU-seconds: a's 4 s and 1 s at 100, b's 2 s at 50, c's 2 s at 10
    assert got[1]["tokens_per_s"] == pytest.approx((500 + 100 + 20) / 9.0)
    assert 0 not in got  # a trained throughout
    gap = training_at_once({"0": [[(0.0, 1.0, 10.0), (3.0, 4.0, 10.0)]]})  # none trains 1-3 s
    assert gap[0] == {"seconds": pytest.approx(2.0), "tokens_per_s": 0.0}
    assert gap[1]["tokens_per_s"] == pytest.approx(10.0)
    assert training_at_once({"0": [[]]}) == {}  # no window after the first: nothing measured


def test_training_spans_place_each_window_after_the_first_as_its_training_time_ending_at_its_line():
    from types import SimpleNamespace

    from ablate.bench.study import training_spans

    def metric(value, ms, step):
        return SimpleNamespace(value=value, timestamp=ms, step=step)

    # windows of 100 tokens logged at 1, 2 and 4 s (an evaluation at 2.5-3 s: its line logs tokens, no
    # rate), each window at 100 tokens/s of training; the first window (compilation) is left out
    history = {
        "tokens": [metric(100, 1000, 9), metric(200, 2000, 19), metric(200, 3000, 20), metric(300, 4000, 29)],
        "tokens_per_s": [metric(50, 1000, 9), metric(100, 2000, 19), metric(100, 4000, 29)],
    }
    record = SimpleNamespace(metric_history=lambda run, key: history[key])
    run = SimpleNamespace(data=SimpleNamespace(tags={"ablate.gpu_ids": "0"}))
    spans = training_spans(record, [run])
    assert spans == {"0": [[(1.0, 2.0, 100.0), (3.0, 4.0, 100.0)]]}  # the evaluation is the gap at 2-3 s
