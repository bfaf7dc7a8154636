"""What the worker needs from Kafka, behind a small interface (the kafka-python implementation: kafka_python.py).

The worker and the Kafka sink talk to `KafkaClient` only, so every delivery failure path (a refused output, a
timeout, a failed commit, a revoke mid-batch, an aborted transaction) can be tested in-process with a fake
(tests/fake_kafka.py). `send` never raises a Kafka error: a message the client refuses at once (larger than
`max_request_size`, no metadata in time, a transaction already failing) comes back as a failed `Delivery`, like
one the broker refuses.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kafka import TopicPartition
from kafka.errors import KafkaError, TransactionAbortedError

Headers = list[tuple[str, bytes]]
__all__ = [
    "ClientState",
    "Delivery",
    "KafkaClient",
    "Message",
    "RebalanceListener",
    "TopicPartition",
    "TransactionInDoubt",
    "is_fatal",
]


class TransactionInDoubt(Exception):
    """A transaction's commit was sent but not confirmed in time: it may yet commit or abort. Only the group's
    committed offsets (read with require_stable, as a read_committed consumer does) tell which."""


def is_fatal(error: BaseException) -> bool:
    """Refused for good: a Kafka error whose retry cannot succeed (too large, invalid, not authorized). A send
    failed only because its transaction was aborted is not: the transaction is retried."""
    return isinstance(error, KafkaError) and not error.retriable and not isinstance(error, TransactionAbortedError)


@dataclass(frozen=True)
class ClientState:
    """What the clients know of their own connections, read without a network call (from any thread)."""

    joined: bool = False  # a member of the group whose coordinator answered within a heartbeat interval
    partitions: int = 0  # assigned partitions
    unreachable: tuple[str, ...] = ()  # input or output "topic:partition"s whose leader is unknown or unreachable
    last_fetch: float | None = None  # time.monotonic() of the last fetch response, None before the first
    last_ack: float | None = None  # time.monotonic() of the last acknowledged output, None before the first
    problems: tuple[str, ...] = ()  # what the clients report broken: failed authentication, a fenced producer


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

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_s: float) -> None:
        """Commit the next offsets to read; raises KafkaError (CommitFailedError after a rebalance)."""
        ...

    def begin_transaction(self, timeout_s: float) -> None:
        """Exactly-once: start a transaction; raises KafkaError when it cannot start now (no broker to initialise
        the producer with), ProducerFencedError when another worker has our transactional id."""
        ...

    def commit_transaction(self, offsets: Mapping[TopicPartition, int], timeout_s: float) -> None:
        """Add the input offsets to the transaction and commit it. Raises KafkaError when it failed before the
        commit was sent (abort it then), TransactionInDoubt when the commit's outcome is unknown."""
        ...

    def abort_transaction(self, timeout_s: float) -> None:
        """Abort the transaction in progress, if any, waiting up to `timeout_s`; never raises (an abort that is
        not confirmed is completed by the broker when the next transaction begins)."""
        ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...

    def lag(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        """Messages behind the end per partition, from the last fetch (no network call; unknown ones left out)."""
        ...

    def state(self) -> ClientState:
        """The clients' own view of their connections (thread-safe, no network call)."""
        ...

    def close(self, timeout_s: float) -> None:
        """Flush what is in flight, then leave the group without committing, within `timeout_s` in all."""
        ...
