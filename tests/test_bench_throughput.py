"""The one-trial throughput table (ablate/bench/throughput.py): ratios, cells and the first window's parts."""

from __future__ import annotations

from ablate.bench.throughput import ProfilingLogger, kernel_table, markdown_table, parse_cells


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
    assert "| rbf | position=susie | fused+graphs | 1.50M | - | - |" in lines[3]


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
