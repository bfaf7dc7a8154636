"""`KafkaClient` on kafka-python 3.0: a KafkaConsumer (manual commits, read_committed) and a KafkaProducer
(acks=all; transactional in exactly-once mode).

kafka-python 3.0.12 gives no bound on a transaction's offsets, commit or abort (`result.wait()` without a
timeout) and no public view of its connections, so this module reads a few of its internals: the transaction
manager's request results, the group coordinator's heartbeat, the cluster metadata, the connection table and the
fetch sensor. `state()` fails closed (a problem that keeps the worker not ready) if those move in a new version.
After an abort the transactional producer is replaced (checked on Apache Kafka 4.3.1: after a batch refused with
MessageSizeTooLarge and a clean abort, the next transaction's sends fail with OutOfOrderSequenceNumber and the
producer is stuck bumping its epoch; a new producer with the same transactional id works at once, ~0.25 s here).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from contextlib import suppress
from typing import Any

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.base import MemberState
from kafka.errors import (
    IllegalStateError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    TransactionAbortedError,
)
from kafka.producer.transaction_manager import TransactionState
from kafka.structs import OffsetAndMetadata

from veilstream.worker.client import ClientState, Delivery, Headers, Message, RebalanceListener, TransactionInDoubt
from veilstream.worker.settings import KafkaConfig, WorkerConfig

log = structlog.get_logger("veilstream.worker")

__all__ = ["KafkaPythonClient", "transactional_id"]

RECONNECT_BACKOFF_MAX_MS = 2000
TRANSACTION_STEP_MS = 20


def transactional_id(settings: WorkerConfig, worker_id: str) -> str:
    """Stable per worker identity: a restarted worker fences its predecessor and aborts its open transaction."""
    return f"veilstream-{settings.group_id}-{worker_id}"


class _Future:
    """A kafka-python FutureRecordMetadata seen as a Delivery."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def done(self) -> bool:
        return bool(self.future.is_done)

    def error(self) -> BaseException | None:
        return self.future.exception if self.future.is_done and self.future.failed() else None


class _Refused:
    """A message the client refused before sending it."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def done(self) -> bool:
        return True

    def error(self) -> BaseException | None:
        return self._error


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: RebalanceListener, client: KafkaPythonClient) -> None:
        self.listener = listener
        self.client = client

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.listener.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.client.joined_at = time.monotonic()
        self.listener.on_assigned(set(assigned))


class KafkaPythonClient:
    def __init__(
        self,
        consumer: KafkaConsumer,
        producer_options: dict[str, Any],
        heartbeat_interval_s: float,
        stall_s: float,
        output_topics: Sequence[str] = (),
    ) -> None:
        self.consumer = consumer
        self.output_topics = tuple(output_topics)
        self.last_ack: float | None = None
        self.producer_options = producer_options
        self._producer: KafkaProducer | None = KafkaProducer(**producer_options)
        self.transactional = producer_options.get("transactional_id") is not None
        self.group_window_s = heartbeat_interval_s + stall_s
        self.joined_at = float("-inf")
        self._initialized = False  # init_transactions done

    @classmethod
    def connect(
        cls, kafka: KafkaConfig, settings: WorkerConfig, max_poll_records: int, worker_id: str
    ) -> KafkaPythonClient:
        # kafka-python backs reconnects off up to 30 s: after an outage the worker would stay away that long.
        options = kafka.client_options() | {"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS}
        consumer = KafkaConsumer(
            **options,
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Never an aborted input; and a committed-offset fetch waits for a pending transactional commit
            # (KIP-447 require_stable), so a partition moved from a killed exactly-once worker resumes right.
            isolation_level="read_committed",
            # Read-ahead is bounded: one fetch in flight per broker (at most fetch_max_bytes, or one record batch
            # when that is larger), and a partition is fetched again only once its last response is drained.
            max_poll_records=max_poll_records,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            fetch_max_bytes=max(52_428_800, settings.max_message_bytes),
            max_partition_fetch_bytes=settings.max_message_bytes,
        )
        producer: dict[str, Any] = {
            **options,
            "acks": "all",
            # kafka-python 3.0 has no buffer_memory: its accumulator holds what was sent and not yet acknowledged,
            # which the sink bounds to about one batch's outputs (it waits for them before the next poll; what is
            # never acknowledged expires after delivery_timeout_ms).
            # One request in flight per connection keeps retries in order.
            "max_in_flight_requests_per_connection": 1,
            "linger_ms": 5,
            "max_request_size": settings.max_message_bytes,
            "delivery_timeout_ms": settings.delivery_timeout_ms,
            "request_timeout_ms": min(30_000, settings.delivery_timeout_ms // 2),
        }
        if settings.processing_guarantee == "exactly-once":
            producer |= {
                "transactional_id": transactional_id(settings, worker_id),
                "transaction_timeout_ms": settings.transaction_timeout_ms,
                # Bound init_transactions, send and the creation of a replacement producer (see abort_transaction).
                "max_block_ms": min(10_000, settings.delivery_timeout_ms),
                # kafka-python's sender waits this long between the steps of a transaction (add partitions, add
                # offsets, end): at its 100 ms default a batch took 37 ms median, 135 ms p90 here; at 20 ms about
                # what an at-least-once batch takes (it also paces retries of failed sends).
                "retry_backoff_ms": TRANSACTION_STEP_MS,
                "bootstrap_timeout_ms": min(10_000, settings.delivery_timeout_ms),
            }
        else:
            # kafka-python 3.0's idempotent producer turns any non-retriable batch error (one output larger than
            # the topic's max.message.bytes) into a fatal state that fails every later send: the worker could
            # then not even dead-letter the refused frame. Without idempotence a refusal fails that record alone
            # (at-least-once allows the duplicates idempotence would have removed). In a transaction the same
            # error only aborts the transaction: the sink then finds the refused record and retries without it.
            producer["enable_idempotence"] = False
        heartbeat_s = settings.heartbeat_interval_ms / 1000
        outputs = (settings.output_topic, settings.metrics_topic, settings.dlq_topic)
        return cls(consumer, producer, heartbeat_s, settings.readiness_stall_s, outputs)

    # -- consuming ----------------------------------------------------------------------------------

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self.consumer.subscribe(list(topics), listener=_Listener(listener, self))

    def poll(self, timeout_ms: int, max_records: int) -> list[Message]:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [r for tp in sorted(polled, key=lambda t: (t.topic, t.partition)) for r in polled[tp]]

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_s: float) -> None:
        committed = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        self.consumer.commit(committed, timeout_ms=max(1, int(timeout_s * 1000)))

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.consumer.seek(partition, offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def lag(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        lags: dict[TopicPartition, int] = {}
        assignment = self.consumer._subscription.assignment
        for tp in partitions:
            with suppress(KafkaError, KeyError, AttributeError):
                high = self.consumer.highwater(tp)
                position = assignment[tp].position
                if high is not None and position is not None:
                    lags[tp] = max(0, high - position.offset)
        return lags

    # -- producing ----------------------------------------------------------------------------------

    @property
    def producer(self) -> KafkaProducer:
        """The producer, created anew after an abort (raises KafkaError when the brokers cannot be reached)."""
        if self._producer is None:
            self._producer = KafkaProducer(**self.producer_options)
            self._initialized = False
        return self._producer

    def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> Delivery:
        try:
            future = self.producer.send(topic, value=value, key=key, headers=headers)
            future.add_callback(self._acknowledged)
            return _Future(future)
        except IllegalStateError:
            raise  # a send outside a transaction is a bug, not a refusal
        except KafkaError as error:  # too large for max_request_size, no metadata within max_block_ms, ...
            manager = self.producer._transaction_manager
            if self.transactional and manager is not None and manager.has_abortable_error():
                return _Refused(TransactionAbortedError(f"the transaction already failed: {error}"))
            return _Refused(error)

    def _acknowledged(self, _metadata: Any) -> None:  # on the client's IO thread
        self.last_ack = time.monotonic()

    def flush(self, timeout_s: float) -> None:
        if self._producer is None:
            return
        with suppress(KafkaTimeoutError):  # the deliveries still pending say so, one by one
            self._producer.flush(timeout=timeout_s)

    # -- transactions -------------------------------------------------------------------------------

    def begin_transaction(self, timeout_s: float) -> None:
        manager = self.producer._transaction_manager
        if manager.has_fatal_error():
            if isinstance(manager.last_error, ProducerFencedError):
                raise manager.last_error
            log.warning("producer_recreated", error=f"{type(manager.last_error).__name__}: {manager.last_error}")
            self._drop_producer()
        if not self._initialized:
            self.producer.init_transactions()  # bounded by max_block_ms; fences a predecessor with our id
            self._initialized = True
        self.producer.begin_transaction()

    def commit_transaction(self, offsets: Mapping[TopicPartition, int], timeout_s: float) -> None:
        manager = self.producer._transaction_manager
        deadline = time.monotonic() + timeout_s
        committed = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        if committed:
            sent = manager.send_offsets_to_transaction(committed, self.consumer.group_metadata())
            self._await(sent, deadline - time.monotonic(), "the transaction's offsets")
        result = manager.begin_commit()
        try:
            self._await(result, max(1.0, deadline - time.monotonic()), "the transaction's commit")
        except KafkaTimeoutError as error:
            raise TransactionInDoubt(str(error)) from error

    def abort_transaction(self, timeout_s: float) -> None:
        if self._producer is None:
            return
        manager = self._producer._transaction_manager
        if manager._current_state in (TransactionState.IN_TRANSACTION, TransactionState.ABORTABLE_ERROR):
            try:
                self._await(manager.begin_abort(), timeout_s, "the abort")
            except KafkaError as error:  # the broker aborts it when the next producer fences this one
                log.warning("transaction_abort_unconfirmed", error=f"{type(error).__name__}: {error}")
        # After a refused batch kafka-python's transactional producer is out of step with the broker (the next
        # transaction fails with OutOfOrderSequenceNumber and cannot even be aborted): the next begin starts a
        # fresh producer, whose init_transactions fences this one and completes the abort on the broker.
        self._drop_producer()

    def _await(self, result: Any, timeout_s: float, what: str) -> None:
        self.producer._sender.wakeup()
        if not result.wait(timeout_ms=max(0.0, timeout_s) * 1000):
            raise KafkaTimeoutError(f"{what} not confirmed within {timeout_s:.1f} s")

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with suppress(KafkaError):
                producer.close(timeout=0)

    # -- state and close ------------------------------------------------------------------------------

    def state(self) -> ClientState:
        try:
            return self._read_state()
        except Exception as error:  # kafka-python's internals moved: fail closed, and say so
            return ClientState(problems=(f"client state unreadable ({type(error).__name__}: {error})",))

    def _read_state(self) -> ClientState:
        now = time.monotonic()
        coordinator = self.consumer._coordinator
        answered = max(coordinator.heartbeat.last_receive, self.joined_at)
        joined = coordinator.state is MemberState.STABLE and now - answered < self.group_window_s
        manager = self.consumer._manager
        assigned = sorted(self.consumer._subscription.assigned_partitions())
        unreachable = _unreachable(manager, assigned)
        producer = self._producer
        if producer is not None:  # the output partitions it knows of (it learns them at the first send)
            outputs = producer._sender._client._manager
            known = [(t, outputs.cluster.partitions_for_topic(t)) for t in self.output_topics]
            unreachable += _unreachable(outputs, [TopicPartition(t, p) for t, ps in known for p in sorted(ps or ())])
        sensor = self.consumer._metrics.get_sensor("fetch-latency") if self.consumer._metrics else None
        last_fetch = sensor._last_record_time / 1000 if sensor is not None else None
        problems = []
        managers = [("consumer", manager)]
        if producer is not None:
            managers.append(("producer", producer._sender._client._manager))
        for side, client_manager in managers:
            for node, failure in list(client_manager._auth_failures.items()):
                problems.append(f"{side} cannot authenticate to broker {node}: {type(failure).__name__}: {failure}")
        transactions = producer._transaction_manager if producer is not None else None
        if transactions is not None and transactions.has_fatal_error():
            error = transactions.last_error
            problems.append(f"the transactional producer failed for good: {type(error).__name__}: {error}")
        return ClientState(joined, len(assigned), tuple(unreachable), last_fetch, self.last_ack, tuple(problems))

    def close(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        producer = self._producer
        if producer is not None:
            # Delivers what is still in flight (the aggregate) for up to half the time; nothing is committed after.
            try:
                producer.close(timeout=max(0.0, min(5.0, timeout_s / 2)))
            except KafkaError as error:
                log.warning("producer_close_failed", error=f"{type(error).__name__}: {error}")
        # Leaves the group: the partitions move at once (bounded when the coordinator is unreachable).
        self.consumer.close(autocommit=False, timeout_ms=max(100, int((deadline - time.monotonic()) * 1000)))


def _unreachable(manager: Any, partitions: Sequence[TopicPartition]) -> list[str]:
    """The partitions whose leader is unknown, or whose leader's connection failed and is not back."""
    found = []
    for tp in partitions:
        leader = manager.cluster.leader_for_partition(tp)
        connection = manager._conns.get(leader) if leader is not None else None
        failing = (connection is None or not connection.connected) and leader in manager._backoff
        if leader is None or leader < 0 or failing:
            found.append(f"{tp.topic}:{tp.partition}")
    return found
