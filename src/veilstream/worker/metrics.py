"""Prometheus metrics of one worker, and the window behind its periodic aggregate record.

Both are fed only with delivered frames (`WorkerMetrics.count`, `AggregateWindow.add` after the sink's flush
succeeded), so a batch that is rewound and processed again counts once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from veilstream.schemas import AggregateRecord, FrameRecord
from veilstream.stats import figures

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITERATION_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


class WorkerMetrics:
    """Every Prometheus series the worker exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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

    def count(self, records: Sequence[FrameRecord], decode_s: float, latency_s: float) -> None:
        """Count the delivered frames of one batch: their records as they finally were (a refused output is a
        dropped record); `decode_s` is each frame's decode time, `latency_s` poll to acknowledgement."""
        for record in records:
            self.frames_in.labels(record.source_topic or "").inc()
            self.frame_latency.observe(latency_s)
            self.stage_seconds.labels("decode").observe(decode_s)
            for stage, ms in record.stage_ms.items():
                self.stage_seconds.labels(stage).observe(ms / 1000)
            if record.residual_faces:
                self.residual.labels("face").inc(record.residual_faces)
            if record.residual_plates:
                self.residual.labels("plate").inc(record.residual_plates)
            if record.outcome == "dropped":
                self.dead_letters.labels(record.reason or "unknown").inc()
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
            self.budget_exhausted.labels(record.stop_reason.removesuffix("_budget")).inc()


@dataclass
class AggregateWindow:
    """Delivered frame records between two aggregate records."""

    worker: str
    started: float = field(default_factory=time.time)
    records: list[FrameRecord] = field(default_factory=list)

    def add(self, records: Iterable[FrameRecord]) -> None:
        self.records.extend(records)

    def close(self, now: float | None = None) -> AggregateRecord:
        """The aggregate of the window (`stats.figures`, the one aggregate); the caller starts a new window."""
        now = time.time() if now is None else now
        return AggregateRecord(
            **figures(self.records, max(now - self.started, 1e-9)).model_dump(),
            worker=self.worker,
            window_start=datetime.fromtimestamp(self.started, UTC),
            window_end=datetime.fromtimestamp(now, UTC),
        )
