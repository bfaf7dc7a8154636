"""Prometheus metrics of one worker, and the periodic aggregate record for the metrics topic."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from veilstream.schemas import AggregateMetrics, FrameMetrics
from veilstream.stats import mean, percentile

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITERATION_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


class WorkerMetrics:
    """Every Prometheus series the worker exports, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("veilstream_frames_in", "Frames consumed", ["topic"], registry=r)
        self.frames_out = Counter("veilstream_frames_out", "Anonymized frames published", registry=r)
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
        self.ready = Gauge("veilstream_ready", "1 when models are loaded and the broker reachable", registry=r)
        self.last_loop = Gauge("veilstream_last_loop_timestamp_seconds", "When the main loop last turned", registry=r)


@dataclass
class AggregateWindow:
    """Frame records accumulated between two aggregate records."""

    worker: str
    started: float = field(default_factory=time.time)
    frames: list[FrameMetrics] = field(default_factory=list)
    dead_letters: int = 0

    def add(self, record: FrameMetrics) -> None:
        self.frames.append(record)

    def close(self, now: float | None = None) -> AggregateMetrics:
        """The aggregate of the window; the caller starts a new one."""
        now = time.time() if now is None else now
        stepped = [float(f.iterations) for f in self.frames if f.iterations > 0]
        latencies = [f.latency_ms for f in self.frames]
        labelled = [f for f in self.frames if f.ground_truth is not None]

        def accuracy(pick: str) -> float | None:
            if not labelled:
                return None
            hits = sum(1 for f in labelled if getattr(f, pick)[0].label == f.ground_truth)
            return hits / len(labelled)

        def optional(value: float) -> float | None:
            return None if math.isnan(value) else value

        elapsed = max(now - self.started, 1e-9)
        return AggregateMetrics(
            worker=self.worker,
            window_start=datetime.fromtimestamp(self.started, UTC),
            window_end=datetime.fromtimestamp(now, UTC),
            frames=len(self.frames),
            dead_letters=self.dead_letters,
            naive_changed=sum(f.naive_changed for f in self.frames),
            final_changed=sum(not f.consistent for f in self.frames),
            budget_exhausted=sum(f.budget_exhausted for f in self.frames),
            residual_detections=sum(f.residual_faces + f.residual_plates for f in self.frames),
            mean_iterations=optional(mean(stepped)),
            p95_iterations=optional(percentile(stepped, 95)),
            p50_latency_ms=optional(percentile(latencies, 50)),
            p95_latency_ms=optional(percentile(latencies, 95)),
            frames_per_second=len(self.frames) / elapsed,
            labelled_frames=len(labelled),
            accuracy_original=accuracy("original"),
            accuracy_published=accuracy("final"),
        )
