"""The Kafka worker's loop: poll -> decode -> runner (pipeline, records) -> Kafka sink flush -> commit.

At-least-once: a batch's offsets are committed only after every output of the batch (frames, dead letters,
records) is acknowledged (`KafkaSink.flush`). When the flush fails, the partitions are rewound to the batch's first
offsets and the batch is processed again after a backoff, so duplicates are bounded by one batch; the sink
dead-letters what the broker refuses for good, or what fails `delivery_attempts` times. Offsets are committed
synchronously after each batch and rebalances happen only inside poll(), so a revoke never finds uncommitted
work. Prometheus counters and the aggregate window count delivered frames only. Signals, the watchdog and HTTP
are the lifecycle's (`lifecycle.py`, `service.py`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import structlog
from kafka.errors import CommitFailedError, KafkaError

from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import DecodeLimits
from veilstream.pipeline import Pipeline
from veilstream.publishing.kafka_sink import DeliveryFailed, KafkaSink, KafkaTopics
from veilstream.runner import Runner
from veilstream.worker.client import KafkaClient, KafkaPythonClient, Message, TopicPartition
from veilstream.worker.health import Heartbeat
from veilstream.worker.lifecycle import Lifecycle
from veilstream.worker.messages import source_item
from veilstream.worker.metrics import AggregateWindow, WorkerMetrics

log = structlog.get_logger("veilstream.worker")


@dataclass(frozen=True)
class BatchReport:
    """One batch's way through the loop (time.perf_counter() instants), for observers such as benchmarks."""

    records: int
    started: float  # records handed over by poll
    decoded: float
    processed: float  # pipeline run, records made, outputs handed to the sink
    flushed: float  # every output acknowledged, or the flush failed
    committed: float  # offsets committed (or, when not delivered, rewound)
    send_s: float  # inside the flush: producing
    wait_s: float  # inside the flush: waiting for acknowledgements
    delivered: bool


class Worker:
    def __init__(
        self,
        config: VeilstreamConfig,
        pipeline: Pipeline,
        client: KafkaClient | None = None,
        metrics: WorkerMetrics | None = None,
        lifecycle: Lifecycle | None = None,
        observer: Callable[[BatchReport], None] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.worker
        self.metrics = metrics or WorkerMetrics()
        self.lifecycle = lifecycle or Lifecycle(self.settings.shutdown_timeout_s)
        self.observer = observer
        self.worker_id = self.settings.worker_id or socket.gethostname()
        self.limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
        self.heartbeat = Heartbeat(self.settings.liveness_timeout_s)
        self.window = AggregateWindow(self.worker_id)
        self.pipeline = pipeline
        self.client = client
        self.sink: KafkaSink | None = None
        self.runner: Runner | None = None
        self._broker_seen = 0.0
        self._lag_partitions: set[tuple[str, int]] = set()

    # -- state the lifecycle asks about -----------------------------------------------------------

    def alive(self) -> bool:
        return self.heartbeat.alive()

    def ready(self) -> bool:
        return (
            not self.lifecycle.stopping
            and self.client is not None
            and time.monotonic() - self._broker_seen < 3 * self.settings.lag_interval_s + 5
        )

    def request_stop(self) -> None:
        self.lifecycle.request_stop()

    # -- the loop -----------------------------------------------------------------------------------

    def connect(self) -> KafkaClient:
        if self.client is None:
            self.client = KafkaPythonClient.connect(self.config.kafka, self.settings, self.config.pipeline.batch_size)
        s = self.settings
        topics = KafkaTopics(s.output_topic, s.metrics_topic, s.dlq_topic)
        timeout_s = s.delivery_timeout_ms / 1000
        self.sink = KafkaSink(self.client, topics, self.pipeline.encoder.content_type, timeout_s, s.delivery_attempts)
        self.runner = Runner(self.pipeline, [self.sink], self.config.pipeline.batch_size, self.worker_id)
        self.client.subscribe(s.input_topics, self)
        return self.client

    def run(self, max_batches: int | None = None) -> int:
        """Process until stopped (or `max_batches` delivered batches); returns the process exit code."""
        client = self.connect()
        batches = 0
        next_aggregate = time.monotonic() + self.settings.aggregate_interval_s
        next_lag = 0.0
        try:
            while not self.lifecycle.stopping and (max_batches is None or batches < max_batches):
                self.heartbeat.beat()
                self.metrics.last_loop.set_to_current_time()
                now = time.monotonic()
                if now >= next_lag:
                    self._refresh_lag()
                    next_lag = now + self.settings.lag_interval_s
                if now >= next_aggregate:
                    self._publish_aggregate()
                    next_aggregate = now + self.settings.aggregate_interval_s
                messages = client.poll(self.settings.batch_timeout_ms, self.config.pipeline.batch_size)
                if messages and self.process_batch(messages):
                    batches += 1
        finally:
            self._close()
        return 0

    def process_batch(self, messages: Sequence[Message]) -> bool:
        """Decode, process, deliver and commit one batch; False when it was rewound to be processed again."""
        assert self.client is not None and self.sink is not None and self.runner is not None
        started = time.perf_counter()
        items = [source_item(m, self.limits, self.settings.max_frame_bytes, started) for m in messages]
        decoded = time.perf_counter()
        self.runner.process(items)
        processed = time.perf_counter()
        try:
            self.sink.flush()
        except DeliveryFailed as error:
            flushed = time.perf_counter()
            self._rewind(messages, str(error))
            self._report(len(messages), (started, decoded, processed, flushed, time.perf_counter()), False)
            return False
        flushed = time.perf_counter()
        delivered = self.sink.delivered
        self.metrics.count(delivered, (decoded - started) / len(messages), flushed - started)
        self.window.add(delivered)
        self._commit(messages)
        self._report(len(messages), (started, decoded, processed, flushed, time.perf_counter()), True)
        return True

    def _report(self, records: int, instants: tuple[float, float, float, float, float], delivered: bool) -> None:
        if self.observer is not None:
            assert self.sink is not None
            timings = self.sink.timings
            self.observer(BatchReport(records, *instants, timings.send_s, timings.wait_s, delivered))

    def _commit(self, messages: Sequence[Message]) -> None:
        assert self.client is not None
        offsets: dict[TopicPartition, int] = {}
        for message in messages:
            tp = TopicPartition(message.topic, message.partition)
            offsets[tp] = max(message.offset + 1, offsets.get(tp, 0))
        try:
            self.client.commit(offsets)
        except CommitFailedError as error:
            # The group moved on (rebalance): the new owner reprocesses this batch; duplicates stay within it.
            log.warning("commit_failed_after_rebalance", error=str(error))
        except KafkaError as error:
            # Coordinator unreachable: the outputs are safe; the next commit covers these offsets, or the batch is
            # redelivered after a restart (duplicates within one batch).
            log.warning("commit_failed", error=str(error))

    def _rewind(self, messages: Sequence[Message], why: str) -> None:
        """Seek back to the first offset of the batch in each partition still ours, then wait before retrying."""
        assert self.client is not None
        self.metrics.redeliveries.inc()
        log.warning("batch_retry", reason=why, frames=len(messages))
        first: dict[TopicPartition, int] = {}
        for message in messages:
            tp = TopicPartition(message.topic, message.partition)
            first[tp] = min(first.get(tp, message.offset), message.offset)
        assigned = self.client.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.client.seek(tp, offset)
        self.lifecycle.wait(self.settings.retry_backoff_s)

    def _close(self) -> None:
        log.info("worker_stopping", worker=self.worker_id)
        self.metrics.ready.set(0)
        if self.client is not None:
            self._publish_aggregate()
            self.client.close(flush_timeout_s=min(10.0, self.settings.shutdown_timeout_s / 2))
        self.lifecycle.finished()
        log.info("worker_stopped", worker=self.worker_id)

    # -- rebalances (called by the client inside poll) ----------------------------------------------

    def on_revoked(self, partitions: Collection[TopicPartition]) -> None:
        # Nothing is in flight here: batches are committed before the next poll, where rebalances happen.
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))
        for tp in partitions:
            self.forget_lag(tp)
        if self.sink is not None:
            self.sink.forget(partitions)

    def on_assigned(self, partitions: Collection[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))

    # -- periodic -----------------------------------------------------------------------------------

    def forget_lag(self, tp: TopicPartition) -> None:
        """A revoked partition's lag is another worker's to report."""
        if (tp.topic, tp.partition) in self._lag_partitions:
            self._lag_partitions.discard((tp.topic, tp.partition))
            self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def _refresh_lag(self) -> None:
        assert self.client is not None
        assigned = self.client.assignment()
        try:
            if assigned:
                for tp, lag in self.client.lag(assigned).items():
                    self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
                    self._lag_partitions.add((tp.topic, tp.partition))
            else:
                self.client.ping()
        except KafkaError as error:
            log.warning("broker_unreachable", error=str(error))
            self.metrics.ready.set(0)
            return
        self._broker_seen = time.monotonic()
        self.metrics.ready.set(1)

    def _publish_aggregate(self) -> None:
        """The aggregate of the delivered frames since the last one (sent with the next batch's outputs)."""
        if self.client is None or not self.window.records:
            return
        aggregate = self.window.close()
        self.window = AggregateWindow(self.worker_id)
        self.client.send(self.settings.metrics_topic, aggregate.model_dump_json().encode(), b"aggregate", [])
