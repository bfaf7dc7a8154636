from __future__ import annotations

import math

import pytest

from veilstream.stats import json_safe, percentile, summarize_frames


def _record(naive: bool, corrected: bool, iterations: int, ms: float, exhausted: bool = False) -> dict[str, object]:
    return {
        "naive_changed": naive,
        "corrected_changed": corrected,
        "iterations": iterations,
        "ms": ms,
        "budget_exhausted": exhausted,
    }


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([5], 95) == 5
    assert percentile([0, 10], 95) == pytest.approx(9.5)
    assert math.isnan(percentile([], 50))


def test_summary_counts_and_iteration_convention() -> None:
    records = [
        _record(False, False, 0, 10),
        _record(True, False, 1, 20),
        _record(True, False, 3, 30),
        _record(True, True, 100, 40, exhausted=True),
    ]
    summary = summarize_frames(records)  # type: ignore[arg-type]
    assert summary["frames"] == 4
    assert summary["naive_changed"] == 3
    assert summary["naive_changed_rate"] == pytest.approx(0.75)
    assert summary["corrected_changed"] == 1
    assert summary["budget_exhausted"] == 1
    assert summary["changed_without_region"] == 0
    assert summary["frames_corrected"] == 3
    assert summary["mean_iterations"] == pytest.approx(104 / 3)  # only frames that needed a step
    assert summary["mean_iterations_all"] == pytest.approx(26)
    assert summary["mean_ms_per_frame"] == pytest.approx(25)
    assert summary["max_iterations"] == 100


def test_empty_summary_is_json_safe() -> None:
    summary = json_safe(summarize_frames([]))
    assert summary["frames"] == 0
    assert summary["mean_iterations"] is None


def test_changes_with_nothing_to_correct_are_counted_apart() -> None:
    records = [
        {**_record(True, True, 0, 5), "stop_reason": "no_region"},
        {**_record(False, False, 0, 5), "stop_reason": "no_region"},
        {**_record(True, True, 100, 5, exhausted=True), "stop_reason": "iteration_budget"},
    ]
    summary = summarize_frames(records)  # type: ignore[arg-type]
    assert summary["corrected_changed"] == 2
    assert summary["changed_without_region"] == 1
    assert summary["budget_exhausted"] == 1
