"""What the worker needs from Kafka, behind a small interface, and its kafka-python implementation.

The worker and the Kafka sink talk to `KafkaClient` only, so every delivery failure path (a refused output, a
timeout, a failed commit, a revoke mid-batch) can be tested in-process with a fake (tests/fake_kafka.py).
`send` never raises a Kafka error: a message the client refuses at once (larger than `max_request_size`, no
metadata in time) comes back as a failed `Delivery`, like one the broker refuses.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import suppress
from typing import Any, Protocol

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from veilstream.worker.settings import KafkaConfig, WorkerConfig

log = structlog.get_logger("veilstream.worker")

Headers = list[tuple[str, bytes]]
__all__ = ["Delivery", "KafkaClient", "KafkaPythonClient", "Message", "RebalanceListener", "TopicPartition"]


class Message(Protocol):
    """A consumed record (kafka-python's ConsumerRecord has these fields)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]] | None: ...


class Delivery(Protocol):
    """One produced message: acknowledged when `done()` and `error()` is None."""

    def done(self) -> bool: ...
    def error(self) -> BaseException | None: ...


class RebalanceListener(Protocol):
    def on_revoked(self, partitions: Collection[TopicPartition]) -> None: ...
    def on_assigned(self, partitions: Collection[TopicPartition]) -> None: ...


class KafkaClient(Protocol):
    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...

    def poll(self, timeout_ms: int, max_records: int) -> list[Message]:
        """Up to `max_records` records, in (topic, partition, offset) order; rebalances happen only in here."""
        ...

    def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> Delivery: ...

    def flush(self, timeout_s: float) -> None:
        """Wait until every sent message is done or `timeout_s` passed (then some deliveries are not done)."""
        ...

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit the next offsets to read; raises KafkaError (CommitFailedError after a rebalance)."""
        ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...

    def lag(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        """Messages behind the end per partition; raises KafkaError when the broker does not answer."""
        ...

    def ping(self) -> None:
        """A metadata round trip; raises KafkaError when the broker does not answer."""
        ...

    def close(self, flush_timeout_s: float) -> None:
        """Flush what is in flight (bounded), then leave the group without committing."""
        ...


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
    def __init__(self, listener: RebalanceListener) -> None:
        self.listener = listener

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.listener.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.listener.on_assigned(set(assigned))


class KafkaPythonClient:
    """A KafkaConsumer (manual commits, rebalances inside `poll`) and a KafkaProducer (acks=all)."""

    def __init__(self, consumer: KafkaConsumer, producer: KafkaProducer) -> None:
        self.consumer = consumer
        self.producer = producer

    @classmethod
    def connect(cls, kafka: KafkaConfig, settings: WorkerConfig, max_poll_records: int) -> KafkaPythonClient:
        options = kafka.client_options()
        consumer = KafkaConsumer(
            **options,
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max_poll_records,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            fetch_max_bytes=max(52_428_800, settings.max_message_bytes),
            max_partition_fetch_bytes=settings.max_message_bytes,
        )
        producer = KafkaProducer(
            **options,
            acks="all",
            # kafka-python 3.0's idempotent producer turns any non-retriable batch error (one output larger than
            # the topic's max.message.bytes) into a fatal state that fails every later send: the worker could
            # then not even dead-letter the refused frame. Without idempotence a refusal fails that record alone;
            # one request in flight per connection keeps retries in order (at-least-once allows the duplicates
            # idempotence would have removed).
            enable_idempotence=False,
            max_in_flight_requests_per_connection=1,
            linger_ms=5,
            max_request_size=settings.max_message_bytes,
            delivery_timeout_ms=settings.delivery_timeout_ms,
            request_timeout_ms=min(30_000, settings.delivery_timeout_ms // 2),
        )
        return cls(consumer, producer)

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self.consumer.subscribe(list(topics), listener=_Listener(listener))

    def poll(self, timeout_ms: int, max_records: int) -> list[Message]:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [r for tp in sorted(polled, key=lambda t: (t.topic, t.partition)) for r in polled[tp]]

    def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> Delivery:
        try:
            return _Future(self.producer.send(topic, value=value, key=key, headers=headers))
        except KafkaError as error:  # too large for max_request_size, or no metadata within max_block_ms
            return _Refused(error)

    def flush(self, timeout_s: float) -> None:
        with suppress(KafkaTimeoutError):  # the deliveries still pending say so, one by one
            self.producer.flush(timeout=timeout_s)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.consumer.seek(partition, offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def lag(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        ends = self.consumer.end_offsets(list(partitions), timeout_ms=5000)
        return {tp: max(0, ends[tp] - self.consumer.position(tp, timeout_ms=5000)) for tp in partitions}

    def ping(self) -> None:
        self.consumer.topics()

    def close(self, flush_timeout_s: float) -> None:
        try:
            self.producer.flush(timeout=flush_timeout_s)
        except KafkaError as error:
            log.warning("final_flush_failed", error=str(error))
        self.producer.close(timeout=5)
        self.consumer.close(autocommit=False)  # leaves the group: the partitions move at once
