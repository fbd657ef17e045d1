"""ablate.bench.packing's arithmetic (CPU): copies compared over the seconds in which all of them trained,
and the MPS thread shares it accepts."""

import pytest

from ablate.bench.packing import overlapped, thread_shares, with_share
from ablate.bench.throughput import ClockedLogger, steady_windows


def windows(start: float, rates: list[float], length: float = 1.0) -> list[list[float]]:
    return [[start + i * length, start + (i + 1) * length, r] for i, r in enumerate(rates)]


def test_a_copy_that_trained_alone_part_of_the_time_is_measured_only_while_the_others_ran():
    # b starts 3 s after a, which ends 3 s before b: each trains alone (fast, 9) for 3 of its 5 windows
    a = {"windows": windows(0.0, [9.0, 9.0, 9.0, 5.0, 5.0])}
    b = {"windows": windows(3.0, [5.0, 5.0, 9.0, 9.0, 9.0])}
    rates, seconds = overlapped([a, b])
    assert rates == [5.0, 5.0]  # each copy's plain median would be 9
    assert seconds == pytest.approx(2.0)  # from 3 s (b's first window) to 5 s (a's last)
    assert overlapped([a]) == ([9.0], pytest.approx(5.0))  # one copy alone: all its windows


def test_copies_that_never_trained_at_once_are_an_error_that_asks_for_more_steps():
    a = {"windows": windows(0.0, [1.0, 1.0])}
    b = {"windows": windows(5.0, [1.0, 1.0])}
    with pytest.raises(SystemExit, match="more --steps"):
        overlapped([a, b])
    with pytest.raises(SystemExit, match="more --steps"):
        overlapped([a, {"windows": []}])


def test_steady_windows_skip_the_first_two_and_start_where_the_last_one_ended():
    log = ClockedLogger()
    for step, rate in enumerate([1.0, 2.0, 3.0, 4.0]):
        log.log_metrics({"tokens_per_s": rate}, step)
        log.log_metrics({"val_loss": 0.5}, step)  # not a training window: no clock reading
    assert len(log.window_ends) == 4
    got = steady_windows(log)
    assert [w[2] for w in got] == [3.0, 4.0]
    assert got[0][0] == log.window_ends[1] and got[0][1] == log.window_ends[2]
    assert got[1][0] == log.window_ends[2] and got[1][1] == log.window_ends[3]


def test_thread_shares_are_checked_and_set_per_client():
    assert thread_shares("100,50", under_mps=True) == [100, 50]
    assert thread_shares("100", under_mps=False) == [100]
    for bad in ("0", "101", "fifty", ""):
        with pytest.raises(SystemExit, match="1-100"):
            thread_shares(bad, under_mps=True)
    with pytest.raises(SystemExit, match="needs --mps"):
        thread_shares("50", under_mps=False)
    env = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30", "X": "1"}
    assert with_share(env, 50) == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50", "X": "1"}
    assert with_share(env, 100) == {"X": "1"}  # MPS's default: the whole GPU
