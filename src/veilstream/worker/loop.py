"""The Kafka worker's loop: poll -> decode -> runner (pipeline, records) -> Kafka sink flush -> commit.

At-least-once: a batch's offsets are committed only after every output of the batch (frames, dead letters,
records) is acknowledged (`KafkaSink.flush`). Exactly-once: the sink commits the offsets in the batch's
transaction. When the flush fails, the partitions are rewound to the batch's first offsets and the batch is
processed again after a backoff, so at-least-once duplicates are bounded by one batch; the sink dead-letters what
the broker refuses for good, or what fails `delivery_attempts` times. Rebalances happen only inside poll(), so a
revoke never finds work in flight. Prometheus counters and the aggregate window count delivered frames only.

Stopping (SIGTERM): no more polls; the batch in flight waits for its acknowledgements until the lifecycle's
deliveries deadline, nothing unacknowledged is committed, the clients close within the grace period, and the
exit code is 0 with a `worker_stopped` line naming the offsets a restart will reprocess. Readiness and its
reasons: readiness.py. Signals, the watchdog and HTTP are the lifecycle's (`lifecycle.py`, `service.py`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import structlog
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError

from veilstream.client_errors import last_client_problem, watch_client_problems
from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import DecodeLimits
from veilstream.pipeline import Pipeline
from veilstream.publishing.kafka_sink import DeliveryFailed, KafkaSink, KafkaTopics
from veilstream.runner import Runner
from veilstream.worker.client import KafkaClient, Message, TopicPartition, TransactionInDoubt
from veilstream.worker.health import Heartbeat
from veilstream.worker.kafka_python import KafkaPythonClient
from veilstream.worker.lifecycle import Lifecycle
from veilstream.worker.messages import source_item
from veilstream.worker.metrics import AggregateWindow, WorkerMetrics
from veilstream.worker.readiness import LoopView, Readiness, ReadinessMonitor, not_ready_reasons

log = structlog.get_logger("veilstream.worker")

EXIT_FENCED = 3  # another worker runs with this worker_id (exactly-once): a configuration error
EXIT_TRANSACTION_IN_DOUBT = 75  # a commit was not confirmed: restart, so that the committed offsets decide
EXIT_FAILED = 1  # a bug: the exception propagates after the clients are closed
_COMMIT_TIMEOUT_S = 10.0
_CLOSING_FLUSH_S = 2.0
_CONNECT_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class BatchReport:
    """One batch's way through the loop (time.perf_counter() instants), for observers such as benchmarks."""

    records: int
    started: float  # records handed over by poll
    decoded: float
    processed: float  # pipeline run, records made, outputs handed to the sink
    flushed: float  # every output acknowledged (exactly-once: the transaction committed), or the flush failed
    committed: float  # offsets committed (or, when not delivered, rewound)
    send_s: float  # inside the flush: producing
    wait_s: float  # inside the flush: waiting for acknowledgements
    delivered: bool


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _partition(message: Message) -> TopicPartition:
    return TopicPartition(message.topic, message.partition)


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
        self.exactly_once = self.settings.processing_guarantee == "exactly-once"
        self.limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
        self.heartbeat = Heartbeat(self.settings.liveness_timeout_s)
        self.readiness = Readiness(self.metrics.ready)
        self.window = AggregateWindow(self.worker_id)
        self.pipeline = pipeline
        self.client = client
        self.sink: KafkaSink | None = None
        self.runner: Runner | None = None
        self._lag_partitions: set[tuple[str, int]] = set()
        self._connect_error: str | None = None
        self._connect_cause: str | None = None
        self._polling_since: float | None = None
        self._delivery_error: str | None = None
        self._delivery_failed_at: float | None = None
        self._commit_failures = 0
        self._poll_failures = 0
        # Per partition: the first offset not known to be committed, and the offset after the last one read.
        self._uncommitted: dict[TopicPartition, tuple[int, int]] = {}

    # -- state the lifecycle asks about -----------------------------------------------------------

    def alive(self) -> bool:
        return self.heartbeat.alive()

    def ready(self) -> bool:
        return self.readiness.ready

    def not_ready_reasons(self) -> tuple[str, ...]:
        return self.readiness.reasons

    def refresh_readiness(self) -> None:
        """Judge readiness now (the monitor thread calls this twice a second)."""
        client, sink = self.client, self.sink
        state = client.state() if client is not None and sink is not None else None
        view = LoopView(
            stopping=self.lifecycle.stopping,
            connect_error=self._connect_error,
            polling_since=self._polling_since,
            waiting_since=sink.waiting_since if sink is not None else None,
            delivery_error=self._delivery_error,
            delivery_failed_at=self._delivery_failed_at,
        )
        partitions = state.partitions if state is not None else 0
        now = time.monotonic()
        self.readiness.update(not_ready_reasons(view, state, partitions > 0, self.settings.readiness_stall_s, now))

    def request_stop(self) -> None:
        self.lifecycle.request_stop()

    # -- the loop -----------------------------------------------------------------------------------

    def connect(self) -> KafkaClient | None:
        """Create the clients, again and again while the brokers cannot be reached (readiness says why, the
        loop stays alive: no crash loop); None when stopped first."""
        backoff = 1.0
        watch_client_problems(self.config.kafka.security_protocol)
        while self.client is None:
            self.heartbeat.beat()
            try:
                self.client = KafkaPythonClient.connect(
                    self.config.kafka, self.settings, self.config.pipeline.batch_size, self.worker_id
                )
            except (KafkaError, OSError) as error:
                cause = last_client_problem.last
                if self._connect_error is None or cause != self._connect_cause:  # one line per change of cause
                    log.warning("cannot_connect", error=_describe(error), cause=cause, retry_s=backoff)
                self._connect_cause = cause
                self._connect_error = _describe(error)
                if self.lifecycle.wait(backoff):
                    return None
                backoff = min(_CONNECT_BACKOFF_MAX_S, backoff * 2)
        if self._connect_error is not None:
            log.info("connected")
            self._connect_error = None
        s = self.settings
        topics = KafkaTopics(s.output_topic, s.metrics_topic, s.dlq_topic)
        self.sink = KafkaSink(
            self.client,
            topics,
            self.pipeline.encoder.content_type,
            s.delivery_timeout_ms / 1000,
            s.delivery_attempts,
            transactional=self.exactly_once,
            stop_deadline=self.lifecycle.deliveries_deadline,
        )
        self.runner = Runner(self.pipeline, [self.sink], self.config.pipeline.batch_size, self.worker_id)
        self.client.subscribe(s.input_topics, self)
        return self.client

    def run(self, max_batches: int | None = None) -> int:
        """Process until stopped (or `max_batches` delivered batches); returns the process exit code."""
        monitor = ReadinessMonitor(self.refresh_readiness).start()
        code = 0
        try:
            client = self.connect()
            batches = 0
            next_aggregate = time.monotonic() + self.settings.aggregate_interval_s
            next_lag = 0.0
            while client is not None and not self.lifecycle.stopping:
                if max_batches is not None and batches >= max_batches:
                    break
                self.heartbeat.beat()
                self.metrics.last_loop.set_to_current_time()
                now = time.monotonic()
                if now >= next_lag:
                    self._refresh_lag()
                    next_lag = now + self.settings.lag_interval_s
                if now >= next_aggregate:
                    self._queue_aggregate()
                    next_aggregate = now + self.settings.aggregate_interval_s
                if self._polling_since is None:
                    self._polling_since = time.monotonic()
                messages = self._poll(client)
                if messages:
                    self._polling_since = None
                    if self.process_batch(messages):
                        batches += 1
                elif self.sink is not None and self.sink.has_extras:
                    self._flush_aggregate()
        except ProducerFencedError as error:
            log.error("producer_fenced", error=_describe(error), worker=self.worker_id, exit_code=EXIT_FENCED)
            code = EXIT_FENCED
        except TransactionInDoubt as error:
            # Stopping or not, the outputs are safe: the transaction commits or aborts with its offsets.
            code = 0 if self.lifecycle.stopping else EXIT_TRANSACTION_IN_DOUBT
            log.error("transaction_in_doubt", error=_describe(error), exit_code=code)
        except BaseException as error:
            code = EXIT_FAILED
            log.error("worker_failed", error=_describe(error), exit_code=code)
            raise
        finally:
            monitor.stop()
            self._close(code)
        return code

    def _poll(self, client: KafkaClient) -> Sequence[Message]:
        """The next records; none while the brokers cannot be reached (kafka-python raises from poll when it
        cannot even look the coordinator up): readiness says so, and the loop keeps turning."""
        try:
            messages = client.poll(self.settings.batch_timeout_ms, self.config.pipeline.batch_size)
        except KafkaError as error:
            self._poll_failures += 1
            if self._poll_failures == 1:
                log.warning("polls_failing", error=_describe(error))
            self.lifecycle.wait(self.settings.batch_timeout_ms / 1000)
            return []
        if self._poll_failures:
            log.info("polls_recovered", failed_polls=self._poll_failures)
            self._poll_failures = 0
        return messages

    def process_batch(self, messages: Sequence[Message]) -> bool:
        """Decode, process, deliver and commit one batch; False when it was rewound to be processed again."""
        assert self.client is not None and self.sink is not None and self.runner is not None
        started = time.perf_counter()
        for message in messages:
            tp = _partition(message)
            first, end = self._uncommitted.get(tp, (message.offset, message.offset))
            self._uncommitted[tp] = (min(first, message.offset), max(end, message.offset + 1))
        items = [source_item(m, self.limits, self.settings.max_frame_bytes, started) for m in messages]
        decoded = time.perf_counter()
        self.runner.process(items)
        processed = time.perf_counter()
        try:
            self.sink.flush()
        except DeliveryFailed as error:
            flushed = time.perf_counter()
            self._delivery_error = str(error)[:300]
            self._delivery_failed_at = time.monotonic()
            self._rewind(messages, str(error))
            self._report(len(messages), (started, decoded, processed, flushed, time.perf_counter()), False)
            return False
        flushed = time.perf_counter()
        self._delivery_error = None
        delivered = self.sink.delivered
        self.metrics.count(delivered, (decoded - started) / len(messages), flushed - started)
        self.window.add(delivered)
        offsets = self._next_offsets(messages)
        if self.exactly_once:
            self._committed(offsets)  # in the transaction the sink committed
        else:
            self._commit(offsets)
        self._report(len(messages), (started, decoded, processed, flushed, time.perf_counter()), True)
        return True

    def _report(self, records: int, instants: tuple[float, float, float, float, float], delivered: bool) -> None:
        if self.observer is not None:
            assert self.sink is not None
            timings = self.sink.timings
            self.observer(BatchReport(records, *instants, timings.send_s, timings.wait_s, delivered))

    @staticmethod
    def _next_offsets(messages: Sequence[Message]) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = {}
        for message in messages:
            tp = _partition(message)
            offsets[tp] = max(message.offset + 1, offsets.get(tp, 0))
        return offsets

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.client is not None
        deadline = self.lifecycle.close_deadline()
        timeout = _COMMIT_TIMEOUT_S if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            self.client.commit(offsets, min(timeout, _COMMIT_TIMEOUT_S))
        except CommitFailedError as error:
            # The group moved on (rebalance): the new owner reprocesses this batch; duplicates stay within it.
            log.warning("commit_failed_after_rebalance", error=_describe(error))
            return
        except KafkaError as error:
            # Coordinator unreachable: the outputs are safe; the next commit covers these offsets, or the batch is
            # redelivered after a restart (duplicates within the uncommitted batches). Logged once per episode.
            self._commit_failures += 1
            if self._commit_failures == 1:
                log.warning("commits_failing", error=_describe(error))
            return
        if self._commit_failures:
            log.info("commits_recovered", failed_commits=self._commit_failures)
            self._commit_failures = 0
        self._committed(offsets)

    def _committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            first, end = self._uncommitted.get(tp, (offset, offset))
            if offset >= end:
                self._uncommitted.pop(tp, None)
            else:
                self._uncommitted[tp] = (max(first, offset), end)

    def _rewind(self, messages: Sequence[Message], why: str) -> None:
        """Seek back to the first offset of the batch in each partition still ours, then wait before retrying
        (stopping: neither, the batch is left to whoever reads these partitions next)."""
        assert self.client is not None
        self.metrics.redeliveries.inc()
        log.warning("batch_retry", reason=why[:300], frames=len(messages), stopping=self.lifecycle.stopping or None)
        if self.lifecycle.stopping:
            return
        first: dict[TopicPartition, int] = {}
        for message in messages:
            tp = _partition(message)
            first[tp] = min(first.get(tp, message.offset), message.offset)
        assigned = self.client.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.client.seek(tp, offset)
        self.lifecycle.wait(self.settings.retry_backoff_s)

    def _close(self, code: int) -> None:
        log.info("worker_stopping", worker=self.worker_id)
        self.readiness.update(["stopping"])
        if self.client is not None and self.sink is not None and self._delivery_error is None:
            # The aggregate, unless the brokers were just failing (a Kafka outage must not hold the exit up).
            self._queue_aggregate()
            try:
                self.sink.flush(timeout_s=_CLOSING_FLUSH_S)  # the aggregate: briefly, it is no frame
            except (DeliveryFailed, TransactionInDoubt, KafkaError) as error:
                log.warning("final_aggregate_not_delivered", error=_describe(error))
        # Before the close: leaving the group revokes the partitions, which forgets them.
        reprocess = {
            f"{tp.topic}:{tp.partition}": f"{first}-{end - 1}" for tp, (first, end) in self._uncommitted.items()
        }
        if self.client is not None:
            deadline = self.lifecycle.close_deadline()
            timeout = 10.0 if deadline is None else max(0.5, deadline - time.monotonic())
            try:
                self.client.close(timeout)
            except KafkaError as error:
                log.warning("close_failed", error=_describe(error))
        log.info(
            "worker_stopped",
            worker=self.worker_id,
            exit_code=code,
            reprocessed_on_restart=reprocess or None,
            note="offsets read but not committed: whoever reads these partitions next processes them again"
            if reprocess
            else None,
        )
        self.lifecycle.finished()

    # -- rebalances (called by the client inside poll) ----------------------------------------------

    def on_revoked(self, partitions: Collection[TopicPartition]) -> None:
        # Nothing is in flight here: batches are committed before the next poll, where rebalances happen.
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))
        for tp in partitions:
            self.forget_lag(tp)
            self._uncommitted.pop(tp, None)
        if self.sink is not None:
            self.sink.forget(partitions)
        if self.pipeline.memory is not None:  # these cameras' frames now go to another worker
            self.pipeline.memory.forget_partitions([(tp.topic, tp.partition) for tp in partitions])

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
        for tp, lag in self.client.lag(self.client.assignment()).items():
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
            self._lag_partitions.add((tp.topic, tp.partition))

    def _flush_aggregate(self) -> None:
        """An idle worker still publishes its aggregate on time (a busy one sends it with the next batch)."""
        assert self.sink is not None
        try:
            self.sink.flush(timeout_s=_CLOSING_FLUSH_S)
        except (DeliveryFailed, KafkaError) as error:  # an aggregate is no frame: nothing to rewind
            log.warning("aggregate_not_delivered", error=_describe(error))

    def _queue_aggregate(self) -> None:
        """The aggregate of the delivered frames since the last one (sent with the next batch's outputs)."""
        if self.sink is None or not self.window.records:
            return
        aggregate = self.window.close()
        self.window = AggregateWindow(self.worker_id)
        self.sink.add_extra(self.settings.metrics_topic, aggregate.model_dump_json().encode(), b"aggregate")
