"""Prometheus metrics of one worker, and the window behind its periodic aggregate record.

Both are fed only with delivered frames (`WorkerMetrics.count`, `AggregateWindow.add` after the sink's flush
succeeded), so a batch that is rewound and processed again counts once. Both are bounded: a label takes at most
`MAX_LABEL_VALUES` values (later ones count as "other"), and the window keeps only what the aggregate reads of
each record (one with 40 boxes and decisions is ~30 times its summary) and says when it holds
`MAX_WINDOW_RECORDS`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from veilstream.correction.corrector import BUDGET_STOPS
from veilstream.detectors.base import KINDS
from veilstream.schemas import AggregateRecord, FrameRecord
from veilstream.stats import figures

# Distinct values per label (topics, dead-letter reasons, stages, budgets): all come from the configuration and
# the code today; the bound keeps a future source of free text (a topic pattern) from growing the registry.
MAX_LABEL_VALUES = 64
BUDGETS = tuple(reason.removesuffix("_budget") for reason in BUDGET_STOPS)  # the label: a stop reason's budget
OTHER = "other"
# Frame records per aggregate window: with the default 10 s window a worker would need 1,000 frames/s to reach it.
MAX_WINDOW_RECORDS = 10_000
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITERATION_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


class _Bounded:
    """The values one label has taken: the first `limit` distinct ones pass, later new ones become OTHER."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


class WorkerMetrics:
    """Every Prometheus series the worker exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, max_label_values: int = MAX_LABEL_VALUES) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_label_values = max_label_values
        self._topic, self._reason, self._stage, self._budget = (_Bounded(max_label_values) for _ in range(4))
        r = self.registry
        self.frames_in = Counter("veilstream_frames_in", "Frames consumed and handled", ["topic"], registry=r)
        self.frames_out = Counter(
            "veilstream_frames_out", "Frames published on the output topic (anonymized or masked)", registry=r
        )
        self.dead_letters = Counter(
            "veilstream_dead_letters", "Frames sent to the dead-letter topic", ["reason"], registry=r
        )
        self.stage_seconds = Histogram(
            "veilstream_stage_seconds", "Per-frame time in each stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.frame_latency = Histogram(
            "veilstream_frame_latency_seconds",
            "Poll to acknowledged output, per frame",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.naive_changes = Counter(
            "veilstream_naive_decision_changes", "Frames whose decision naive anonymization changed", registry=r
        )
        self.final_changes = Counter(
            "veilstream_final_decision_changes", "Published frames whose decision differs from the original", registry=r
        )
        self.iterations = Histogram(
            "veilstream_correction_iterations", "Correction iterations per frame", buckets=ITERATION_BUCKETS, registry=r
        )
        self.budget_exhausted = Counter(
            "veilstream_budget_exhaustions", "Frames whose correction budget ran out", ["budget"], registry=r
        )
        self.residual = Counter(
            "veilstream_residual_detections", "Anonymized objects detected again on the output", ["kind"], registry=r
        )
        self.redeliveries = Counter(
            "veilstream_batch_retries", "Batches reprocessed because an output was not acknowledged", registry=r
        )
        self.consumer_lag = Gauge(
            "veilstream_consumer_lag", "Messages behind the end", ["topic", "partition"], registry=r
        )
        self.ready = Gauge(
            "veilstream_ready",
            "1 when ready (as /readyz): assigned partitions can be fetched and outputs delivered now",
            registry=r,
        )
        self.last_loop = Gauge("veilstream_last_loop_timestamp_seconds", "When the main loop last turned", registry=r)
        self._start_known_series_at_zero()

    def _start_known_series_at_zero(self) -> None:
        """Export the closed label sets at 0 from the start: Prometheus' increase() needs a sample before the
        first count, so a series born at 1 (a pod's first residual face) would never fire an alert."""
        for kind in KINDS:
            self.residual.labels(kind)
        for budget in BUDGETS:
            self.budget_exhausted.labels(self._budget(budget))

    def count(self, records: Sequence[FrameRecord], decode_s: float, latency_s: float) -> None:
        """Count the delivered frames of one batch: their records as they finally were (a refused output is a
        dropped record); `decode_s` is each frame's decode time, `latency_s` poll to acknowledgement."""
        for record in records:
            self.frames_in.labels(self._topic(record.source_topic or "")).inc()
            self.frame_latency.observe(latency_s)
            self.stage_seconds.labels(self._stage("decode")).observe(decode_s)
            for stage, ms in record.stage_ms.items():
                self.stage_seconds.labels(self._stage(stage)).observe(ms / 1000)
            if record.residual_faces:
                self.residual.labels("face").inc(record.residual_faces)
            if record.residual_plates:
                self.residual.labels("plate").inc(record.residual_plates)
            if record.outcome == "dropped":
                self.dead_letters.labels(self._reason(record.reason or "unknown")).inc()
                continue
            self.frames_out.inc()  # a masked frame too: it is on the output topic (records tell the two apart)
            if record.outcome == "published" and record.corrected:
                self._count_correction(record)

    def _count_correction(self, record: FrameRecord) -> None:
        self.iterations.observe(record.iterations)
        if record.naive_changed:
            self.naive_changes.inc()
        if record.consistent is False:
            self.final_changes.inc()
        if record.budget_exhausted and record.stop_reason:
            self.budget_exhausted.labels(self._budget(record.stop_reason.removesuffix("_budget"))).inc()


def summary_of(record: FrameRecord) -> FrameRecord:
    """The record less what `stats.figures` does not read: boxes, decisions past the top one, stage times, the
    detail. The aggregate of summaries is the aggregate of the records."""
    return record.model_copy(
        update={
            "detections": [],
            "leak_detections": [],
            "naive": [],
            "original": record.original[:1],
            "final": record.final[:1],
            "stage_ms": {},
            "detail": None,
        }
    )


@dataclass
class AggregateWindow:
    """The delivered frames between two aggregate records, as summaries (`summary_of`). `full` once it holds
    `max_records`: the owner should close it then rather than wait for the interval (it keeps adding otherwise,
    so that the aggregate stays exact)."""

    worker: str
    started: float = field(default_factory=time.time)
    records: list[FrameRecord] = field(default_factory=list)
    max_records: int = MAX_WINDOW_RECORDS

    def add(self, records: Iterable[FrameRecord]) -> None:
        self.records.extend(summary_of(record) for record in records)

    @property
    def full(self) -> bool:
        return len(self.records) >= self.max_records

    def close(self, now: float | None = None) -> AggregateRecord:
        """The aggregate of the window (`stats.figures`, the one aggregate); the caller starts a new window."""
        now = time.time() if now is None else now
        return AggregateRecord(
            **figures(self.records, max(now - self.started, 1e-9)).model_dump(),
            worker=self.worker,
            window_start=datetime.fromtimestamp(self.started, UTC),
            window_end=datetime.fromtimestamp(now, UTC),
        )
