"""An in-memory Kafka for the worker's in-process tests: failure paths a real broker cannot produce on demand.

It implements `veilstream.worker.client.KafkaClient`: input topics with partitions and positions, a produce log per
topic (acknowledged messages only; in a transaction, only once it commits), committed offsets, the clients' own
state for readiness, and hooks to refuse a send, fail a commit or a transaction, or revoke partitions in the middle
of a batch. In a transaction it fails like kafka-python: once a send is refused, every other send of the
transaction not yet acknowledged fails with the same error, and later sends with TransactionAbortedError, until it
is aborted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from kafka import TopicPartition
from kafka.errors import CommitFailedError, TransactionAbortedError

from veilstream.worker.client import ClientState, Delivery, Message, RebalanceListener, is_fatal

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Record:
    """A consumed or produced message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name and value is not None:
                return value.decode()
        return None


@dataclass
class FakeDelivery:
    """Pending until the next flush decides it."""

    outcome: BaseException | None = None
    resolved: bool = False

    def done(self) -> bool:
        return self.resolved

    def error(self) -> BaseException | None:
        return self.outcome


@dataclass(frozen=True)
class Send:
    """What `send` was asked to produce (the refusal rule sees this)."""

    topic: str
    value: bytes
    key: bytes | None
    headers: Headers
    flush: int  # how many flushes came before this send
    transaction: int | None = None  # the number of the transaction it was sent in


# A rule returns the error a send meets at the next flush, or None to acknowledge it.
Rule = Callable[[Send], BaseException | None]


class FakeKafka:
    def __init__(self, partitions: int = 2, topic: str = "in") -> None:
        self.input_topic = topic
        self.inputs: dict[TopicPartition, list[Record]] = {TopicPartition(topic, p): [] for p in range(partitions)}
        self.positions: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.assigned: set[TopicPartition] = set()
        self.produced: dict[str, list[Record]] = {}
        self.listener: RebalanceListener | None = None
        self.rules: list[Rule] = []
        self.commit_errors: list[BaseException] = []  # raised by the next commits, one each
        self.poll_errors: list[BaseException] = []  # raised by the next polls, one each
        self.on_flush: Callable[[FakeKafka], None] | None = None
        self.hold: Callable[[], bool] | None = None  # while it returns True, flushes acknowledge nothing (an outage)
        self.on_idle: Callable[[], None] | None = None  # called when a poll finds nothing (tests stop the worker)
        self.poll_limit: int | None = None  # from this many polls on, on_idle is called on every poll
        self.sent: list[Send] = []  # every send, acknowledged or not
        self.polls = 0
        self.flushes = 0
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.closed = False
        self.client_state = ClientState(joined=True)  # what state() reports (partitions: the assignment)
        self.fetching = True  # each poll gets a fetch response (state().last_fetch)
        self.last_fetch: float | None = None
        self.last_ack: float | None = None
        self.transactions: list[str] = []  # "begin", "commit", "abort", in order
        self.transaction_errors: list[BaseException] = []  # raised by the next commit_transaction calls, one each
        self.aborted: list[Record] = []  # acknowledged in a transaction that was then aborted
        self._in_flight: list[tuple[Send, FakeDelivery]] = []
        self._transaction: list[Record] | None = None  # acknowledged in the open transaction
        self._transaction_error: BaseException | None = None  # the refusal that failed the open transaction

    # -- test side ----------------------------------------------------------------------------------

    def produce_input(
        self, partition: int, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> Record:
        tp = TopicPartition(self.input_topic, partition)
        record = Record(tp.topic, partition, len(self.inputs[tp]), key, value, list(headers))
        self.inputs[tp].append(record)
        return record

    def topic(self, name: str) -> list[Record]:
        return self.produced.get(name, [])

    def revoke(self, partitions: Collection[TopicPartition]) -> None:
        """As a rebalance would: the partitions are no longer ours (the listener hears it)."""
        self.assigned -= set(partitions)
        if self.listener is not None:
            self.listener.on_revoked(set(partitions))

    # -- KafkaClient --------------------------------------------------------------------------------

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        assert list(topics) == [self.input_topic]
        self.listener = listener
        self.assigned = set(self.inputs)
        for tp in self.assigned:
            self.positions[tp] = self.committed.get(tp, 0)
        listener.on_assigned(set(self.assigned))

    def poll(self, timeout_ms: int, max_records: int) -> list[Message]:
        self.polls += 1
        if self.poll_errors:
            raise self.poll_errors.pop(0)
        if self.fetching:
            self.last_fetch = time.monotonic()
        records: list[Message] = []
        for tp in sorted(self.assigned):
            start = self.positions[tp]
            taken = self.inputs[tp][start : start + max_records - len(records)]
            records.extend(taken)
            self.positions[tp] = start + len(taken)
        limited = self.poll_limit is not None and self.polls >= self.poll_limit
        if (not records or limited) and self.on_idle is not None:
            self.on_idle()
        return records

    def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers) -> Delivery:
        assert isinstance(value, bytes), "the client sends bytes"
        delivery = FakeDelivery()
        number = self.transactions.count("begin") if self._transaction is not None else None
        send = Send(topic, value, key, list(headers), self.flushes, number)
        self.sent.append(send)
        if self._transaction_error is not None:
            return FakeDelivery(
                TransactionAbortedError(f"the transaction already failed: {self._transaction_error}"), True
            )
        self._in_flight.append((send, delivery))
        return delivery

    def flush(self, timeout_s: float) -> None:
        if self.on_flush is not None:
            self.on_flush(self)
        self.flushes += 1
        if self.hold is not None and self.hold():
            time.sleep(min(timeout_s, 0.05))
            return
        in_flight, self._in_flight = self._in_flight, []
        for send, delivery in in_flight:
            delivery.resolved = True
            if self._transaction_error is not None:  # kafka-python fails what it had not sent yet with that error
                delivery.outcome = self._transaction_error
                continue
            delivery.outcome = next((e for rule in self.rules if (e := rule(send)) is not None), None)
            if delivery.outcome is None:
                self.last_ack = time.monotonic()
                record = Record(send.topic, 0, 0, send.key, send.value, list(send.headers))
                if self._transaction is not None:
                    self._transaction.append(record)
                else:
                    self._append(record)
            elif self._transaction is not None and is_fatal(delivery.outcome):
                self._transaction_error = delivery.outcome

    def _append(self, record: Record) -> None:
        log = self.produced.setdefault(record.topic, [])
        log.append(Record(record.topic, 0, len(log), record.key, record.value, record.headers))

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_s: float) -> None:
        assert self._transaction is None, "offsets go in the transaction"
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        if not set(offsets) <= self.assigned:  # as after a rebalance: this generation's commits are refused
            raise CommitFailedError("the group has rebalanced; partitions were revoked")
        self.committed.update(offsets)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))
        self.positions[partition] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def lag(self, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.inputs[tp]) - self.positions[tp] for tp in partitions}

    def state(self) -> ClientState:
        state = self.client_state
        return ClientState(
            state.joined, len(self.assigned), state.unreachable, self.last_fetch, self.last_ack, state.problems
        )

    def begin_transaction(self, timeout_s: float) -> None:
        assert self._transaction is None, "a transaction is already open"
        self.transactions.append("begin")
        self._transaction = []

    def commit_transaction(self, offsets: Mapping[TopicPartition, int], timeout_s: float) -> None:
        assert self._transaction is not None and self._transaction_error is None, "commit of a failed transaction"
        assert not self._in_flight, "every send of the transaction is acknowledged first"
        if self.transaction_errors:
            raise self.transaction_errors.pop(0)
        if not set(offsets) <= self.assigned:  # KIP-447: a member of an old generation is fenced
            raise CommitFailedError("the group has rebalanced; partitions were revoked")
        self.transactions.append("commit")
        for record in self._transaction:
            self._append(record)
        self.committed.update(offsets)
        self._transaction = None

    def abort_transaction(self, timeout_s: float) -> None:
        if self._transaction is None:
            return
        self.transactions.append("abort")
        self.flush(timeout_s)  # what is in flight completes, then is thrown away
        self.aborted.extend(self._transaction)
        self._transaction = None
        self._transaction_error = None

    def close(self, timeout_s: float) -> None:
        if self._transaction is not None:
            self.abort_transaction(timeout_s)
        self.flush(timeout_s)
        self.revoke(set(self.assigned))  # leaving the group, as kafka-python's close does
        self.closed = True
