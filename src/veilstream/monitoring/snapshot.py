"""The pure aggregation core of `veilstream monitor`: frame records and dead letters folded into a Snapshot.

No I/O here: the monitor feeds records read from Kafka, tests feed hand-built ones.

Definitions (the same as the worker's aggregate records and `veilstream eval`, via `veilstream.stats`):

* final decision change: a frame whose published decision differs from the original (`consistent` false);
* naive decision change: `naive_changed`; rates are changes / frames (None without frames);
* mean / p95 iterations: over the frames that needed at least one correction step (the paper's
  convention, `stats.summarize_frames`); `max_iterations` over all frames;
* latency p50 / p95 / p99: linearly interpolated percentiles of `latency_ms` (`stats.percentile`);
* throughput: frames / window length in seconds, where the window is the one given, or else spans the
  earliest to the latest frame `time` (None when it has no length); cameras share the overall window,
  so their throughputs add up to the overall one;
* residual detections: `residual_faces + residual_plates`;
* dead letters: counted by their `dlq-reason` header, per camera when they carry `camera-id` (a dead
  letter without one counts in the overall figures only).

Naive datetimes are taken as UTC.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from veilstream.schemas import FrameMetrics
from veilstream.stats import percentile, summarize_frames

UNKNOWN_REASON = "unknown"
"""Reason of a dead letter without a `dlq-reason` header (or with an empty one)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Frozen):
    """Limits a snapshot must stay within (`None`: not checked). Counts are over the whole window."""

    max_final_changes: int = Field(0, ge=0, description="published frames whose decision changed")
    max_dead_letters: int | None = Field(None, ge=0)
    max_budget_exhausted: int | None = Field(None, ge=0)
    max_p95_latency_ms: float | None = Field(None, gt=0, description="overall p95 of latency_ms")
    max_lag: int | None = Field(None, ge=0, description="total consumer lag of the watched group")


class Figures(_Frozen):
    """The figures of one camera, or of all of them."""

    frames: int
    naive_changed: int
    naive_change_rate: float | None
    final_changed: int
    final_change_rate: float | None
    budget_exhausted: int
    frames_corrected: int = Field(description="frames with at least one correction iteration")
    mean_iterations: float | None = Field(description="over frames_corrected")
    p95_iterations: float | None = Field(description="over frames_corrected")
    max_iterations: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    frames_per_second: float | None
    residual_faces: int
    residual_plates: int
    residual_detections: int
    dead_letters: int
    dead_letters_by_reason: dict[str, int]


class PartitionLag(_Frozen):
    """How far one partition's committed offset is behind the partition's end."""

    topic: str
    partition: int
    committed: int | None = Field(description="None: the group committed nothing for this partition")
    end: int
    lag: int


class ConsumerLag(_Frozen):
    """The lag of a consumer group over the partitions of its input topic(s)."""

    group: str
    partitions: list[PartitionLag]
    total: int


class Snapshot(_Frozen):
    """Figures over a window, overall and per camera (sorted by camera id), plus consumer lag if measured."""

    window_start: datetime | None
    window_end: datetime | None
    window_seconds: float | None
    overall: Figures
    cameras: dict[str, Figures]
    workers: list[str]
    invalid_records: int = Field(0, description="metrics-topic messages that were not metrics records")
    lag: ConsumerLag | None = None

    def violations(self, thresholds: Thresholds) -> list[str]:
        """One message per threshold crossed (a count above its maximum); empty when all hold."""
        overall = self.overall
        found: list[str] = []
        if overall.final_changed > thresholds.max_final_changes:
            found.append(
                f"final decision changes: {overall.final_changed} > {thresholds.max_final_changes}"
                f" ({self._per_camera('final_changed')})"
            )
        if thresholds.max_dead_letters is not None and overall.dead_letters > thresholds.max_dead_letters:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in overall.dead_letters_by_reason.items())
            found.append(f"dead letters: {overall.dead_letters} > {thresholds.max_dead_letters} ({reasons})")
        if thresholds.max_budget_exhausted is not None and overall.budget_exhausted > thresholds.max_budget_exhausted:
            found.append(
                f"budget exhaustions: {overall.budget_exhausted} > {thresholds.max_budget_exhausted}"
                f" ({self._per_camera('budget_exhausted')})"
            )
        limit = thresholds.max_p95_latency_ms
        if limit is not None and overall.latency_p95_ms is not None and overall.latency_p95_ms > limit:
            found.append(f"p95 latency: {overall.latency_p95_ms:.1f} ms > {limit:g} ms")
        if thresholds.max_lag is not None:
            if self.lag is None:
                # A gate that cannot be evaluated must not pass silently.
                found.append(f"consumer lag not measured: max_lag={thresholds.max_lag} cannot be checked")
            elif self.lag.total > thresholds.max_lag:
                found.append(f"consumer lag of group {self.lag.group}: {self.lag.total} > {thresholds.max_lag}")
        return found

    def _per_camera(self, field: str) -> str:
        counts = ((camera, getattr(figures, field)) for camera, figures in self.cameras.items())
        return ", ".join(f"{camera}: {count}" for camera, count in counts if count) or "no camera"

    def to_json(self, thresholds: Thresholds | None = None) -> dict[str, Any]:
        """The snapshot as JSON-ready data; with thresholds, also `thresholds`, `violations` and `ok`."""
        data = self.model_dump(mode="json")
        if thresholds is not None:
            violations = self.violations(thresholds)
            data |= {"thresholds": thresholds.model_dump(mode="json"), "violations": violations, "ok": not violations}
        return data


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What the monitor keeps of a dead letter: its headers' reason and camera, and the message time."""

    reason: str
    camera_id: str | None = None
    time: datetime | None = None


def dead_letter_from_headers(headers: Iterable[tuple[str, bytes | None]], timestamp_ms: int | None) -> DeadLetter:
    """Read `dlq-reason` and `camera-id` from Kafka headers, leniently: a monitor must count every dead letter,
    even one whose headers are incomplete (missing reason: "unknown")."""
    values: dict[str, str] = {}
    for name, raw in headers:
        if name in ("dlq-reason", "camera-id") and raw:
            values[name] = raw.decode("utf-8", "replace")
    time = datetime.fromtimestamp(timestamp_ms / 1000, UTC) if timestamp_ms is not None and timestamp_ms >= 0 else None
    return DeadLetter(values.get("dlq-reason") or UNKNOWN_REASON, values.get("camera-id"), time)


def as_utc(moment: datetime) -> datetime:
    """Aware datetimes as they are, naive ones taken as UTC (so they can be compared)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Frame:
    """The fields of a FrameMetrics the figures use: kept instead of the record to hold long windows cheaply."""

    time: datetime
    camera_id: str
    worker: str
    naive_changed: bool
    final_changed: bool
    budget_exhausted: bool
    iterations: int
    latency_ms: float
    residual_faces: int
    residual_plates: int

    @classmethod
    def of(cls, record: FrameMetrics) -> _Frame:
        return cls(
            time=as_utc(record.time),
            camera_id=record.camera_id,
            worker=record.worker,
            naive_changed=record.naive_changed,
            final_changed=not record.consistent,
            budget_exhausted=record.budget_exhausted,
            iterations=record.iterations,
            latency_ms=record.latency_ms,
            residual_faces=record.residual_faces,
            residual_plates=record.residual_plates,
        )


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else value


def _figures(frames: Sequence[_Frame], dead_letters: Sequence[DeadLetter], seconds: float | None) -> Figures:
    # summarize_frames holds the consistency and iteration conventions shared with `veilstream eval`.
    summary = summarize_frames(
        [
            {
                "naive_changed": f.naive_changed,
                "corrected_changed": f.final_changed,
                "budget_exhausted": f.budget_exhausted,
                "iterations": f.iterations,
                "ms": f.latency_ms,
            }
            for f in frames
        ]
    )
    latencies = [f.latency_ms for f in frames]
    reasons = Counter(d.reason for d in dead_letters)
    faces = sum(f.residual_faces for f in frames)
    plates = sum(f.residual_plates for f in frames)
    return Figures(
        frames=len(frames),
        naive_changed=summary["naive_changed"],
        naive_change_rate=_optional(summary["naive_changed_rate"]),
        final_changed=summary["corrected_changed"],
        final_change_rate=_optional(summary["corrected_changed_rate"]),
        budget_exhausted=summary["budget_exhausted"],
        frames_corrected=summary["frames_corrected"],
        mean_iterations=_optional(summary["mean_iterations"]),
        p95_iterations=_optional(summary["p95_iterations"]),
        max_iterations=max((f.iterations for f in frames), default=0),
        latency_p50_ms=_optional(percentile(latencies, 50)),
        latency_p95_ms=_optional(percentile(latencies, 95)),
        latency_p99_ms=_optional(percentile(latencies, 99)),
        frames_per_second=len(frames) / seconds if seconds else None,
        residual_faces=faces,
        residual_plates=plates,
        residual_detections=faces + plates,
        dead_letters=len(dead_letters),
        dead_letters_by_reason=dict(sorted(reasons.items())),
    )


class SnapshotBuilder:
    """Accumulates frame records and dead letters; `snapshot()` computes the figures of what it holds."""

    def __init__(self) -> None:
        self._frames: list[_Frame] = []
        self._dead_letters: list[DeadLetter] = []
        self.invalid_records = 0

    def __len__(self) -> int:
        return len(self._frames)

    def add_frame(self, record: FrameMetrics) -> None:
        self._frames.append(_Frame.of(record))

    def add_dead_letter(self, dead_letter: DeadLetter) -> None:
        self._dead_letters.append(dead_letter)

    def add_invalid(self) -> None:
        """Count a metrics-topic message that is not a metrics record (shown, never fatal)."""
        self.invalid_records += 1

    def discard_before(self, start: datetime) -> None:
        """Forget frames and dead letters older than `start` (the live dashboard's sliding window)."""
        start = as_utc(start)
        self._frames = [f for f in self._frames if f.time >= start]
        self._dead_letters = [d for d in self._dead_letters if d.time is None or d.time >= start]

    def snapshot(
        self,
        *,
        window_start: datetime | None = None,
        window_end: datetime | None = None,
        lag: ConsumerLag | None = None,
    ) -> Snapshot:
        """The figures of everything held; missing window bounds are taken from the frames' times."""
        times = [f.time for f in self._frames]
        start = as_utc(window_start) if window_start is not None else min(times, default=None)
        end = as_utc(window_end) if window_end is not None else max(times, default=None)
        seconds = (end - start).total_seconds() if start is not None and end is not None else None
        usable = seconds if seconds is not None and seconds > 0 else None
        cameras = sorted({f.camera_id for f in self._frames} | {d.camera_id for d in self._dead_letters if d.camera_id})
        return Snapshot(
            window_start=start,
            window_end=end,
            window_seconds=seconds,
            overall=_figures(self._frames, self._dead_letters, usable),
            cameras={
                camera: _figures(
                    [f for f in self._frames if f.camera_id == camera],
                    [d for d in self._dead_letters if d.camera_id == camera],
                    usable,
                )
                for camera in cameras
            },
            workers=sorted({f.worker for f in self._frames}),
            invalid_records=self.invalid_records,
            lag=lag,
        )


def build_snapshot(
    frames: Iterable[FrameMetrics],
    dead_letters: Iterable[DeadLetter] = (),
    *,
    window_start: datetime | None = None,
    window_end: datetime | None = None,
    lag: ConsumerLag | None = None,
) -> Snapshot:
    """The snapshot of the given records in one call (see SnapshotBuilder.snapshot for the window)."""
    builder = SnapshotBuilder()
    for frame in frames:
        builder.add_frame(frame)
    for dead_letter in dead_letters:
        builder.add_dead_letter(dead_letter)
    return builder.snapshot(window_start=window_start, window_end=window_end, lag=lag)


def compute_lag(
    group: str,
    end_offsets: Mapping[tuple[str, int], int],
    committed: Mapping[tuple[str, int], int | None],
    beginning_offsets: Mapping[tuple[str, int], int] | None = None,
) -> ConsumerLag:
    """Lag per (topic, partition) of `end_offsets`: end - committed offset, or, where the group committed
    nothing (None or a negative offset), end - beginning offset: everything retained is still unread."""
    partitions = []
    for (topic, partition), end in sorted(end_offsets.items()):
        offset = committed.get((topic, partition))
        if offset is not None and offset < 0:
            offset = None  # Kafka answers -1 for "no committed offset"
        floor = offset if offset is not None else (beginning_offsets or {}).get((topic, partition), 0)
        lag = max(0, end - floor)  # a committed offset past the end (after truncation) is no lag
        partitions.append(PartitionLag(topic=topic, partition=partition, committed=offset, end=end, lag=lag))
    return ConsumerLag(group=group, partitions=partitions, total=sum(p.lag for p in partitions))
