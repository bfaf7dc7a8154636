"""`stats.figures`: the one aggregate every user-visible figure comes from."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from veilstream.schemas.records import DecisionRecord, FrameRecord
from veilstream.stats import figures, json_safe, percentile


def _decision(label: str) -> DecisionRecord:
    return DecisionRecord(classifier="tiny", index=0, label=label, confidence=0.9)


def _corrected(
    naive: bool,
    consistent: bool,
    iterations: int,
    latency_ms: float = 10.0,
    stop_reason: str = "corrected",
    **fields: Any,
) -> FrameRecord:
    """A published frame the correction stage ran on."""
    values: dict[str, Any] = {
        "worker": "test",
        "time": datetime.now(UTC),
        "camera_id": "cam",
        "outcome": "published",
        "flagged": not consistent,
        "corrected": True,
        "naive_changed": naive,
        "consistent": consistent,
        "budget_exhausted": stop_reason in ("iteration_budget", "time_budget"),
        "stop_reason": stop_reason,
        "iterations": iterations,
        "latency_ms": latency_ms,
    }
    return FrameRecord.model_validate(values | fields)


def _failed(outcome: str, latency_ms: float | None = 1.0, **fields: Any) -> FrameRecord:
    """A masked or dropped frame: no decision, an error."""
    values: dict[str, Any] = {
        "worker": "test",
        "time": datetime.now(UTC),
        "camera_id": "cam",
        "outcome": outcome,
        "reason": "detect_failed",
        "flagged": True,
        "latency_ms": latency_ms,
    }
    return FrameRecord.model_validate(values | fields)


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([5], 95) == 5
    assert percentile([0, 10], 95) == pytest.approx(9.5)
    assert math.isnan(percentile([], 50))


def test_counts_every_outcome_and_detection() -> None:
    records = [
        _corrected(False, True, 0, faces=2, plates=1),
        _corrected(True, True, 1, faces=1, residual_faces=1, flagged=True),
        _failed("masked", faces=3, residual_plates=2),
        _failed("dropped"),
        _failed("dropped", reason="truncated"),
    ]
    result = figures(records)
    assert (result.frames, result.published, result.masked, result.dropped) == (5, 2, 1, 2)
    assert result.dead_letters == 2, "every dropped frame, undecodable inputs included, is a dead letter"
    assert result.flagged == 4
    assert (result.faces, result.plates) == (6, 1)
    assert result.residual_detections == 3
    assert result.corrected == 2


def test_iterations_follow_the_papers_convention_and_rates_are_over_corrected_frames() -> None:
    records = [
        _corrected(False, True, 0, latency_ms=10),
        _corrected(True, True, 1, latency_ms=20),
        _corrected(True, True, 3, latency_ms=30),
        _corrected(True, False, 100, latency_ms=40, stop_reason="iteration_budget"),
        _failed("dropped", latency_ms=None),  # never decoded: a frame, not in the rates, iterations or latency
        _failed("masked", latency_ms=0),
    ]
    result = figures(records, seconds=2.0)
    assert result.frames == 6
    assert result.corrected == 4
    assert result.naive_changed == 3
    assert result.naive_changed_rate == pytest.approx(3 / 4)
    assert result.final_changed == 1
    assert result.final_changed_rate == pytest.approx(1 / 4)
    assert result.budget_exhausted == 1
    assert result.changed_without_region == 0
    assert result.frames_stepped == 3
    assert result.mean_iterations == pytest.approx(104 / 3)  # only frames that needed a step
    assert result.p95_iterations == pytest.approx(percentile([1, 3, 100], 95))
    assert result.max_iterations == 100
    assert result.mean_iterations_all == pytest.approx(26)  # every corrected frame
    # Every frame's own latency; an input that reached no stage has none.
    assert result.mean_latency_ms == pytest.approx(100 / 5)
    assert result.p50_latency_ms == pytest.approx(20)
    assert result.frames_per_second == pytest.approx(3.0)


def test_changes_with_nothing_to_correct_are_counted_apart() -> None:
    records = [
        _corrected(True, False, 0, stop_reason="no_region"),
        _corrected(False, True, 0, stop_reason="no_region"),
        _corrected(True, False, 100, stop_reason="iteration_budget"),
    ]
    result = figures(records)
    assert result.final_changed == 2
    assert result.changed_without_region == 1
    assert result.budget_exhausted == 1


def test_nothing_to_measure_is_none_not_zero_or_nan() -> None:
    empty = figures([])
    assert empty.frames == 0
    for name in (
        "naive_changed_rate",
        "final_changed_rate",
        "mean_iterations",
        "p95_iterations",
        "mean_iterations_all",
        "mean_latency_ms",
        "p95_latency_ms",
        "frames_per_second",
        "accuracy_original",
        "accuracy_published",
    ):
        assert getattr(empty, name) is None, name
    # Frames, but none corrected (correction off) and none needing a step: still no rate, no iteration figure.
    uncorrected = figures([_failed("dropped"), _corrected(False, True, 0).model_copy(update={"corrected": False})])
    assert uncorrected.naive_changed_rate is None
    assert uncorrected.mean_iterations is None
    assert uncorrected.max_iterations == 0
    assert uncorrected.mean_latency_ms is not None
    assert json_safe(empty.model_dump())["mean_iterations"] is None


def test_accuracy_is_over_labelled_corrected_frames() -> None:
    def labelled(truth: str | None, original: str, final: str) -> FrameRecord:
        return _corrected(
            False, original == final, 1, ground_truth=truth, original=[_decision(original)], final=[_decision(final)]
        )

    records = [
        labelled("car", "car", "car"),
        labelled("car", "car", "bus"),
        labelled("bus", "car", "car"),
        labelled(None, "car", "car"),  # no ground truth: not counted
        _failed("dropped", ground_truth="car"),  # no decision: not counted
    ]
    result = figures(records)
    assert result.labelled_frames == 3
    assert result.accuracy_original == pytest.approx(2 / 3)
    assert result.accuracy_published == pytest.approx(1 / 3)
