"""The one-GPU against every-GPU comparison (ablate/bench_gpus.py): its table, ratio and input checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rich.console import Console

from ablate.bench import gpus as bench_gpus


def summary(tokens: float, wall: float, per_gpu: dict[str, int]) -> dict:
    return {
        "completed": sum(per_gpu.values()),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "trials_per_gpu": per_gpu,
        "max_trials_at_once_per_gpu": dict.fromkeys(per_gpu, 2),
        "before_first_trial_s": {"Ray start": 4.0, "imports": 1.5},
        "failed": [],
        "processes": 54,
    }


def test_ratio_is_every_gpu_rate_over_one_gpu_rate():
    console = Console(record=True, width=200)
    one = summary(54e6, 300.0, {"0": 54})
    every = summary(54e6, 160.0, {"0": 27, "1": 27})
    ratio = bench_gpus.show(one, every, 2, console)
    assert abs(ratio - 300.0 / 160.0) < 1e-9
    text = console.export_text()
    assert "0: 27, 1: 27" in text and "1.88x" in text
    assert "5.5" in text  # the wait before the first trial, summed over its parts


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert bench_gpus.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert bench_gpus.visible_gpus() == []


def test_one_gpu_shows_its_one_side_and_no_ratio():
    console = Console(record=True, width=200)
    assert bench_gpus.show(summary(54e6, 300.0, {"0": 54}), None, 1, console, {"fast path": 0.5e6}) is None
    text = console.export_text()
    assert "0: 54" in text and "0.36" in text and "GPUs" not in text  # 180k tokens/s over 500k alone


def test_no_gpu_or_a_missing_study_is_a_clear_error(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("name: x\n")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    none = subprocess.run(
        [sys.executable, "-m", "ablate.bench.gpus", str(study)], capture_output=True, text=True, env=env
    )
    assert none.returncode != 0 and "shows no GPU" in none.stderr and "Traceback" not in none.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "ablate.bench.gpus", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode != 0 and "no such study file" in missing.stderr


def test_each_side_is_set_against_one_trial_alone_per_gpu_and_its_placement_checked(tmp_path):
    console = Console(record=True, width=240)
    one = summary(54e6, 300.0, {"0": 54})
    every = summary(54e6, 160.0, {"0": 27, "1": 27})
    every["max_trials_at_once_per_gpu"] = {"0": 4, "1": 5}
    bench_gpus.show(one, every, 2, console, {"fast path": 0.5e6})
    text = console.export_text()
    # 54M tokens in 300 s on one GPU: 180k tokens/s, 0.36 of one trial alone; on two, 0.34 per GPU
    assert "0.36" in text and "0.34" in text
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nresources: {gpu: 0.25}\n")
    allowed = bench_gpus.allowed_per_gpu(study, None)
    assert allowed == 4 and bench_gpus.allowed_per_gpu(study, 0.5) == 2
    cpu_only = tmp_path / "c.yaml"  # no resources.gpu: the spec's default, no GPU share at all
    cpu_only.write_text("name: c\nresources: {cpu: 2}\n")
    assert bench_gpus.allowed_per_gpu(cpu_only, None) == 0
    lines = bench_gpus.placement_lines(every, allowed)
    assert lines[0].endswith("ok") and lines[1].endswith("OVER")


def test_further_one_gpu_sides_are_shown_beside_the_first_against_the_same_baseline():
    console = Console(record=True, width=240)
    one = summary(54e6, 300.0, {"0": 54})  # 4 per GPU
    packed_mps = summary(54e6, 250.0, {"0": 54})
    alone_each = summary(54e6, 400.0, {"0": 54})
    also = [("1 GPU, gpu=0.25, mps=true", packed_mps), ("1 GPU, gpu=1.0", alone_each)]
    assert bench_gpus.show(one, None, 1, console, {"fast path": 0.5e6}, also) is None
    text = console.export_text()
    assert "1 GPU, gpu=0.25, mps=true" in text and "1 GPU, gpu=1.0" in text
    assert "0.43" in text and "0.27" in text  # 216k and 135k tokens/s over 500k alone
    assert "gpu=0.25, mps=true over 1 GPU: 1.20x" in text and "gpu=1.0 over 1 GPU: 0.75x" in text


def test_further_sides_are_checked_before_anything_runs():
    assert bench_gpus.also_sides(
        ["gpu=1", "gpu=0.25,mps=true", "mps=auto,train.reuse_compiled=true", "gpu=0.125,cpu=2", "cpu=2.5"]
    ) == [
        {"gpu": 1.0, "cpu": None, "mps": None, "fixed": []},
        {"gpu": 0.25, "cpu": None, "mps": "true", "fixed": []},
        {"gpu": None, "cpu": None, "mps": "auto", "fixed": ["train.reuse_compiled=true"]},
        {"gpu": 0.125, "cpu": 2, "mps": None, "fixed": []},
        {"gpu": None, "cpu": 2.5, "mps": None, "fixed": []},  # a share of CPUs, as resources.cpu takes
    ]
    bad_specs = ["gpu=2", "gpu=x", "mps=yes", "tokens=5", "", "train.reuse_compiled=", ".x=1"]
    for bad in [*bad_specs, "cpu=0", "cpu=-1", "cpu=two", "cpu=", "cpu=nan"]:
        with pytest.raises(SystemExit, match="expected gpu=F"):
            bench_gpus.also_sides([bad])


def test_the_warm_up_runs_each_side_that_fixes_other_settings(tmp_path, monkeypatch):
    """A side with other fixed settings may compile other code (a precompiled step, not a traced one's
    graphs), and one with other CPUs per trial saves other steps (torch's thread count is in their
    names): each such side is warmed once before anything is measured, a side that differs only in its
    GPU share is not."""
    study = tmp_path / "study.yaml"
    study.write_text("name: x\nresources: {gpu: 0.25}\n")
    runs = []

    def bench(study_path, gpus, args, tokens, *extra):
        runs.append((tokens, tuple(args.fixed), args.cpu, extra))
        return summary(54e6, 300.0, {"0": 54})

    monkeypatch.setattr(bench_gpus, "bench", bench)
    monkeypatch.setattr(bench_gpus, "visible_gpus", lambda: ["0"])
    argv = [
        "gpus",
        str(study),
        "--warm-tokens",
        "1000",
        "--tokens",
        "5000",
        "--fixed",
        "train.precompile=true",
    ]
    argv += ["--also", "train.precompile=false", "--also", "gpu=1", "--also", "gpu=0.125,cpu=2"]
    argv += ["--also", "gpu=0.2,cpu=2"]
    monkeypatch.setattr(sys, "argv", argv)
    bench_gpus.main()
    warm = [run for run in runs if run[0] == 1000]
    assert warm == [
        (1000, ("train.precompile=true",), None, ()),
        (1000, ("train.precompile=true", "train.precompile=false"), None, ()),
        (1000, ("train.precompile=true",), 2, ()),  # once for both sides of 2 CPUs
    ]
    assert runs[len(warm) :] == [  # then the measured sides, in order
        (5000, ("train.precompile=true",), None, ()),
        (5000, ("train.precompile=true", "train.precompile=false"), None, ()),
        (5000, ("train.precompile=true",), None, ()),
        (5000, ("train.precompile=true",), 2, ()),
        (5000, ("train.precompile=true",), 2, ()),
    ]


def test_a_side_asking_for_the_studys_own_cpus_is_not_warmed_again(tmp_path, monkeypatch):
    """`cpu=4` against a study whose trials already get 4 CPUs runs the same torch threads, so the same
    saved steps: it needs no warm-up of its own (the CPUs are compared as the study resolves them)."""
    study = tmp_path / "study.yaml"
    study.write_text("name: x\nresources: {gpu: 0.25, cpu: 4}\n")
    runs = []

    def bench(study_path, gpus, args, tokens, *extra):
        runs.append((tokens, args.cpu))
        return summary(54e6, 300.0, {"0": 54})

    monkeypatch.setattr(bench_gpus, "bench", bench)
    monkeypatch.setattr(bench_gpus, "visible_gpus", lambda: ["0"])
    argv = ["gpus", str(study), "--warm-tokens", "1000", "--tokens", "5000"]
    argv += ["--also", "gpu=0.125,cpu=4", "--also", "gpu=0.125,cpu=2"]
    monkeypatch.setattr(sys, "argv", argv)
    bench_gpus.main()
    assert [run for run in runs if run[0] == 1000] == [(1000, None), (1000, 2)]


def test_trials_alone_take_their_own_budget_and_bad_budgets_stop_before_anything_runs(tmp_path, monkeypatch):
    study = tmp_path / "study.yaml"
    study.write_text("name: x\nresources: {gpu: 0.25}\n")
    runs = []

    def bench(study_path, gpus, args, tokens, *extra):
        runs.append((tokens, extra[:1]))
        return {**summary(54e6, 300.0, {"0": 54}), "alone_tokens_per_s": 1e6}

    monkeypatch.setattr(bench_gpus, "bench", bench)
    monkeypatch.setattr(bench_gpus, "visible_gpus", lambda: ["0"])
    argv = ["gpus", str(study), "--tokens", "5000", "--alone-factors", "metric", "--alone-tokens", "700"]
    monkeypatch.setattr(sys, "argv", argv)
    bench_gpus.main()
    assert runs == [(700, ("--alone",)), (700, ("--alone",)), (5000, ())]  # fast path, eager, the study
    runs.clear()
    monkeypatch.setattr(sys, "argv", [*argv, "--no-alone-eager"])
    bench_gpus.main()
    assert runs == [(700, ("--alone",)), (5000, ())]  # no eager trials alone
    runs.clear()
    for flag in ("--tokens", "--warm-tokens", "--alone-tokens"):
        monkeypatch.setattr(sys, "argv", ["gpus", str(study), flag, "0"])
        with pytest.raises(SystemExit, match=f"{flag} 0: a token budget is at least 1"):
            bench_gpus.main()
    for flag in ("--alone-tokens=700", "--no-alone-eager"):  # no trials alone to set
        monkeypatch.setattr(sys, "argv", ["gpus", str(study), flag])
        with pytest.raises(SystemExit, match="give --alone-factors too"):
            bench_gpus.main()
    assert runs == []


def test_without_the_one_gpu_side_every_gpu_is_set_against_the_trials_alone(tmp_path, monkeypatch, capsys):
    """--no-one-gpu: a study too long to run twice is measured on every GPU only, still against the
    trials alone of the same command; it needs several GPUs and no further one-GPU side."""
    study = tmp_path / "study.yaml"
    study.write_text("name: x\nresources: {gpu: 0.25}\n")
    runs = []

    def bench(study_path, gpus, args, tokens, *extra):
        runs.append((tuple(gpus), extra[:1]))
        return {**summary(54e6, 160.0, {"0": 27, "1": 27}), "alone_tokens_per_s": 0.5e6}

    monkeypatch.setattr(bench_gpus, "bench", bench)
    monkeypatch.setattr(bench_gpus, "visible_gpus", lambda: ["0", "1"])
    argv = ["gpus", str(study), "--no-one-gpu", "--alone-factors", "metric", "--no-alone-eager"]
    monkeypatch.setattr(sys, "argv", argv)
    bench_gpus.main()
    assert runs == [(("0",), ("--alone",)), (("0", "1"), ())]  # the trials alone, then every GPU
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "2 GPUs" in text and "0.34" in text and "1 GPU" not in text
    )  # 169k tokens/s per GPU over 500k alone
    runs.clear()
    for gpus, extra, error in (
        (["0"], [], "this host shows 1"),
        (["0", "1"], ["--also", "gpu=1"], "--also runs further one-GPU sides"),
    ):
        monkeypatch.setattr(bench_gpus, "visible_gpus", lambda gpus=gpus: gpus)
        monkeypatch.setattr(sys, "argv", [*argv, *extra])
        with pytest.raises(SystemExit, match=error):
            bench_gpus.main()
    assert runs == []


def test_the_classes_alone_are_shown_slowest_first_the_rest_summed_up():
    rates = {f"metric=m{i}": {"tokens_per_s": 1e6 + i * 1e4, "trials": 2} for i in range(20)}
    rates["metric=slow"] = {"tokens_per_s": 5e5, "trials": 3}
    console = Console(record=True, width=200)
    console.print(bench_gpus.slowest_classes(rates, "fast path", 9.9e5))
    text = console.export_text()
    lines = [line for line in text.splitlines() if "metric=" in line or "more" in line]
    assert "metric=slow" in lines[0] and "500,000" in lines[0] and "0.420" in lines[0]  # 5e5 / 1.19e6
    assert len(lines) == bench_gpus.SLOWEST_SHOWN + 1
    assert "11 more" in lines[-1] and "22" in lines[-1] and "1,090,000-1,190,000" in lines[-1]
    assert "990,000" in text  # the harmonic mean, in the title
    few = {k: rates[k] for k in list(rates)[:3]}
    console = Console(record=True, width=200)
    console.print(bench_gpus.slowest_classes(few, "eager", 1e6))
    text = console.export_text()
    assert "more" not in text and text.count("metric=") == 3
