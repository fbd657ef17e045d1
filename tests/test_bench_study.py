"""The study benchmark's accounting (pure functions; the end-to-end summary is in test_launch.py)."""

import pytest

from ablate.bench_study import process_gaps


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
