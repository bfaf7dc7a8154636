"""The pure aggregation core of `veilstream monitor`: frame records and dead letters folded into a Snapshot.

No I/O here: the monitor feeds records read from Kafka, tests feed hand-built ones.

The figures of a camera (and of all cameras) are `veilstream.stats.figures` of its frame records: the same
definitions as the worker's aggregate records, `eval`, `anonymize` and the demo. What only the monitor adds:

* the p99 of `latency_ms` (the tail the dashboard watches; `stats.percentile`);
* the dead-letter topic: messages counted by their `dlq-reason` header, per camera when they carry
  `camera-id` (a dead letter without one counts in the overall figures only);
* the window: throughput is frames / window length in seconds, where the window is the one given, or else
  spans the earliest to the latest frame `time` (None when it has no length); cameras share the overall
  window, so their throughputs add up to the overall one;
* consumer lag and thresholds.

Naive datetimes are taken as UTC.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from veilstream.schemas import Figures, FrameRecord
from veilstream.stats import figures, latencies_ms, percentile

UNKNOWN_REASON = "unknown"
"""Reason of a dead letter without a `dlq-reason` header (or with an empty one)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Frozen):
    """Limits a snapshot must stay within (`None`: not checked). Counts are over the whole window."""

    max_final_changes: int = Field(0, ge=0, description="corrected frames whose published decision changed")
    max_dead_letters: int | None = Field(
        None, ge=0, description="the larger of the dead-letter topic's messages and the dropped frame records"
    )
    max_budget_exhausted: int | None = Field(None, ge=0)
    max_p95_latency_ms: float | None = Field(None, gt=0, description="overall p95 of latency_ms")
    max_lag: int | None = Field(None, ge=0, description="total consumer lag of the watched group")


class MonitorFigures(Figures):
    """`stats.figures` of one camera's frame records (or of all cameras'), plus what only the monitor has."""

    p99_latency_ms: float | None
    dead_letter_messages: int = Field(description="messages on the dead-letter topic (a camera's: by camera-id)")
    dead_letters_by_reason: dict[str, int] = Field(description="dead-letter topic messages by dlq-reason")

    def stats_figures(self) -> Figures:
        """The part that is `stats.figures` of the records."""
        return Figures(**self.model_dump(include=set(Figures.model_fields)))

    def dead_letters_seen(self) -> int:
        """Dead letters by either account: the topic holds those without a record (a failed delivery), the
        records those of a topic not read (`--no-dlq`), so a gate takes the larger."""
        return max(self.dead_letters, self.dead_letter_messages)


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
    overall: MonitorFigures
    cameras: dict[str, MonitorFigures]
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
        dead_letters = overall.dead_letters_seen()
        if thresholds.max_dead_letters is not None and dead_letters > thresholds.max_dead_letters:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in overall.dead_letters_by_reason.items())
            found.append(
                f"dead letters: {dead_letters} > {thresholds.max_dead_letters} ({reasons or 'dropped frame records'})"
            )
        if thresholds.max_budget_exhausted is not None and overall.budget_exhausted > thresholds.max_budget_exhausted:
            found.append(
                f"budget exhaustions: {overall.budget_exhausted} > {thresholds.max_budget_exhausted}"
                f" ({self._per_camera('budget_exhausted')})"
            )
        limit = thresholds.max_p95_latency_ms
        if limit is not None and overall.p95_latency_ms is not None and overall.p95_latency_ms > limit:
            found.append(f"p95 latency: {overall.p95_latency_ms:.1f} ms > {limit:g} ms")
        if thresholds.max_lag is not None:
            if self.lag is None:
                # A gate that cannot be evaluated must not pass silently.
                found.append(f"consumer lag not measured: max_lag={thresholds.max_lag} cannot be checked")
            elif self.lag.total > thresholds.max_lag:
                found.append(f"consumer lag of group {self.lag.group}: {self.lag.total} > {thresholds.max_lag}")
        return found

    def _per_camera(self, field: str) -> str:
        counts = ((camera, getattr(camera_figures, field)) for camera, camera_figures in self.cameras.items())
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


def p99_latency_ms(records: Sequence[FrameRecord]) -> float | None:
    """The p99 of `latency_ms` (None without records): the one latency figure beyond `stats.figures`."""
    value = percentile(latencies_ms(records), 99)
    return None if math.isnan(value) else value


def monitor_figures(
    records: Sequence[FrameRecord], dead_letters: Sequence[DeadLetter], seconds: float | None
) -> MonitorFigures:
    """`stats.figures(records, seconds)` with the monitor's own figures beside it."""
    reasons = Counter(d.reason for d in dead_letters)
    return MonitorFigures(
        **figures(records, seconds).model_dump(),
        p99_latency_ms=p99_latency_ms(records),
        dead_letter_messages=len(dead_letters),
        dead_letters_by_reason=dict(sorted(reasons.items())),
    )


def _held(record: FrameRecord) -> FrameRecord:
    # A long window holds many records: boxes and error text are not figures, so they are not kept.
    # (The test that the monitor's figures equal `stats.figures` feeds records with both.)
    if not record.detections and record.detail is None:
        return record
    return record.model_copy(update={"detections": [], "detail": None})


class SnapshotBuilder:
    """Accumulates frame records and dead letters; `snapshot()` computes the figures of what it holds."""

    def __init__(self) -> None:
        self._frames: list[tuple[datetime, FrameRecord]] = []
        self._dead_letters: list[DeadLetter] = []
        self.invalid_records = 0

    def __len__(self) -> int:
        return len(self._frames)

    def add_frame(self, record: FrameRecord) -> None:
        self._frames.append((as_utc(record.time), _held(record)))

    def add_dead_letter(self, dead_letter: DeadLetter) -> None:
        self._dead_letters.append(dead_letter)

    def add_invalid(self) -> None:
        """Count a metrics-topic message that is not a metrics record (shown, never fatal)."""
        self.invalid_records += 1

    def discard_before(self, start: datetime) -> None:
        """Forget frames and dead letters older than `start` (the live dashboard's sliding window)."""
        start = as_utc(start)
        self._frames = [(time, record) for time, record in self._frames if time >= start]
        self._dead_letters = [d for d in self._dead_letters if d.time is None or d.time >= start]

    def snapshot(
        self,
        *,
        window_start: datetime | None = None,
        window_end: datetime | None = None,
        lag: ConsumerLag | None = None,
    ) -> Snapshot:
        """The figures of everything held; missing window bounds are taken from the frames' times."""
        times = [time for time, _ in self._frames]
        start = as_utc(window_start) if window_start is not None else min(times, default=None)
        end = as_utc(window_end) if window_end is not None else max(times, default=None)
        seconds = (end - start).total_seconds() if start is not None and end is not None else None
        usable = seconds if seconds is not None and seconds > 0 else None
        records = [record for _, record in self._frames]
        by_camera: defaultdict[str, list[FrameRecord]] = defaultdict(list)
        for record in records:
            by_camera[record.camera_id].append(record)
        dead_by_camera: defaultdict[str, list[DeadLetter]] = defaultdict(list)
        for dead_letter in self._dead_letters:
            if dead_letter.camera_id:
                dead_by_camera[dead_letter.camera_id].append(dead_letter)
        return Snapshot(
            window_start=start,
            window_end=end,
            window_seconds=seconds,
            overall=monitor_figures(records, self._dead_letters, usable),
            cameras={
                camera: monitor_figures(by_camera[camera], dead_by_camera[camera], usable)
                for camera in sorted(by_camera.keys() | dead_by_camera.keys())
            },
            workers=sorted({record.worker for record in records}),
            invalid_records=self.invalid_records,
            lag=lag,
        )


def build_snapshot(
    frames: Iterable[FrameRecord],
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
