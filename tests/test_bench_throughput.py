"""The one-trial throughput table (ablate/bench/throughput.py): ratios, cells and the first window's parts."""

from __future__ import annotations

import argparse
import json

import torch

from ablate.bench.throughput import (
    ProfilingLogger,
    check_arguments,
    kernel_table,
    markdown_table,
    parse_cells,
    runs,
    table_rows,
    write_table,
)


def _row(metric: str, variant: str, tps: float, **extra) -> dict:
    base = dict(
        metric=metric, variant=variant, tokens_per_s=tps, mfu=0.2, peak_mem_gb=2.7, first_window_s=19.2
    )
    return {**base, "status": "finished", **extra}


def test_rows_are_set_against_sdpa_of_the_same_step_and_cell_and_show_the_first_windows_parts():
    rows = [
        _row("sdpa", "plain", 1.0e6),
        _row("sdpa", "fused+graphs", 2.0e6, step1_s=15.0, steps1_3_s=17.5),
        _row("rbf", "fused+graphs", 1.9e6),
        _row("rbf", "fused+graphs", 1.5e6, position="susie"),  # no sdpa row with this cell
    ]
    lines = markdown_table(rows).splitlines()[2:]
    assert "| 2.00M | 1.000x | 2.000x |" in lines[1] and "19.2 s (15.0 / 2.5 s) |" in lines[1]
    assert "| 1.90M | 0.950x | 1.900x |" in lines[2] and lines[2].endswith("| 19.2 s |")
    assert "| rbf | - | position=susie | fused+graphs | 1.50M | - | - |" in lines[3]


def test_cells_parse_into_model_settings():
    assert parse_cells("") == [{}]
    assert parse_cells("position=rope;position=susie,registers=1") == [
        {"position": "rope"},
        {"position": "susie", "registers": 1},
    ]


def test_kernel_table_ranks_kernels_per_step_and_sums_the_rest():
    row = _row("sdpa", "fused+graphs", 2.6e6, profile_steps=20)
    row["kernels"] = {"gemm_a": 20_000.0, "row_pass": 40_000.0, "adam": 4_000.0, "norm": 2_000.0}
    lines = kernel_table(row, 2).splitlines()
    assert lines[0].startswith("sdpa fused+graphs: 3.300 ms of GPU kernels a step (20 steps profiled, 4")
    assert lines[4] == "| `row_pass` | 2.000 | 60.6% |"
    assert lines[5] == "| `gemm_a` | 1.000 | 30.3% |"
    assert lines[6] == "| 2 others | 0.300 | 9.1% |"
    assert "kernels" not in markdown_table([row])  # the profile stays out of the throughput table


def test_profiling_logger_profiles_exactly_the_fourth_window():
    log = ProfilingLogger(activity="CPU")  # this machine may have no GPU
    for window in range(1, 6):
        log.log_metrics({"tokens_per_s": 1.0}, 20 * window - 1)
        log.log_metrics({"val_loss": 1.0}, 20 * window - 1)  # an evaluation log starts and stops nothing
        assert (log.profiler is not None) == (window == 3)
    assert (log.first_step, log.steps) == (59, 20)


def test_a_run_that_ends_inside_the_profiled_window_leaves_no_profiler_running():
    log = ProfilingLogger(activity="CPU")
    for window in range(1, 4):
        log.log_metrics({"tokens_per_s": 1.0}, 20 * window - 1)
    assert log.profiler is not None
    log.close()
    assert log.profiler is None and log.steps == 0 and log.kernels == {}
    again = ProfilingLogger(activity="CPU")  # a next row can profile
    for window in range(1, 5):
        again.log_metrics({"tokens_per_s": 1.0}, 20 * window - 1)
    assert again.steps == 20


def _args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"profile": 0, "steps": 200, "write_table": False, **overrides})


def test_sdpa_runs_once_per_cell_and_the_other_metrics_on_every_backend():
    assert runs(["sdpa", "rbf", "penalty"], ["triton-tma", "flex"]) == [
        ("sdpa", "triton-tma"),
        ("rbf", "triton-tma"),
        ("rbf", "flex"),
        ("penalty", "triton-tma"),
        ("penalty", "flex"),
    ]


def test_bad_arguments_are_refused_before_anything_runs():
    assert check_arguments(_args(), ["fused+graphs"], ["sdpa", "rbf"], ["auto"]) == []
    problems = check_arguments(_args(), ["fused+graphs", "warp"], ["rbf"], ["tritonn"])
    assert any("warp" in p for p in problems) and any("tritonn" in p for p in problems)
    assert check_arguments(
        _args(), ["plain"], ["rbf"], ["sdpa"]
    )  # rbf's key-norm term needs a backend with it
    problems = check_arguments(_args(write_table=True), ["plain", "fused+graphs"], ["sdpa"], ["auto", "flex"])
    assert len(problems) == 3  # two variants, auto among the backends, no rbf or penalty


def test_table_rows_pick_each_lengths_fastest_backend_by_its_mean_over_cells_and_metrics():
    def row(metric, backend, length, tps, status="finished"):
        return _row(metric, "fused+graphs", tps, backend=backend, attn_len=length, head_dim=64, status=status)

    rows = [
        row("sdpa", "sdpa", 256, 9.0e6),  # the baseline is not a candidate
        row("rbf", "flex", 256, 2.50e6),
        row("penalty", "flex", 256, 2.40e6),
        row("rbf", "triton-tma", 256, 2.46e6),
        row("penalty", "triton-tma", 256, 2.46e6),
        row("rbf", "flex", 257, 2.0e6),
        row("rbf", "triton-tma", 257, 2.5e6),
        row("rbf", "sdpa-aug", 257, 9.9e6, status="failed"),  # a failed run measures nothing
    ]
    at_256, at_257 = table_rows(rows)
    assert (at_256["n_ctx"], at_256["head_dim"], at_256["dtype"], at_256["causal"]) == (
        256,
        64,
        "bfloat16",
        True,
    )
    assert at_256["tokens_per_s"] == {"flex": 2_450_000, "triton-tma": 2_460_000}
    assert at_256["backend"] == "triton-tma"
    assert at_257["backend"] == "triton-tma" and "sdpa-aug" not in at_257["tokens_per_s"]


def test_written_rows_replace_only_their_lengths_and_auto_reads_them(tmp_path, monkeypatch):
    from kernels import dispatch

    path = tmp_path / "table.json"
    kept = {"dtype": "bfloat16", "n_ctx": 4096, "head_dim": 64, "causal": True, "backend": "triton", "ms": {}}
    stale = {**kept, "n_ctx": 256, "backend": "flex", "source": "an older command"}
    path.write_text(
        json.dumps({"environment": {"command": "python -m kernels.bench"}, "rows": [kept, stale]})
    )
    rows = [
        _row("rbf", "fused+graphs", 2.0e6, backend="flex", attn_len=256, head_dim=64),
        _row("rbf", "fused+graphs", 2.5e6, backend="triton-tma", attn_len=256, head_dim=64),
    ]
    env = {"command": "python -m ablate.bench.throughput --write-table", "gpu": "GPU X", "date": "2026-12-01"}
    write_table(rows, env, path)
    table = json.loads(path.read_text())
    assert table["environment"] == {"command": "python -m kernels.bench"}  # the long-N rows' command stays
    by_length = {r["n_ctx"]: r for r in table["rows"]}
    assert sorted(by_length) == [256, 4096] and by_length[4096]["backend"] == "triton"
    assert by_length[256]["backend"] == "triton-tma" and "GPU X, 2026-12-01" in by_length[256]["source"]
    monkeypatch.setattr(dispatch, "_TABLE", table["rows"])
    q = torch.empty(1, 1, 257, 64, dtype=torch.bfloat16)
    assert dispatch._measured_order(dispatch._nearest_row(q, True))[:2] == ["triton-tma", "flex"]
