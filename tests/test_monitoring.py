"""The monitoring package without a broker: snapshot figures from hand-built records (every figure worked
out by hand in the comments, and equal to `stats.figures`), masked, dropped and uncorrected frames,
thresholds, JSON shape, text rendering, the JSONL loader, the HTML report, and the monitor's live loop and
exit codes against a stand-in consumer."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections import namedtuple
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from kafka import TopicPartition
from pydantic import ValidationError

from veilstream.commands.cli import main
from veilstream.monitoring import kafka_io
from veilstream.monitoring import monitor as monitor_module
from veilstream.monitoring.dashboard import LEGEND, render_rich, render_text
from veilstream.monitoring.monitor import run_monitor
from veilstream.monitoring.plots import bin_seconds, time_bins
from veilstream.monitoring.records import MetricsFileError, MetricsSourceError, load_jsonl, parse_record
from veilstream.monitoring.report import (
    camera_rows,
    in_range,
    load_records,
    parse_time,
    worker_rows,
    write_report,
)
from veilstream.monitoring.snapshot import (
    ConsumerLag,
    DeadLetter,
    Snapshot,
    SnapshotBuilder,
    Thresholds,
    build_snapshot,
    compute_lag,
    dead_letter_from_headers,
)
from veilstream.schemas import AggregateRecord, DecisionRecord, DetectionRecord, Figures, FrameRecord
from veilstream.stats import figures

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def decision(label: str) -> list[DecisionRecord]:
    return [DecisionRecord(classifier="lite0", index=0, label=label, confidence=0.9)]


Outcome = Literal["published", "masked", "dropped"]


def frame(
    camera: str = "cam-a",
    seconds: float = 0.0,
    *,
    naive: bool = False,
    final: bool = False,
    exhausted: bool = False,
    iterations: int = 0,
    latency: float = 100.0,
    residual_faces: int = 0,
    residual_plates: int = 0,
    worker: str = "w1",
    time: datetime | None = None,
    outcome: Outcome = "published",
    corrected: bool = True,
    ground_truth: str | None = None,
) -> FrameRecord:
    """A frame record; `final=True` means the published decision differs from the original. `corrected=False`
    is a frame the correction did not run on (correction off, or failed before it): no decisions at all."""
    decisions: dict[str, Any] = {}
    if corrected:
        decisions = {
            "corrected": True,
            "original": decision("bus"),
            "naive": decision("truck" if naive else "bus"),
            "final": decision("truck" if final else "bus"),
            "naive_changed": naive,
            "consistent": not final,
            "budget_exhausted": exhausted,
            "stop_reason": "budget" if exhausted else "consistent",
            "iterations": iterations,
            "max_pixel_change": 3,
        }
    failed = {"reason": "detector_failed", "detail": "out of memory"} if outcome != "published" else {}
    return FrameRecord(
        worker=worker,
        time=time if time is not None else T0 + timedelta(seconds=seconds),
        camera_id=camera,
        source_topic="frames",
        source_partition=0,
        source_offset=int(seconds),
        outcome=outcome,
        flagged=final or outcome != "published" or residual_faces + residual_plates > 0,
        faces=1,
        plates=1,
        detections=[
            DetectionRecord(kind="face", x1=1, y1=2, x2=30, y2=40, score=0.8),
            DetectionRecord(kind="plate", x1=50, y1=60, x2=90, y2=80, score=0.7),
        ],
        residual_faces=residual_faces,
        residual_plates=residual_plates,
        published_bytes=None if outcome == "dropped" else 2048,
        latency_ms=latency,
        stage_ms={"detect": 5.0, "correct": latency - 5.0},
        ground_truth=ground_truth,
        **failed,
        **decisions,
    )


def aggregate(
    worker: str,
    frames: int,
    accuracy: float | None,
    labelled: int,
    dead_letters: int = 0,
    *,
    masked: int = 0,
    corrected: int | None = None,
) -> AggregateRecord:
    """A worker's window; by default the correction ran on every published frame, one decision changed."""
    published = frames - masked - dead_letters
    corrected = published if corrected is None else corrected
    naive_changed = 1 if corrected else 0
    return AggregateRecord(
        worker=worker,
        window_start=T0,
        window_end=T0 + timedelta(seconds=10),
        frames=frames,
        published=published,
        masked=masked,
        dropped=dead_letters,
        dead_letters=dead_letters,
        flagged=masked + dead_letters,
        faces=frames,
        plates=0,
        residual_detections=2,
        corrected=corrected,
        naive_changed=naive_changed,
        final_changed=0,
        naive_changed_rate=naive_changed / corrected if corrected else None,
        final_changed_rate=0.0 if corrected else None,
        budget_exhausted=0,
        changed_without_region=0,
        frames_stepped=naive_changed,
        mean_iterations=1.0 if corrected else None,
        p95_iterations=1.0 if corrected else None,
        max_iterations=naive_changed,
        mean_iterations_all=naive_changed / corrected if corrected else None,
        mean_latency_ms=15.0,
        p50_latency_ms=10.0,
        p95_latency_ms=20.0,
        frames_per_second=1.0,
        labelled_frames=labelled,
        accuracy_original=accuracy,
        accuracy_published=accuracy,
    )


def scenario() -> list[FrameRecord]:
    """Two cameras over 5 s: cam-a at t=0..3, cam-b at t=4..5."""
    return [
        frame("cam-a", 0, latency=10),
        frame("cam-a", 1, naive=True, iterations=2, latency=20),
        frame("cam-a", 2, naive=True, iterations=4, latency=30, residual_faces=1),
        frame("cam-a", 3, naive=True, final=True, exhausted=True, iterations=10, latency=40, residual_plates=2),
        frame("cam-b", 4, latency=100, worker="w2"),
        frame("cam-b", 5, naive=True, iterations=1, latency=200, worker="w2"),
    ]


DEAD_LETTERS = [
    DeadLetter("truncated", "cam-a", T0),
    DeadLetter("truncated", None, T0),
    DeadLetter("too_large", "cam-c", T0),
]


def every_outcome() -> list[FrameRecord]:
    """The scenario plus a masked and a dropped frame, frames the correction did not run on (cam-d: correction
    off), and two labelled frames; 12 frames over 8.5 s."""
    return [
        *scenario(),
        frame("cam-a", 6, outcome="masked", corrected=False, latency=300),
        frame("cam-b", 7, outcome="dropped", corrected=False, latency=1),
        frame("cam-d", 8, corrected=False, latency=50),
        frame("cam-d", 8.5, corrected=False, residual_faces=1, latency=60),
        frame("cam-a", 2.5, naive=True, final=True, iterations=3, ground_truth="bus"),
        frame("cam-b", 4.5, ground_truth="truck"),
    ]


# ------------------------------------------------------------------------------------------ snapshot


def test_overall_figures() -> None:
    snapshot = build_snapshot(scenario(), DEAD_LETTERS)
    overall = snapshot.overall
    assert overall.frames == 6
    assert overall.naive_changed == 4
    assert (overall.published, overall.masked, overall.dropped, overall.corrected) == (6, 0, 0, 6)
    assert overall.naive_changed_rate == pytest.approx(4 / 6)  # over the corrected frames
    assert overall.final_changed == 1
    assert overall.final_changed_rate == pytest.approx(1 / 6)
    assert overall.budget_exhausted == 1
    # iterations over the frames that needed correction: [1, 2, 4, 10]
    assert overall.frames_stepped == 4
    assert overall.mean_iterations == pytest.approx(17 / 4)
    assert overall.p95_iterations == pytest.approx(4 + (10 - 4) * 0.85)  # rank 3 * 0.95 = 2.85
    assert overall.max_iterations == 10
    # latencies [10, 20, 30, 40, 100, 200]: ranks 2.5, 4.75, 4.95
    assert overall.p50_latency_ms == pytest.approx(35.0)
    assert overall.p95_latency_ms == pytest.approx(175.0)
    assert overall.p99_latency_ms == pytest.approx(195.0)
    # window from the first frame (t=0) to the last (t=5): 6 frames / 5 s
    assert snapshot.window_start == T0
    assert snapshot.window_end == T0 + timedelta(seconds=5)
    assert snapshot.window_seconds == pytest.approx(5.0)
    assert overall.frames_per_second == pytest.approx(1.2)
    assert overall.residual_detections == 3
    assert overall.dead_letters == 0  # no dropped frame records; the dead-letter topic holds 3 messages
    assert overall.dead_letter_messages == 3
    assert overall.dead_letters_seen() == 3
    assert overall.dead_letters_by_reason == {"too_large": 1, "truncated": 2}
    assert snapshot.workers == ["w1", "w2"]
    assert snapshot.invalid_records == 0
    assert snapshot.lag is None


def test_per_camera_figures() -> None:
    snapshot = build_snapshot(scenario(), DEAD_LETTERS)
    assert list(snapshot.cameras) == ["cam-a", "cam-b", "cam-c"]  # cam-c only has a dead letter
    a, b, c = snapshot.cameras["cam-a"], snapshot.cameras["cam-b"], snapshot.cameras["cam-c"]

    assert a.frames == 4
    assert a.naive_changed == 3
    assert a.naive_changed_rate == pytest.approx(0.75)
    assert a.final_changed == 1
    assert a.final_changed_rate == pytest.approx(0.25)
    assert a.budget_exhausted == 1
    assert a.frames_stepped == 3  # [2, 4, 10]
    assert a.mean_iterations == pytest.approx(16 / 3)
    assert a.p95_iterations == pytest.approx(4 + 6 * 0.9)  # rank 2 * 0.95 = 1.9
    assert a.max_iterations == 10
    assert a.p50_latency_ms == pytest.approx(25.0)  # [10, 20, 30, 40]: rank 1.5
    assert a.p95_latency_ms == pytest.approx(38.5)  # rank 2.85
    assert a.p99_latency_ms == pytest.approx(39.7)  # rank 2.97
    assert a.frames_per_second == pytest.approx(4 / 5)  # the cameras share the overall 5 s window
    assert a.residual_detections == 3
    assert (a.dead_letter_messages, a.dead_letters_by_reason) == (1, {"truncated": 1})

    assert b.frames == 2
    assert b.naive_changed == 1
    assert b.naive_changed_rate == pytest.approx(0.5)
    assert (b.final_changed, b.final_changed_rate) == (0, 0.0)
    assert b.budget_exhausted == 0
    assert (b.frames_stepped, b.mean_iterations, b.p95_iterations, b.max_iterations) == (1, 1.0, 1.0, 1)
    assert b.p50_latency_ms == pytest.approx(150.0)
    assert b.p95_latency_ms == pytest.approx(195.0)
    assert b.p99_latency_ms == pytest.approx(199.0)
    assert b.frames_per_second == pytest.approx(2 / 5)
    assert (b.residual_detections, b.dead_letter_messages, b.dead_letters_by_reason) == (0, 0, {})

    # no frames: counts are 0, rates and percentiles undefined (None, not NaN: the JSON stays standard)
    assert c.frames == 0
    assert c.frames_per_second == 0.0
    assert c.corrected == 0 and c.naive_changed_rate is None and c.final_changed_rate is None
    assert c.mean_iterations is None and c.p95_iterations is None and c.max_iterations == 0
    assert c.p50_latency_ms is None and c.p95_latency_ms is None and c.p99_latency_ms is None
    assert (c.dead_letter_messages, c.dead_letters_by_reason) == (1, {"too_large": 1})

    # the per-camera counts add up; the dead letter without a camera is only in the overall figures
    assert sum(f.frames for f in snapshot.cameras.values()) == snapshot.overall.frames
    assert sum(f.dead_letter_messages for f in snapshot.cameras.values()) == snapshot.overall.dead_letter_messages - 1
    total_fps = sum(f.frames_per_second or 0 for f in snapshot.cameras.values())
    assert total_fps == pytest.approx(snapshot.overall.frames_per_second)


def test_explicit_window_sets_throughput() -> None:
    snapshot = build_snapshot(scenario(), window_start=T0 - timedelta(seconds=5), window_end=T0 + timedelta(seconds=15))
    assert snapshot.window_seconds == pytest.approx(20.0)
    assert snapshot.overall.frames_per_second == pytest.approx(6 / 20)
    assert snapshot.cameras["cam-b"].frames_per_second == pytest.approx(2 / 20)


def test_empty_and_single_frame_snapshots() -> None:
    empty = build_snapshot([])
    assert (empty.window_start, empty.window_end, empty.window_seconds) == (None, None, None)
    assert empty.overall.frames == 0 and empty.overall.frames_per_second is None
    assert empty.cameras == {} and empty.workers == []
    assert empty.violations(Thresholds(max_p95_latency_ms=1.0, max_dead_letters=0)) == []

    single = build_snapshot([frame(latency=42.0)])
    assert single.window_seconds == 0.0
    assert single.overall.frames_per_second is None  # a window without length has no rate
    assert single.overall.p50_latency_ms == single.overall.p99_latency_ms == 42.0


def test_naive_times_are_utc_and_mix_with_aware_ones() -> None:
    naive_time = datetime(2025, 3, 1, 12, 0, 10)  # no tzinfo: taken as UTC
    snapshot = build_snapshot([frame(seconds=0), frame(time=naive_time)])
    assert snapshot.window_end == T0 + timedelta(seconds=10)
    assert snapshot.overall.frames_per_second == pytest.approx(2 / 10)


def test_builder_counts_invalid_records_and_slides_its_window() -> None:
    builder = SnapshotBuilder()
    for record in scenario():
        builder.add_frame(record)
    builder.add_dead_letter(DeadLetter("truncated", "cam-a", T0))
    builder.add_dead_letter(DeadLetter("decode", "cam-b", T0 + timedelta(seconds=4)))
    builder.add_dead_letter(DeadLetter("untimed", None, None))  # no timestamp: never slides out
    builder.add_invalid()
    assert len(builder) == 6
    builder.discard_before(T0 + timedelta(seconds=3))
    snapshot = builder.snapshot()
    assert len(builder) == 3
    assert snapshot.overall.frames == 3  # t=3, 4, 5
    assert snapshot.overall.final_changed == 1
    assert snapshot.overall.dead_letters_by_reason == {"decode": 1, "untimed": 1}
    assert snapshot.invalid_records == 1
    assert snapshot.window_start == T0 + timedelta(seconds=3)


def test_dead_letter_headers_are_read_leniently() -> None:
    headers = [("dlq-reason", b"truncated"), ("camera-id", b"cam-a"), ("dlq-detail", b"ends early")]
    dead = dead_letter_from_headers(headers, 1_740_830_400_000)
    assert dead == DeadLetter("truncated", "cam-a", T0)
    assert dead_letter_from_headers([], None) == DeadLetter("unknown", None, None)
    assert dead_letter_from_headers([("dlq-reason", b""), ("camera-id", None)], -1) == DeadLetter("unknown")
    assert dead_letter_from_headers([("dlq-reason", b"\xff")], 0).reason == "\ufffd"


def test_compute_lag() -> None:
    lag = compute_lag(
        "workers",
        end_offsets={("frames", 1): 4, ("frames", 0): 8, ("frames", 2): 10, ("frames", 3): 2},
        committed={("frames", 0): 5, ("frames", 1): None, ("frames", 2): -1, ("frames", 3): 7},
        beginning_offsets={("frames", 1): 1, ("frames", 2): 3},
    )
    assert [(p.partition, p.committed, p.end, p.lag) for p in lag.partitions] == [
        (0, 5, 8, 3),  # end - committed
        (1, None, 4, 3),  # nothing committed: end - beginning
        (2, None, 10, 7),  # -1 is Kafka's "nothing committed"
        (3, 7, 2, 0),  # committed past the end (truncated topic): no lag
    ]
    assert lag.total == 13
    assert compute_lag("g", {("t", 0): 5}, {}).total == 5  # no beginning known: from offset 0


def test_monitor_figures_are_stats_figures() -> None:
    records = every_outcome()
    window = (T0 - timedelta(seconds=1), T0 + timedelta(seconds=9))
    snapshot = build_snapshot(records, DEAD_LETTERS, window_start=window[0], window_end=window[1])
    assert snapshot.overall.stats_figures() == figures(records, 10.0)
    for camera in ("cam-a", "cam-b", "cam-d"):
        expected = figures([r for r in records if r.camera_id == camera], 10.0)
        assert snapshot.cameras[camera].stats_figures() == expected
    assert snapshot.cameras["cam-c"].stats_figures() == figures([], 10.0)
    # without a given window: the span of the frames' times
    assert build_snapshot(records).overall.stats_figures() == figures(records, 8.5)
    # anchors worked out by hand, so that equality with a broken `stats.figures` would not pass unnoticed
    overall = snapshot.overall
    assert (overall.frames, overall.published, overall.masked, overall.dropped, overall.dead_letters) == (
        12,
        10,
        1,
        1,
        1,
    )
    assert (overall.corrected, overall.naive_changed, overall.final_changed) == (8, 5, 2)
    # labelled: cam-a's original "bus" is right and its published "truck" wrong; cam-b's "bus" is wrong twice
    assert (overall.labelled_frames, overall.accuracy_original, overall.accuracy_published) == (2, 0.5, 0.0)


def test_frames_without_correction_are_no_decision_changes() -> None:
    records = [
        frame("cam-d", 0, corrected=False),
        frame("cam-d", 1, corrected=False, outcome="masked"),
        frame("cam-d", 2, corrected=False, outcome="dropped"),
    ]
    snapshot = build_snapshot(records)
    overall = snapshot.overall
    assert (overall.frames, overall.published, overall.masked, overall.dropped, overall.corrected) == (3, 1, 1, 1, 0)
    assert (overall.naive_changed, overall.final_changed, overall.budget_exhausted) == (0, 0, 0)
    assert overall.naive_changed_rate is None and overall.final_changed_rate is None
    assert overall.mean_iterations is None and overall.max_iterations == 0
    assert snapshot.violations(Thresholds()) == []  # no decisions is no final change
    text = render_text(snapshot, Thresholds())
    assert "outcomes: 1 published, 1 masked, 1 dropped; correction ran on 0" in text
    row = next(line for line in text.splitlines() if line.startswith("ALL")).split()
    # ALL, frames, fps, then naive, final, budget, iteration mean and p95 all '-', ..., masked/dropped
    assert row[:3] == ["ALL", "3", "1.50"] and row[3:8] == ["-"] * 5 and row[11] == "1/1"


# ------------------------------------------------------------------------------------------ thresholds


def test_default_thresholds_fail_on_any_final_change() -> None:
    snapshot = build_snapshot(scenario(), DEAD_LETTERS)
    assert snapshot.violations(Thresholds()) == ["final decision changes: 1 > 0 (cam-a: 1)"]
    assert snapshot.violations(Thresholds(max_final_changes=1)) == []


def test_each_threshold() -> None:
    lag = ConsumerLag(group="workers", partitions=[], total=5)
    snapshot = build_snapshot(scenario(), DEAD_LETTERS, lag=lag)
    assert snapshot.violations(Thresholds(max_final_changes=1, max_dead_letters=2)) == [
        "dead letters: 3 > 2 (too_large: 1, truncated: 2)"
    ]
    assert snapshot.violations(Thresholds(max_final_changes=1, max_dead_letters=3)) == []
    assert snapshot.violations(Thresholds(max_final_changes=1, max_budget_exhausted=0)) == [
        "budget exhaustions: 1 > 0 (cam-a: 1)"
    ]
    assert snapshot.violations(Thresholds(max_final_changes=1, max_p95_latency_ms=175)) == []  # not above
    assert snapshot.violations(Thresholds(max_final_changes=1, max_p95_latency_ms=174)) == [
        "p95 latency: 175.0 ms > 174 ms"
    ]
    assert snapshot.violations(Thresholds(max_final_changes=1, max_lag=5)) == []
    assert snapshot.violations(Thresholds(max_final_changes=1, max_lag=4)) == ["consumer lag of group workers: 5 > 4"]
    everything = Thresholds(max_dead_letters=0, max_budget_exhausted=0, max_p95_latency_ms=1, max_lag=0)
    assert len(snapshot.violations(everything)) == 5


def test_dead_letter_threshold_takes_either_account() -> None:
    dropped = [frame(seconds=s, outcome="dropped", corrected=False) for s in (0, 1)]
    # the dead-letter topic not read (--no-dlq): the dropped frame records still count
    assert build_snapshot(dropped).violations(Thresholds(max_dead_letters=1)) == [
        "dead letters: 2 > 1 (dropped frame records)"
    ]
    assert build_snapshot(dropped, DEAD_LETTERS[:1]).violations(Thresholds(max_dead_letters=1)) == [
        "dead letters: 2 > 1 (truncated: 1)"
    ]
    # more on the topic than records (a dead letter without a record, e.g. an output the broker refused)
    assert build_snapshot(dropped, DEAD_LETTERS).violations(Thresholds(max_dead_letters=2)) == [
        "dead letters: 3 > 2 (too_large: 1, truncated: 2)"
    ]
    assert build_snapshot(dropped, DEAD_LETTERS[:2]).violations(Thresholds(max_dead_letters=2)) == []


def test_unmeasured_lag_fails_a_lag_threshold() -> None:
    snapshot = build_snapshot(scenario())
    assert snapshot.violations(Thresholds(max_final_changes=1, max_lag=10)) == [
        "consumer lag not measured: max_lag=10 cannot be checked"
    ]


def test_thresholds_validate() -> None:
    with pytest.raises(ValidationError):
        Thresholds(max_final_changes=-1)
    with pytest.raises(ValidationError):
        Thresholds(max_p95_latency_ms=0)
    with pytest.raises(ValidationError):
        Thresholds.model_validate({"max_changes": 1})  # a typo must not silently disable a gate


# ------------------------------------------------------------------------------------------ JSON and text


def test_json_shape() -> None:
    lag = compute_lag("workers", {("frames", 0): 9}, {("frames", 0): 7})
    snapshot = build_snapshot(scenario(), DEAD_LETTERS, lag=lag)
    data = json.loads(json.dumps(snapshot.to_json(Thresholds()), allow_nan=False))
    assert set(data) == {
        "window_start",
        "window_end",
        "window_seconds",
        "overall",
        "cameras",
        "workers",
        "invalid_records",
        "lag",
        "thresholds",
        "violations",
        "ok",
    }
    assert data["window_start"] == "2025-03-01T12:00:00Z"
    assert data["window_seconds"] == 5.0
    assert data["violations"] == ["final decision changes: 1 > 0 (cam-a: 1)"]
    assert data["ok"] is False
    assert data["thresholds"]["max_final_changes"] == 0
    assert data["overall"]["frames"] == 6
    assert data["overall"]["p95_latency_ms"] == pytest.approx(175.0)
    assert data["overall"]["dead_letters_by_reason"] == {"too_large": 1, "truncated": 2}
    assert data["cameras"]["cam-c"]["p50_latency_ms"] is None
    # the one aggregate's field names, plus the monitor's own three
    assert set(data["overall"]) == set(Figures.model_fields) | {
        "p99_latency_ms",
        "dead_letter_messages",
        "dead_letters_by_reason",
    }
    assert data["lag"] == {
        "group": "workers",
        "partitions": [{"topic": "frames", "partition": 0, "committed": 7, "end": 9, "lag": 2}],
        "total": 2,
    }
    assert set(data["overall"]) == set(data["cameras"]["cam-a"])
    # the JSON reads back into the same snapshot
    assert Snapshot.model_validate({k: v for k, v in data.items() if k in Snapshot.model_fields}) == snapshot
    assert "violations" not in snapshot.to_json()


def test_render_text() -> None:
    lag = compute_lag("workers", {("frames", 0): 9}, {("frames", 0): 7})
    text = render_text(build_snapshot(scenario(), DEAD_LETTERS, lag=lag), Thresholds(), status="live")
    lines = text.splitlines()
    assert lines[0].startswith("window 2025-03-01 12:00:00 -> 2025-03-01 12:00:05 UTC (5 s)")
    assert "workers: w1, w2" in lines[0] and "[live]" in lines[0]
    assert lines[1] == "outcomes: 6 published, 0 masked, 0 dropped; correction ran on 6"
    assert "dead letters: too_large 1, truncated 2" in text
    assert "lag of group workers: 2 (frames/0: 2)" in text
    header = next(line for line in lines if line.startswith("camera"))
    assert header.split()[:3] == ["camera", "frames", "fps"]
    overall = next(line for line in lines if line.startswith("ALL"))
    # ALL, frames, fps, naive chg (rate), final, budget, iter mean, iter p95, p50, p95, p99,
    # masked/dropped, DLQ, residual
    assert " ".join(overall.split()) == "ALL 6 1.20 4 (66.7%) 1 1 4.25 9.1 35 175 195 0/0 3 3"
    # cam-c has a dead letter and no frame: no decisions to count ('-'), no latency
    cam_c = next(line for line in lines if line.startswith("cam-c"))
    assert " ".join(cam_c.split()) == "cam-c 0 0.00 - - - - - - - - 0/0 1 0"
    assert lines[-3] == LEGEND
    assert lines[-1] == "VIOLATION: final decision changes: 1 > 0 (cam-a: 1)"
    assert render_text(build_snapshot([frame()]), Thresholds()).endswith("thresholds: ok")


def test_render_rich() -> None:
    pytest.importorskip("rich")
    from rich.console import Console  # type: ignore[import-not-found, unused-ignore]

    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(
        render_rich(build_snapshot(scenario(), DEAD_LETTERS), Thresholds(), status="live")
    )
    text = buffer.getvalue()
    assert "cam-a" in text and "cam-c" in text and "ALL" in text
    assert "VIOLATION: final decision changes: 1 > 0 (cam-a: 1)" in text


# ------------------------------------------------------------------------------------------ records


def test_parse_record_tells_the_kinds_apart() -> None:
    assert parse_record(frame().model_dump_json()) == frame()
    agg = aggregate("w1", 10, 0.5, 2)
    assert parse_record(agg.model_dump_json().encode()) == agg
    with pytest.raises(ValidationError):
        parse_record('{"type": "other"}')


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "metrics.jsonl",
        [frame("cam-a").model_dump_json(), "", "   ", aggregate("w1", 3, None, 0).model_dump_json()],
    )
    records = load_jsonl(path)
    assert [r.type for r in records] == ["frame", "aggregate"]


def test_load_jsonl_names_every_bad_line(tmp_path: Path) -> None:
    bad_frame = frame().model_dump(mode="json") | {"latency_ms": "slow"}
    path = write_lines(
        tmp_path / "metrics.jsonl",
        [frame().model_dump_json(), "{not json", frame().model_dump_json(), json.dumps(bad_frame), '{"type": "x"}'],
    )
    with pytest.raises(MetricsFileError) as caught:
        load_jsonl(path)
    assert [line for line, _ in caught.value.errors] == [2, 4, 5]
    message = str(caught.value)
    assert f"{path}: 3 bad line(s)" in message
    assert f"{path}:2: " in message and "Invalid JSON" in message
    assert f"{path}:4: frame.latency_ms: Input should be a valid number" in message
    assert f"{path}:5: " in message and "'frame', 'aggregate'" in message


def test_load_jsonl_caps_the_listing(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "junk.jsonl", ["junk"] * 25)
    with pytest.raises(MetricsFileError) as caught:
        load_jsonl(path)
    assert len(caught.value.errors) == 25
    assert str(caught.value).endswith("... and 5 more")
    assert f"{path}:20:" in str(caught.value) and f"{path}:21:" not in str(caught.value)


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MetricsSourceError, match="cannot read"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_load_records_filters_by_record_time(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [frame(seconds=s).model_dump_json() for s in (0, 10, 20, 30)])
    records = load_records(path, since=T0 + timedelta(seconds=10), until=T0 + timedelta(seconds=20))
    assert [r.time for r in records if isinstance(r, FrameRecord)] == [T0 + timedelta(seconds=s) for s in (10, 20)]
    agg = aggregate("w1", 1, None, 0)  # window_end T0 + 10 s is its time
    assert in_range([agg], T0 + timedelta(seconds=11), None) == []
    assert in_range([agg], None, T0 + timedelta(seconds=10)) == [agg]
    with pytest.raises(ValueError, match="JSONL path"):
        load_records(bootstrap="127.0.0.1:9092")


def test_parse_time() -> None:
    now = T0
    assert parse_time("now", now) == T0
    assert parse_time("90s", now) == T0 - timedelta(seconds=90)
    assert parse_time("15m", now) == T0 - timedelta(minutes=15)
    assert parse_time(" 2h ", now) == T0 - timedelta(hours=2)
    assert parse_time("1.5d", now) == T0 - timedelta(hours=36)
    assert parse_time("2025-03-01T12:00:00", now) == T0  # naive: UTC
    assert parse_time("2025-03-01T14:00:00+02:00", now) == T0
    assert parse_time("2025-03-01T12:00:00Z", now) == T0
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday", now)


# ------------------------------------------------------------------------------------------ report


def test_bins() -> None:
    assert bin_seconds(0) == 1
    assert bin_seconds(60) == 1
    assert bin_seconds(61) == 2
    assert bin_seconds(3600) == 60
    assert bin_seconds(40 * 86400) == 86400
    assert bin_seconds(100 * 86400) == 2 * 86400
    bins = time_bins([frame(seconds=s) for s in (0, 0.5, 1.2, 3)])
    assert [(b.start, b.seconds, len(b.frames)) for b in bins] == [
        (T0 + timedelta(seconds=i), 1, count) for i, count in enumerate([2, 1, 0, 1])
    ]
    assert time_bins([]) == []


def test_tables() -> None:
    rows = camera_rows(scenario())
    assert [row[0] for row in rows] == ["cam-a", "cam-b", "ALL"]
    # camera, frames, masked, dropped, fps, naive chg, naive rate, final chg, final rate, budget,
    # iter mean, iter p95, p50, p95, p99, residual
    assert " ".join(rows[-1]) == "ALL 6 0 0 1.20 4 66.7% 1 16.7% 1 4.25 9.1 35 175 195 3"
    aggregates = [
        aggregate("w1", 10, 0.5, 2, dead_letters=1, masked=1),
        aggregate("w1", 20, 1.0, 6, dead_letters=2),
        aggregate("w1", 5, None, 0),
        aggregate("w0", 1, None, 0),
        aggregate("w2", 4, None, 0, corrected=0),  # correction off: no decisions, so no decision counts
    ]
    # w1's accuracy is weighted by labelled frames: (0.5 * 2 + 1.0 * 6) / 8
    assert worker_rows(aggregates) == [
        ["w0", "1", "1", "0", "0", "1", "0", "0", "2", "-", "-"],
        ["w1", "3", "35", "1", "3", "3", "0", "0", "6", "87.5%", "87.5%"],
        ["w2", "1", "4", "0", "0", "-", "-", "-", "2", "-", "-"],
    ]


def png_images(text: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)]


def test_write_report(tmp_path: Path) -> None:
    records: list[FrameRecord | AggregateRecord] = [
        *scenario(),
        frame("<cam&1>", 6, naive=True, final=True),
        aggregate("w1", 4, 0.5, 2, dead_letters=3),
    ]
    path = write_report(iter(records), tmp_path / "out", title="Night <shift>")
    assert path == tmp_path / "out" / "index.html"
    text = path.read_text(encoding="utf-8")
    images = png_images(text)
    assert len(images) == 4
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 1000 for image in images)
    for name in ("throughput", "decision-changes", "latency", "iterations"):
        assert f"id='{name}'" in text
    assert "<title>Night &lt;shift&gt;</title>" in text
    assert "&lt;cam&amp;1&gt;" in text and "<cam&1>" not in text
    assert "7 frame record(s), 1 aggregate record(s)" in text
    assert "2025-03-01 12:00:00 to 2025-03-01 12:00:10 UTC" in text  # the aggregate ends last
    assert "<td>ALL</td><td>7</td>" in text
    assert "Workers (aggregate records)" in text and "<td>50.0%</td>" in text
    assert list((tmp_path / "out").iterdir()) == [path]  # self-contained


def test_write_report_without_frames(tmp_path: Path) -> None:
    text = write_report([aggregate("w1", 0, None, 0)], tmp_path).read_text(encoding="utf-8")
    assert "No frame records" in text and png_images(text) == []
    assert "Workers (aggregate records)" in text
    assert "no records" in write_report([], tmp_path / "empty").read_text(encoding="utf-8")


def test_report_of_every_outcome_and_no_correction(tmp_path: Path) -> None:
    uncorrected = [
        frame("cam-d", 0, corrected=False),
        frame("cam-d", 1, corrected=False, outcome="masked"),
        frame("cam-d", 2, corrected=False, outcome="dropped"),
    ]
    # camera, frames, masked, dropped, fps, then naive and final counts and rates, budget, iterations: '-'
    assert camera_rows(uncorrected)[-1][:12] == ["ALL", "3", "1", "1", "1.50", *["-"] * 7]
    assert len(png_images(write_report(uncorrected, tmp_path / "off").read_text(encoding="utf-8"))) == 4
    text = write_report(every_outcome(), tmp_path / "all").read_text(encoding="utf-8")
    assert len(png_images(text)) == 4
    assert "<td>ALL</td><td>12</td><td>1</td><td>1</td>" in text


def test_write_report_single_frame_and_wide_iterations(tmp_path: Path) -> None:
    # one instant (a zero-length span) and iteration counts beyond one bar per count still plot
    text = write_report([frame(iterations=500), frame(iterations=0)], tmp_path).read_text(encoding="utf-8")
    assert len(png_images(text)) == 4


# ------------------------------------------------------------------------------------------ monitor loop

Record = namedtuple("Record", "topic partition offset timestamp headers value")


class FakeConsumer:
    """Stands in for KafkaConsumer: one partition per topic, one record handed out per poll."""

    def __init__(self, topics: Mapping[str, list[Record]]) -> None:
        self.topics = dict(topics)
        self.positions: dict[TopicPartition, int] = {}
        self.closed = False

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0} if topic in self.topics else set()

    def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.topics[tp.topic]) for tp in partitions}

    def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 0)

    def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        return dict.fromkeys(timestamps)  # "nothing that recent": the window starts at the end

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(partitions, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, *partitions: TopicPartition) -> None:
        pass

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def poll(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Record]]:
        for tp, position in self.positions.items():
            records = self.topics[tp.topic]
            if position < len(records):
                self.positions[tp] = position + 1
                return {tp: [records[position]]}
        return {}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> Callable[[Mapping[str, list[Record]]], FakeConsumer]:
    """Makes run_monitor read the given topics from a FakeConsumer (returned, to inspect afterwards)."""

    def install(topics: Mapping[str, list[Record]]) -> FakeConsumer:
        consumer = FakeConsumer(topics)
        monkeypatch.setattr(monitor_module, "open_consumer", lambda bootstrap, **options: consumer)
        return consumer

    return install


FakeKafka = Callable[[Mapping[str, list[Record]]], FakeConsumer]


def metrics_topic(*frames: FrameRecord, junk: int = 0) -> list[Record]:
    values = [f.model_dump_json().encode() for f in frames] + [b"junk"] * junk
    return [Record("metrics", 0, i, 0, [], value) for i, value in enumerate(values)]


def test_live_dashboard_from_the_beginning(fake_kafka: FakeKafka) -> None:
    dlq = [Record("dlq", 0, 0, 1_740_830_400_000, [("dlq-reason", b"truncated"), ("camera-id", b"cam-a")], b"")]
    consumer = fake_kafka({"metrics": metrics_topic(*scenario(), junk=1), "dlq": dlq})
    out = io.StringIO()
    code = run_monitor(
        "fake:9092", "metrics", "dlq", from_beginning=True, refresh_s=0.05, duration_s=0.5, display="plain", out=out
    )
    assert code == 1  # cam-a's final decision change
    assert consumer.closed
    summary, table, verdict = out.getvalue().strip().split("\n\n")[-3:]  # the last refresh
    assert "[live]" in summary and "dead letters: truncated 1" in summary
    assert "invalid records on the metrics topic: 1" in summary
    assert [line.split()[1] for line in table.splitlines() if line.startswith("ALL")] == ["6"]
    assert verdict == "VIOLATION: final decision changes: 1 > 0 (cam-a: 1)"
    assert "\x1b[2J" not in out.getvalue()  # not a terminal: no screen clearing


def test_live_rich_display(fake_kafka: FakeKafka) -> None:
    pytest.importorskip("rich")
    fake_kafka({"metrics": metrics_topic(*scenario())})
    out = io.StringIO()
    code = run_monitor(
        "fake:9092", "metrics", None, from_beginning=True, refresh_s=0.05, duration_s=0.3, display="rich", out=out
    )
    assert code == 1
    text = out.getvalue()  # not a terminal: rich's Live prints the last display when it stops
    assert "veilstream monitor" in text and "ALL" in text and "cam-b" in text
    assert "VIOLATION: final decision changes: 1 > 0 (cam-a: 1)" in text


def test_live_json_lines(fake_kafka: FakeKafka) -> None:
    fake_kafka({"metrics": metrics_topic(frame(), frame("cam-b", 2))})
    out = io.StringIO()
    code = run_monitor(
        "fake:9092", "metrics", None, as_json=True, from_beginning=True, refresh_s=0.05, duration_s=0.4, out=out
    )
    assert code == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) >= 2 and lines[-1]["overall"]["frames"] == 2 and lines[-1]["ok"] is True


def test_once_window_and_missing_topics(fake_kafka: FakeKafka) -> None:
    fake_kafka({"metrics": metrics_topic(frame(), frame(naive=True))})
    out, err = io.StringIO(), io.StringIO()
    code = run_monitor("fake:9092", "metrics", "dlq", once=True, as_json=True, window_s=1e9, out=out, err=err)
    assert code == 0
    data = json.loads(out.getvalue())
    assert data["overall"]["frames"] == 0  # the stand-in finds nothing recent: the window starts at the end
    assert "dead-letter topic 'dlq' not found" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    code = run_monitor("fake:9092", "other", None, once=True, from_beginning=True, out=out, err=err)
    assert code == 2
    assert "metrics topic 'other' does not exist" in err.getvalue() and out.getvalue() == ""


def test_once_json_figures_are_stats_figures(fake_kafka: FakeKafka) -> None:
    records = every_outcome()
    fake_kafka({"metrics": metrics_topic(*records)})
    out = io.StringIO()
    code = run_monitor(
        "fake:9092", "metrics", None, once=True, as_json=True, from_beginning=True, out=out, err=io.StringIO()
    )
    assert code == 1  # two final decision changes
    overall = json.loads(out.getvalue())["overall"]
    expected = figures(records, 8.5).model_dump(mode="json")
    assert {name: overall[name] for name in expected} == expected


def test_unreachable_broker_exits_2() -> None:
    err = io.StringIO()
    code = run_monitor("127.0.0.1:1", once=True, connect_timeout_s=1.0, out=io.StringIO(), err=err)
    assert code == 2
    assert "cannot read from Kafka at 127.0.0.1:1" in err.getvalue()


def test_report_from_a_topic_uses_the_kafka_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`veilstream report --topic` connects with the configured TLS and SASL settings, as the monitor does."""
    seen: list[dict[str, Any]] = []

    def consumer(**options: Any) -> FakeConsumer:
        seen.append(options)
        return FakeConsumer({"metrics": metrics_topic(*scenario())})

    monkeypatch.setattr(kafka_io, "KafkaConsumer", consumer)
    config = tmp_path / "veilstream.yaml"
    kafka = {
        "bootstrap_servers": "broker-1:9093,broker-2:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "monitor",
        "sasl_password": "s3cret",
        "ssl_cafile": "/etc/kafka/ca.crt",
    }
    config.write_text(json.dumps({"kafka": kafka}))
    code = main(["--config", str(config), "report", "--topic", "metrics", "--out", str(tmp_path / "report")])
    assert code == 0
    assert len(seen) == 1
    options = seen[0]
    assert options["bootstrap_servers"] == ["broker-1:9093", "broker-2:9093"]
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("monitor", "s3cret")
    assert options["ssl_cafile"] == "/etc/kafka/ca.crt" and options["ssl_check_hostname"] is True
    assert options["enable_auto_commit"] is False and options["group_id"] is None  # still a reader that never commits


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="group_lag"):
        run_monitor("127.0.0.1:1", once=True, thresholds=Thresholds(max_lag=0))
    with pytest.raises(ValueError, match="window_s"):
        run_monitor("127.0.0.1:1", once=True, window_s=0)


def test_nan_never_leaks() -> None:
    data = build_snapshot([]).to_json(Thresholds())
    text = json.dumps(data, allow_nan=False)  # would raise on NaN
    assert "NaN" not in text
    assert not any(isinstance(v, float) and math.isnan(v) for v in data["overall"].values())
