"""The Kafka worker's loop: poll -> decode -> runner (pipeline, records) -> Kafka sink flush -> commit.

At-least-once: a batch's offsets are committed only after every output of the batch (frames, dead letters,
records) is acknowledged (`KafkaSink.flush`). Exactly-once: the sink commits the offsets in the batch's
transaction. When the flush fails, the partitions are rewound to the batch's first offsets and the batch is
processed again after a backoff, so at-least-once duplicates are bounded by one batch; the sink dead-letters what
the broker refuses for good, or what fails `delivery_attempts` times. Prometheus counters and the aggregate window
count delivered frames only.

Overlap (`pipeline.overlap`): batch n+1 is polled and prepared in the background while batch n is completed,
delivered and committed; a rewind of batch n or a revoke of its partitions drops batch n+1 (batches.py).

Stopping (SIGTERM): no more polls; what was polled is processed (with overlap, the batch ahead too) and waits for
its acknowledgements until the lifecycle's deliveries deadline, nothing unacknowledged is committed, the clients
close within the grace period, and the exit code is 0 with a `worker_stopped` line naming the offsets a restart
will reprocess. Readiness: readiness.py. Signals, the watchdog and HTTP: `lifecycle.py`, `service.py`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection, Sequence

import structlog
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError

from veilstream.client_errors import last_client_problem, watch_client_problems
from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import DecodeLimits
from veilstream.pipeline import Pipeline
from veilstream.publishing.kafka_sink import DeliveryFailed, KafkaSink, KafkaTopics
from veilstream.runner import PreparedBatch, Runner
from veilstream.worker.batches import BatchAhead, BatchReport, Polled, next_offsets, note_read, seek_back
from veilstream.worker.client import KafkaClient, Message, TopicPartition, TransactionInDoubt
from veilstream.worker.health import Heartbeat
from veilstream.worker.kafka_python import KafkaPythonClient
from veilstream.worker.lifecycle import Lifecycle
from veilstream.worker.messages import source_item
from veilstream.worker.metrics import AggregateWindow, WorkerMetrics
from veilstream.worker.readiness import LoopView, Readiness, ReadinessMonitor, not_ready_reasons

__all__ = ["EXIT_FAILED", "EXIT_FENCED", "EXIT_TRANSACTION_IN_DOUBT", "BatchReport", "Worker"]
log = structlog.get_logger("veilstream.worker")

EXIT_FENCED = 3  # another worker runs with this worker_id (exactly-once): a configuration error
EXIT_TRANSACTION_IN_DOUBT = 75  # a commit was not confirmed: restart, so that the committed offsets decide
EXIT_FAILED = 1  # a bug: the exception propagates after the clients are closed
_COMMIT_TIMEOUT_S = 10.0
_CLOSING_FLUSH_S = 2.0
_CONNECT_BACKOFF_MAX_S = 30.0


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


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
        self._ahead: BatchAhead | None = None  # with overlap: the batch prepared while the one before completes
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

    def holds_batch_ahead(self) -> bool:
        """With overlap: a batch is polled and being prepared, or prepared, and not yet delivered."""
        return self._ahead is not None and self._ahead.held

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
        size, overlap = self.config.pipeline.batch_size, self.config.pipeline.overlap
        self.runner = Runner(self.pipeline, [self.sink], size, self.worker_id, overlap=overlap)
        self._ahead = BatchAhead(self.runner) if self.runner.overlap else None
        self.client.subscribe(s.input_topics, self)
        return self.client

    def run(self, max_batches: int | None = None) -> int:
        """Process until stopped (or `max_batches` delivered batches: a batch prepared ahead is then left
        uncommitted); returns the process exit code."""
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
                if self._polling_since is None and not self.holds_batch_ahead():  # holding one, it is busy
                    self._polling_since = time.monotonic()
                messages = self._poll(client)
                if messages:
                    self._polling_since = None
                delivered = self.process_batch(messages)
                if delivered:
                    batches += 1
                elif delivered is None and not messages and self.sink is not None and self.sink.has_extras:
                    self._flush_aggregate()
            if self.lifecycle.stopping and self._ahead is not None and self._ahead.held:
                self._deliver(*self._ahead.take())  # polled before the stop: processed like any batch in flight
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
        cannot even look the coordinator up): readiness says so, and the loop keeps turning. While a batch is
        prepared ahead, no longer than its prepare should still take: no batch waits for a poll."""
        timeout_ms = self.settings.batch_timeout_ms
        if self._ahead is not None and self._ahead.held:
            timeout_ms = min(timeout_ms, int(self._ahead.expected_wait_s() * 1000))
        try:
            messages = client.poll(timeout_ms, self.config.pipeline.batch_size)
        except KafkaError as error:
            self._poll_failures += 1
            if self._poll_failures == 1:
                log.warning("polls_failing", error=_describe(error))
            self.lifecycle.wait(timeout_ms / 1000)
            return []
        if self._poll_failures:
            log.info("polls_recovered", failed_polls=self._poll_failures)
            self._poll_failures = 0
        return messages

    def process_batch(self, messages: Sequence[Message]) -> bool | None:
        """Decode, process, deliver and commit a batch: without overlap `messages`; with it the batch prepared
        ahead, once `messages` started preparing in the background. False when the batch was rewound to be
        processed again, None when there was no batch."""
        assert self.runner is not None
        polled = self._accept(messages) if messages else None  # decoding overlaps the held batch's prepare
        if self._ahead is None:
            return None if polled is None else self._deliver(polled, self.runner.prepare(polled.items))
        held = self._ahead.take() if self._ahead.held else None
        if polled is not None:
            self._ahead.start(polled)
        return None if held is None else self._deliver(*held)

    def _accept(self, messages: Sequence[Message]) -> Polled:
        """Note the records as read and not committed, and decode them."""
        started = time.perf_counter()
        note_read(self._uncommitted, messages)
        items = [source_item(m, self.limits, self.settings.max_frame_bytes, started) for m in messages]
        return Polled(messages, items, started, time.perf_counter())

    def _deliver(self, polled: Polled, prepared: PreparedBatch) -> bool:
        """Complete a prepared batch, deliver and commit it; False when it was rewound to be processed again
        (with the batch prepared after it, whose records follow its own)."""
        assert self.sink is not None and self.runner is not None
        messages, started, decoded = polled.messages, polled.started, polled.decoded
        self.runner.complete(prepared)
        processed = time.perf_counter()
        try:
            self.sink.flush()
        except DeliveryFailed as error:
            flushed = time.perf_counter()
            self._delivery_error = str(error)[:300]
            self._delivery_failed_at = time.monotonic()
            ahead = self._ahead.discard() if self._ahead is not None else ()
            self._rewind(messages, str(error), ahead)
            self._report(len(messages), (started, decoded, processed, flushed, time.perf_counter()), False)
            return False
        flushed = time.perf_counter()
        self._delivery_error = None
        delivered = self.sink.delivered
        self.metrics.count(delivered, (decoded - started) / len(messages), flushed - started)
        self.window.add(delivered)
        offsets = next_offsets(messages)
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

    def _rewind(self, messages: Sequence[Message], why: str, ahead: Sequence[Message] = ()) -> None:
        """Seek back to the first offset of the batch (and of the dropped batch `ahead`, read after it) in each
        partition still ours, then wait before retrying (stopping: neither, the batch is left to whoever reads
        these partitions next)."""
        assert self.client is not None
        self.metrics.redeliveries.inc()
        stopping = self.lifecycle.stopping or None
        log.warning(
            "batch_retry", reason=why[:300], frames=len(messages), dropped_ahead=len(ahead) or None, stopping=stopping
        )
        if self.lifecycle.stopping:
            return
        seek_back(self.client, [*messages, *ahead], self.client.assignment())
        self.lifecycle.wait(self.settings.retry_backoff_s)

    def _close(self, code: int) -> None:
        log.info("worker_stopping", worker=self.worker_id)
        if self._ahead is not None:
            self._ahead.close()  # a batch still held (the loop failed): its offsets are left uncommitted
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
        # Without overlap nothing is in flight here: batches are committed before the next poll, where rebalances
        # happen. With overlap the batch prepared ahead is dropped if it holds records of these partitions.
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))
        if self._ahead is not None and self.client is not None:
            self._ahead.release(partitions, self.client)  # before the memory forgets these cameras (below)
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
