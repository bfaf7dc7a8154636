"""What the worker keeps between frames stays bounded: a flood of frames, cameras or label values must not grow
its memory without limit (bench/memory.py measures the whole process over a long run)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from veilstream.detectors.base import Detection
from veilstream.detectors.memory import DetectionMemory, FrameKey
from veilstream.schemas import DecisionRecord, DetectionRecord, FrameRecord
from veilstream.stats import figures
from veilstream.worker.metrics import AggregateWindow, WorkerMetrics

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def record(index: int, payload: int = 0, **fields: object) -> FrameRecord:
    """A corrected, labelled frame record with `payload` detections and decisions per list (what a busy frame
    carries), its summary fields varied by `index`."""
    decisions = [
        DecisionRecord(classifier="lite0", index=k, label=f"label-{(index + k) % 7}", confidence=0.5)
        for k in range(max(1, payload))
    ]
    values: dict[str, object] = {
        "worker": "w",
        "time": T0 + timedelta(seconds=index),
        "camera_id": f"cam-{index % 3}",
        "source_topic": "frames",
        "outcome": ("published", "masked", "dropped")[index % 3],
        "reason": None if index % 3 == 0 else "detect_failed",
        "detail": "x" * 300 if payload else None,
        "flagged": index % 3 != 0,
        "faces": payload,
        "plates": index % 2,
        "detections": [DetectionRecord(kind="face", x1=k, y1=k, x2=k + 9, y2=k + 9, score=0.9) for k in range(payload)],
        "residual_faces": index % 5 == 0,
        "remembered": index % 4,
        "leak_checked": True,
        "leaks": index % 6 == 0,
        "leak_detections": [
            DetectionRecord(kind="face", x1=k, y1=k, x2=k + 5, y2=k + 5, score=0.6) for k in range(payload)
        ],
        "corrected": True,
        "original": decisions,
        "naive": decisions,
        "final": decisions[::-1],
        "naive_changed": index % 2 == 0,
        "consistent": index % 7 != 0,
        "budget_exhausted": index % 11 == 0,
        "stop_reason": "time_budget" if index % 11 == 0 else "consistent",
        "iterations": index % 4,
        "latency_ms": 10.0 + index % 13,
        "stage_ms": {f"stage-{k}": 1.0 for k in range(payload)},
        "ground_truth": "label-0" if index % 2 else None,
    }
    return FrameRecord.model_validate(values | fields)


# -- the aggregate window ------------------------------------------------------------------------------------


def _retained_bytes(make: Callable[[], list[FrameRecord]], keep: Callable[[list[FrameRecord]], object]) -> int:
    """Bytes still allocated after `keep` was given the records `make` built (and every other reference died)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        holder = keep(make())
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del holder
    return retained


def test_the_window_keeps_what_the_aggregate_reads_not_each_frames_boxes_and_decisions() -> None:
    def window_of(records: list[FrameRecord]) -> AggregateWindow:
        window = AggregateWindow("w", started=T0.timestamp())
        window.add(records)
        return window

    frames = 400
    busy = _retained_bytes(lambda: [record(i, payload=40) for i in range(frames)], window_of)
    quiet = _retained_bytes(lambda: [record(i, payload=0) for i in range(frames)], window_of)
    # Before: the window held every record whole (40 boxes, 3 x 40 decisions, 40 stage times, a detail each).
    assert busy < 1.5 * quiet, f"{busy / frames:.0f} bytes per busy frame against {quiet / frames:.0f} per quiet one"


@pytest.mark.parametrize("payload", [0, 5])
def test_the_windows_aggregate_is_the_aggregate_of_the_whole_records(payload: int) -> None:
    records = [record(i, payload) for i in range(60)]
    window = AggregateWindow("w", started=T0.timestamp())
    window.add(records[:25])
    window.add(records[25:])
    end = T0.timestamp() + 30
    aggregate = window.close(end)
    expected = figures(records, 30.0).model_dump()
    assert aggregate.model_dump(include=set(expected)) == expected
    assert aggregate.frames == 60 and aggregate.accuracy_original is not None  # the labelled path ran


def test_a_window_says_when_it_is_full_so_that_the_loop_closes_it_early() -> None:
    window = AggregateWindow("w", max_records=10)
    window.add([record(i) for i in range(9)])
    assert not window.full
    window.add([record(9)])
    assert window.full
    assert AggregateWindow("w").max_records > 0


# -- the per-camera detection memory -------------------------------------------------------------------------


def _face(x: float) -> Detection:
    return Detection(x, 40, x + 10, 50, 0.9, "face")


def test_the_detection_memory_keeps_the_cameras_seen_last_up_to_its_bound() -> None:
    memory = DetectionMemory(frames=5, seconds=None, growth=0.0, max_cameras=3)
    for camera in ("a", "b", "c"):
        memory.remember(FrameKey(camera, 0), [_face(20)], 200, 100)
    memory.remember(FrameKey("a", 1), [_face(21)], 200, 100)  # "a" is the most recent now, "b" the oldest
    memory.remember(FrameKey("d", 0), [_face(20)], 200, 100)
    assert memory.cameras == {"a", "c", "d"}
    # "a" kept its state: its face, missed in the next frame, is still hidden where its motion puts it.
    assert [round(d.x1) for d in memory.remember(FrameKey("a", 2), [], 200, 100)] == [22]
    # "b" starts afresh, as after a gap: nothing of it is remembered.
    assert memory.remember(FrameKey("b", 1), [], 200, 100) == []


def test_a_flood_of_camera_ids_does_not_grow_the_detection_memory_without_limit() -> None:
    memory = DetectionMemory()
    for index in range(memory.max_cameras + 100):
        memory.remember(FrameKey(f"camera-{index}", 0), [_face(20)], 200, 100)
    assert len(memory.cameras) == memory.max_cameras
    assert f"camera-{memory.max_cameras + 99}" in memory.cameras


def test_the_camera_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_cameras"):
        DetectionMemory(max_cameras=0)


# -- Prometheus label values ---------------------------------------------------------------------------------


def _series(metrics: WorkerMetrics, name: str) -> Iterator[tuple[dict[str, str], float]]:
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


def test_label_values_from_records_are_bounded_and_the_rest_counted_as_other() -> None:
    metrics = WorkerMetrics()
    flood = 500
    records = [
        record(3 * i + 2, source_topic=f"topic-{i}", reason=f"reason-{i}", stage_ms={f"stage-{i}": 1.0})
        for i in range(flood)
    ]
    metrics.count(records, 0.001, 0.01)
    for name, label in (
        ("veilstream_frames_in_total", "topic"),
        ("veilstream_dead_letters_total", "reason"),
        ("veilstream_stage_seconds_count", "stage"),
    ):
        series = list(_series(metrics, name))
        values = {labels[label] for labels, _value in series}
        assert len(values) <= metrics.max_label_values + 2, name  # the bound, "other", and "decode"
        assert "other" in values, name
        expected = 2 * flood if label == "stage" else flood  # every frame has a decode time too
        assert sum(value for _labels, value in series) == expected, name  # nothing is lost


def test_the_client_log_limiter_forgets_old_templates() -> None:
    """kafka-python pre-formats some lines (a backoff in the text): each is a template, so a long outage would
    grow the limiter's tables without end."""
    import logging

    from veilstream.worker.logs import RepeatLimiter

    now = [0.0]
    limiter = RepeatLimiter(interval_s=60, clock=lambda: now[0], max_templates=100)
    for i in range(5000):
        now[0] = i * 0.5
        record = logging.makeLogRecord({"name": "kafka.net.manager", "msg": f"Bootstrap failed (backoff {i} s)"})
        assert limiter.filter(record)  # every text is new: it passes
    assert len(limiter._passed) <= 101 and len(limiter._counts) <= 100
    repeat = logging.makeLogRecord({"name": "kafka.net.manager", "msg": "Bootstrap failed (backoff 4999 s)"})
    assert not limiter.filter(repeat)  # a recent template is still limited


def test_closed_label_sets_are_exported_at_zero_before_the_first_count() -> None:
    """An alert on increase() sees a count only against an earlier sample: a pod's first residual face must
    raise its series from 0, not create it at 1."""
    metrics = WorkerMetrics()
    residual = {labels["kind"]: value for labels, value in _series(metrics, "veilstream_residual_detections_total")}
    assert residual == {"face": 0.0, "plate": 0.0}
    budgets = {labels["budget"]: value for labels, value in _series(metrics, "veilstream_budget_exhaustions_total")}
    assert budgets == {"iteration": 0.0, "time": 0.0}
    metrics.count([record(0, residual_faces=1)], 0.001, 0.01)
    residual = {labels["kind"]: value for labels, value in _series(metrics, "veilstream_residual_detections_total")}
    assert residual == {"face": 1.0, "plate": 0.0}
