"""The Kafka worker: consume frames, run the shared pipeline, publish frames, metrics and dead letters.

At-least-once: a batch's offsets are committed only after every output of the batch (frames, metrics, dead
letters) is acknowledged by the broker. If any output fails, the partitions are rewound to the batch's first
offsets and the batch is processed again, so duplicates are bounded by one batch. Offsets are committed
synchronously after each batch and rebalances happen only inside poll(), so a revoke never finds uncommitted
work. Fail-closed: a frame is published only as the pipeline's anonymized bytes; anything else goes to the
dead-letter topic with its reason.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from veilstream.decoding.images import DecodeLimits
from veilstream.publishing.encoding import encode_frame
from veilstream.config import VeilstreamConfig
from veilstream.errors import FrameError, StageError
from veilstream.pipeline import FrameOutcome, Pipeline
from veilstream.schemas import AggregateMetrics
from veilstream.worker.health import HealthServer, Heartbeat
from veilstream.worker.messages import (
    InputFrame,
    Lineage,
    dead_letter_headers,
    frame_metrics,
    output_headers,
    parse_record,
    to_json,
)
from veilstream.worker.metrics import AggregateWindow, WorkerMetrics

log = structlog.get_logger("veilstream.worker")


class DeliveryFailed(Exception):
    """Some output of a batch was not acknowledged; the batch must be processed again."""


@dataclass
class _Pending:
    """A produced message awaiting acknowledgement."""

    future: Any
    kind: str


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        # Nothing is in flight here: batches are committed before the next poll, where rebalances happen.
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))
        for tp in revoked:
            self.worker.forget_lag(tp)

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))


class Worker:
    def __init__(
        self,
        config: VeilstreamConfig,
        pipeline: Pipeline,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.config = config
        self.settings = config.worker
        self.pipeline = pipeline
        self.metrics = metrics or WorkerMetrics()
        self.worker_id = self.settings.worker_id or socket.gethostname()
        self.limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
        self.heartbeat = Heartbeat(self.settings.liveness_timeout_s)
        self.window = AggregateWindow(self.worker_id)
        self._stop = threading.Event()
        self._signals = 0
        self._broker_seen = 0.0
        self._lag_partitions: set[tuple[str, int]] = set()
        self._watchdog: threading.Timer | None = None
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.http: HealthServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second_signal_exit_now", signal=signum)
            os._exit(128 + signum)
        log.info("shutdown_requested", signal=signum)
        self.request_stop()

    def request_stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        # Past the bound, exit without committing: the batch in flight is redelivered (at-least-once).
        self._watchdog = threading.Timer(self.settings.shutdown_timeout_s, self._shutdown_overrun)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _shutdown_overrun(self) -> None:
        log.error("shutdown_timeout_exceeded", seconds=self.settings.shutdown_timeout_s)
        os._exit(70)

    def alive(self) -> bool:
        return self.heartbeat.alive()

    def ready(self) -> bool:
        return (
            not self._stop.is_set()
            and self.consumer is not None
            and time.monotonic() - self._broker_seen < 3 * self.settings.lag_interval_s + 5
        )

    def connect(self) -> None:
        kafka = self.config.kafka.client_options()
        s = self.settings
        self.consumer = KafkaConsumer(
            **kafka,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.batch_size,
            max_poll_interval_ms=s.max_poll_interval_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            fetch_max_bytes=max(52_428_800, s.max_message_bytes),
            max_partition_fetch_bytes=s.max_message_bytes,
        )
        self.consumer.subscribe(list(s.input_topics), listener=_Rebalance(self))
        self.producer = KafkaProducer(
            **kafka,
            acks="all",
            linger_ms=5,
            max_request_size=s.max_message_bytes,
            delivery_timeout_ms=s.delivery_timeout_ms,
            request_timeout_ms=min(30_000, s.delivery_timeout_ms // 2),
        )

    def run(self, max_batches: int | None = None) -> int:
        """Process until stopped (or `max_batches`); returns the process exit code."""
        if self.consumer is None:
            self.connect()
        assert self.consumer is not None and self.producer is not None
        self.http = HealthServer(self.settings.http_host, self.settings.http_port, self.metrics, self.alive, self.ready)
        self.http.start()
        log.info(
            "worker_started", worker=self.worker_id, http_port=self.http.port, topics=list(self.settings.input_topics)
        )
        batches = 0
        next_aggregate = time.monotonic() + self.settings.aggregate_interval_s
        next_lag = 0.0
        try:
            while not self._stop.is_set() and (max_batches is None or batches < max_batches):
                self.heartbeat.beat()
                self.metrics.last_loop.set_to_current_time()
                now = time.monotonic()
                if now >= next_lag:
                    self._refresh_lag()
                    next_lag = now + self.settings.lag_interval_s
                if now >= next_aggregate:
                    self._publish_aggregate()
                    next_aggregate = now + self.settings.aggregate_interval_s
                polled = self.consumer.poll(
                    timeout_ms=self.settings.batch_timeout_ms, max_records=self.settings.batch_size
                )
                records = [r for tp in sorted(polled, key=lambda t: (t.topic, t.partition)) for r in polled[tp]]
                if not records:
                    continue
                try:
                    self.process_batch(records)
                    batches += 1
                except DeliveryFailed as error:
                    self._rewind(records, str(error))
        finally:
            self._close()
        return 0

    def _close(self) -> None:
        log.info("worker_stopping", worker=self.worker_id)
        self.metrics.ready.set(0)
        if self.producer is not None:
            try:
                self._publish_aggregate()
                self.producer.flush(timeout=min(10.0, self.settings.shutdown_timeout_s / 2))
            except KafkaError as error:
                log.warning("final_flush_failed", error=str(error))
            self.producer.close(timeout=5)
        if self.consumer is not None:
            self.consumer.close(autocommit=False)  # leaves the group: partitions move at once
        if self.http is not None:
            self.http.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()  # stopped within the bound: a host process may go on
        log.info("worker_stopped", worker=self.worker_id)

    # -- one batch ---------------------------------------------------------------------------------

    def process_batch(self, records: Sequence[Any]) -> None:
        """Process, publish, wait for every acknowledgement, then commit."""
        assert self.consumer is not None and self.producer is not None
        polled_at = time.perf_counter()
        pending: list[_Pending] = []
        items: list[InputFrame] = []
        for record in records:
            lineage = Lineage(record.topic, record.partition, record.offset, record.key)
            self.metrics.frames_in.labels(record.topic).inc()
            headers = list(record.headers or [])
            try:
                parsed, frame = parse_record(record.value, headers, lineage, self.limits, self.settings.max_frame_bytes)
            except FrameError as error:
                pending.append(self._dead_letter(lineage, record.value, headers, error, _camera(headers, record.key)))
                continue
            items.append(InputFrame(lineage, parsed, frame, record.value, polled_at))
        decoded_at = time.perf_counter()
        outcomes = self._run_pipeline(items)
        for item, outcome in zip(items, outcomes, strict=True):
            pending.extend(self._publish(item, outcome, decoded_at - polled_at))
        self._await(pending)
        acked = time.perf_counter()
        for item in items:
            self.metrics.frame_latency.observe(acked - item.polled_at)
        self._commit(records)

    def _run_pipeline(self, items: Sequence[InputFrame]) -> list[FrameOutcome]:
        if not items:
            return []
        try:
            return self.pipeline.process([i.frame for i in items])
        except Exception as error:  # the pipeline isolates frames; this is a bug or an OOM: fail closed
            log.exception("pipeline_failed")
            failure = StageError("pipeline_failed", f"{type(error).__name__}: {error}")
            return [FrameOutcome(None, None, failure, None, {}) for _ in items]

    def _publish(self, item: InputFrame, outcome: FrameOutcome, decode_s: float) -> list[_Pending]:
        assert self.producer is not None
        s = self.settings
        result = outcome.correction
        if outcome.error is not None or result is None or outcome.published is None or outcome.found is None:
            error = outcome.error or StageError("no_output", "the pipeline produced no frame")
            return [self._dead_letter(item.lineage, item.raw, [], error, item.headers.camera_id)]
        published = outcome.published
        if outcome.residual:
            for detection in outcome.residual:
                self.metrics.residual.labels(detection.kind).inc()
            log.warning(
                "residual_detection",
                camera=item.headers.camera_id,
                count=len(outcome.residual),
                **item.lineage.fields(),
            )
            if s.residual_action == "drop":
                error = StageError("residual_detection", f"{len(outcome.residual)} anonymized object(s) found again")
                return [self._dead_letter(item.lineage, item.raw, [], error, item.headers.camera_id)]
            if s.residual_action == "mask_frame":
                published = encode_frame(
                    np.full_like(item.frame, 128), self.config.publish.codec, self.config.publish.quality
                )
        flagged = bool(outcome.residual) or not result.consistent
        headers = output_headers(item, outcome, self.config.publish.codec, flagged)
        latency_ms = (time.perf_counter() - item.polled_at) * 1000
        metrics = frame_metrics(item, outcome, self.worker_id, latency_ms)
        self._observe(outcome, decode_s)
        self.window.add(metrics)
        key = item.lineage.key or item.headers.camera_id.encode()
        return [
            _Pending(self.producer.send(s.output_topic, value=published, key=key, headers=headers), "frame"),
            _Pending(self.producer.send(s.metrics_topic, value=to_json(metrics), key=key), "metrics"),
        ]

    def _observe(self, outcome: FrameOutcome, decode_s: float) -> None:
        result = outcome.correction
        assert result is not None
        m = self.metrics
        m.frames_out.inc()
        m.stage_seconds.labels("decode").observe(decode_s)
        for stage, ms in outcome.timings_ms.items():
            m.stage_seconds.labels(stage).observe(ms / 1000)
        m.iterations.observe(result.iterations)
        if result.naive_changed:
            m.naive_changes.inc()
        if not result.consistent:
            m.final_changes.inc()
        if result.budget_exhausted:
            m.budget_exhausted.labels(result.stop_reason.removesuffix("_budget")).inc()

    def _dead_letter(
        self,
        lineage: Lineage,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        error: FrameError,
        camera: str | None,
    ) -> _Pending:
        assert self.producer is not None
        self.metrics.dead_letters.labels(error.reason).inc()
        self.window.dead_letters += 1
        log.warning("dead_letter", reason=error.reason, detail=error.detail[:200], camera=camera, **lineage.fields())
        future = self.producer.send(
            self.settings.dlq_topic,
            value=value or b"",
            key=lineage.key,
            headers=dead_letter_headers(lineage, error, headers, camera),
        )
        return _Pending(future, "dead_letter")

    def _await(self, pending: Sequence[_Pending]) -> None:
        assert self.producer is not None
        try:
            self.producer.flush(timeout=self.settings.delivery_timeout_ms / 1000)
        except KafkaError as error:
            raise DeliveryFailed(f"flush failed: {error}") from error
        failed = [p for p in pending if not p.future.succeeded()]
        if failed:
            first = failed[0].future.exception
            raise DeliveryFailed(
                f"{len(failed)} of {len(pending)} outputs not acknowledged, e.g. {failed[0].kind}: {first}"
            )

    def _commit(self, records: Sequence[Any]) -> None:
        assert self.consumer is not None
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = OffsetAndMetadata(max(record.offset + 1, offsets[tp].offset if tp in offsets else 0), "", -1)
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as error:
            # The group moved on (rebalance): the new owner reprocesses this batch; duplicates stay within it.
            log.warning("commit_failed_after_rebalance", error=str(error))
        except KafkaError as error:
            # Coordinator unreachable: the outputs are safe; the next commit covers these offsets, or the batch is
            # redelivered after a restart (duplicates within one batch).
            log.warning("commit_failed", error=str(error))

    def _rewind(self, records: Sequence[Any], why: str) -> None:
        """Seek back to the first offset of the batch in each partition, then wait before trying again."""
        assert self.consumer is not None
        self.metrics.redeliveries.inc()
        log.warning("batch_retry", reason=why, frames=len(records))
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
        self._stop.wait(self.settings.retry_backoff_s)

    # -- periodic ----------------------------------------------------------------------------------

    def forget_lag(self, tp: TopicPartition) -> None:
        """A revoked partition's lag is another worker's to report."""
        if (tp.topic, tp.partition) in self._lag_partitions:
            self._lag_partitions.discard((tp.topic, tp.partition))
            self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def _refresh_lag(self) -> None:
        assert self.consumer is not None
        assigned = list(self.consumer.assignment())
        try:
            if assigned:
                ends = self.consumer.end_offsets(assigned, timeout_ms=5000)
                for tp in assigned:
                    position = self.consumer.position(tp, timeout_ms=5000)
                    self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, ends[tp] - position))
                    self._lag_partitions.add((tp.topic, tp.partition))
            else:
                self.consumer.topics()
        except KafkaError as error:
            log.warning("broker_unreachable", error=str(error))
            self.metrics.ready.set(0)
            return
        self._broker_seen = time.monotonic()
        self.metrics.ready.set(1)

    def _publish_aggregate(self) -> None:
        if self.producer is None or (not self.window.frames and not self.window.dead_letters):
            return
        aggregate: AggregateMetrics = self.window.close()
        self.window = AggregateWindow(self.worker_id)
        self.producer.send(self.settings.metrics_topic, value=to_json(aggregate), key=b"aggregate")


def _camera(headers: list[tuple[str, bytes]], key: bytes | None) -> str | None:
    for name, value in headers:
        if name == "camera-id" and value:
            return value.decode("utf-8", "replace")
    return key.decode("utf-8", "replace") if key else None


def run_worker(config: VeilstreamConfig, build: Callable[[VeilstreamConfig], Pipeline]) -> int:
    """The `veilstream worker` entry point: load models, connect, process until signalled."""
    from veilstream.config import check_budgets

    check_budgets(config)
    worker = Worker(config, build(config))
    worker.install_signal_handlers()
    return worker.run()
