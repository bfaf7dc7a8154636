"""The Kafka sink: frames, frame records and dead letters (kafka_messages.py), confirmed before `flush` returns.

At-least-once: `flush` sends the frames and dead letters, waits for every acknowledgement, then sends the records
(each frame's record once its frame or dead letter is acknowledged, so the record says what became of the
frame) and waits again; the worker commits the input offsets afterwards.

Exactly-once (`transactional`): `flush` puts the frames, dead letters, records and the input offsets in one
transaction and commits it. When a message fails, the transaction is aborted (and the client starts a fresh
producer: kafka-python's stays out of step with the broker after a refusal); the refused message is found (the one
failed message, or each suspect alone in a probe transaction that is aborted again: after one refusal kafka-python
fails the rest of the transaction with the same error) and the transaction is retried without it.

Either way an output the broker refuses for good (a non-retriable error, e.g. larger than the topic's
`max.message.bytes`) becomes a dead letter `output_refused` (without its value if the dead-letter topic refuses
that too). An output that fails retriably fails the flush (`DeliveryFailed`: the worker rewinds and processes
the batch again) until it has failed `delivery_attempts` flushes; then it becomes a dead letter
`delivery_failed`. A dead letter that cannot be delivered fails the flush however often: a frame is never lost,
and never published raw. Every wait ends at the flush's deadline: `delivery_timeout_s` after it began, or
sooner when the worker is stopping (`stop_deadline`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import structlog
from kafka.errors import KafkaError, KafkaTimeoutError, ProducerFencedError, TransactionAbortedError

from veilstream.errors import FrameError, StageError
from veilstream.outcome import Dropped
from veilstream.publishing.kafka_messages import (
    KafkaTopics,
    OutgoingMessage,
    dead_letter_message,
    dropped_record,
    output_message,
    record_message,
)
from veilstream.runner import KafkaLineage, Processed
from veilstream.schemas import FrameRecord
from veilstream.worker.client import Delivery, KafkaClient, TopicPartition, is_fatal

log = structlog.get_logger("veilstream.worker")

__all__ = ["DeliveryFailed", "FlushTimings", "KafkaSink", "KafkaTopics"]
_SLICE_S = 0.25  # waits are cut into slices so that a stop request shortens them


class DeliveryFailed(Exception):
    """Some output of a batch was not acknowledged (or its transaction not committed): process it again."""


@dataclass
class _Frame:
    """One input frame on its way through a flush: what is sent for it now, and its record as it stands."""

    processed: Processed
    lineage: KafkaLineage
    record: FrameRecord
    message: OutgoingMessage
    error: FrameError | None  # why it is a dead letter (None while it is an output)
    record_refused: bool = False  # exactly-once: its record was refused for good and is left out

    @property
    def position(self) -> tuple[str, int, int]:
        return (self.lineage.topic, self.lineage.partition, self.lineage.offset)


@dataclass
class _Outgoing:
    """A message of a flush and whose it is: a frame's output or dead letter, a frame's record, or an extra."""

    message: OutgoingMessage
    frame: _Frame | None
    is_record: bool = False


@dataclass
class FlushTimings:
    """Where the last flush spent its time (for benchmarks): sending, and waiting for acknowledgements."""

    send_s: float = 0.0
    wait_s: float = 0.0


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class KafkaSink:
    """A Sink (see `veilstream.runner`) that publishes to Kafka; `delivered` holds the final records of the last
    successful flush, for whoever counts delivered frames; `waiting_since` (time.monotonic()) is set while a
    flush waits for the broker, for readiness."""

    def __init__(
        self,
        client: KafkaClient,
        topics: KafkaTopics,
        content_type: str,
        delivery_timeout_s: float,
        delivery_attempts: int,
        transactional: bool = False,
        stop_deadline: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if delivery_attempts < 1:
            raise ValueError("delivery_attempts must be at least 1")
        self.client = client
        self.topics = topics
        self.content_type = content_type
        self.delivery_timeout_s = delivery_timeout_s
        self.delivery_attempts = delivery_attempts
        self.transactional = transactional
        self.stop_deadline = stop_deadline
        self.clock = clock
        self.delivered: list[FrameRecord] = []
        self.timings = FlushTimings()
        self.waiting_since: float | None = None
        self._pending: list[_Frame] = []
        self._extras: list[OutgoingMessage] = []
        self._attempts: dict[tuple[str, int, int], int] = {}  # failed flushes per input frame, until delivered

    def add(self, item: Processed) -> None:
        lineage = item.origin.kafka
        if lineage is None:
            raise ValueError("the Kafka sink publishes consumed frames: the origin needs its Kafka lineage")
        outcome = item.outcome
        if isinstance(outcome, Dropped):
            message = dead_letter_message(item, lineage, outcome.error, self.topics.dead_letters)
            frame = _Frame(item, lineage, item.record, message, outcome.error)
        else:
            message = output_message(item, outcome, self.topics.output, self.content_type)
            frame = _Frame(item, lineage, item.record, message, None)
        self._pending.append(frame)

    def add_extra(self, topic: str, value: bytes, key: bytes | None) -> None:
        """A message of no frame (an aggregate record), sent with the next flush."""
        self._extras.append(OutgoingMessage("aggregate", topic, value, key, []))

    @property
    def has_extras(self) -> bool:
        return bool(self._extras)

    def flush(self, timeout_s: float | None = None) -> None:
        """Deliver everything added since the last flush, waiting up to `timeout_s` (default: the delivery
        timeout); raises DeliveryFailed when the batch must be retried (TransactionInDoubt when a transaction's
        commit was not confirmed)."""
        frames, self._pending = self._pending, []
        self.delivered = []
        self.timings = FlushTimings()
        if not frames and not self._extras:
            return
        deadline = time.monotonic() + (self.delivery_timeout_s if timeout_s is None else timeout_s)
        if self.transactional:
            self._flush_transaction(frames, deadline)
        else:
            self._deliver_outputs(frames, deadline)
            self._deliver_records(frames, deadline)
        for frame in frames:
            if frame.error is not None:
                log.warning(
                    "dead_letter",
                    reason=frame.error.reason,
                    detail=frame.error.detail[:200],
                    camera=frame.processed.origin.camera_id or None,
                    **_fields(frame.lineage),
                )
        self.delivered = [frame.record for frame in frames]

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        """Revoked partitions are another worker's now, and so are their frames' failed attempts."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._attempts = {k: v for k, v in self._attempts.items() if (k[0], k[1]) not in gone}

    # -- at-least-once --------------------------------------------------------------------------------

    def _deliver_outputs(self, frames: list[_Frame], deadline: float) -> None:
        todo = frames
        while todo:
            again: list[_Frame] = []
            failed: list[tuple[_Frame, BaseException]] = []
            outgoing = [_Outgoing(frame.message, frame) for frame in todo]
            for item, error in self._send(outgoing, deadline):
                assert item.frame is not None
                if error is None:
                    self._attempts.pop(item.frame.position, None)
                elif self._replace(item.frame, error):
                    again.append(item.frame)
                else:
                    failed.append((item.frame, error))
            if failed:  # the batch is retried: replacements not sent yet are made again then
                frame, error = failed[0]
                raise DeliveryFailed(
                    f"{len(failed)} of {len(frames)} outputs not acknowledged, e.g. {frame.message.kind} to "
                    f"{frame.message.topic}: {_describe(error)}"
                )
            todo = again

    def _deliver_records(self, frames: list[_Frame], deadline: float) -> None:
        extras, self._extras = self._extras, []
        outgoing = [self._record_of(frame) for frame in frames] + [_Outgoing(m, None) for m in extras]
        failed: list[BaseException] = []
        for item, error in self._send(outgoing, deadline):
            if error is None:
                continue
            if is_fatal(error):  # the frame itself is delivered; its record can never be
                log.error("record_refused", kind=item.message.kind, error=_describe(error), **_item_fields(item))
            elif item.frame is None:
                self._extras.append(item.message)  # an aggregate goes with the next flush
            else:
                failed.append(error)
        if failed:
            raise DeliveryFailed(f"{len(failed)} of {len(frames)} frame records not acknowledged: {failed[0]}")

    # -- exactly-once ---------------------------------------------------------------------------------

    def _flush_transaction(self, frames: list[_Frame], deadline: float) -> None:
        offsets: dict[TopicPartition, int] = {}
        for frame in frames:
            tp = TopicPartition(frame.lineage.topic, frame.lineage.partition)
            offsets[tp] = max(offsets.get(tp, 0), frame.lineage.offset + 1)
        extras = [_Outgoing(message, None) for message in self._extras]
        # Each failed round settles at least one message for good (or raises), so the rounds are bounded.
        for _round in range(4 * len(frames) + len(extras) + 2):
            if self._remaining(deadline) <= 0:
                raise DeliveryFailed("transaction aborted: no time left to retry it (stopping, or timed out)")
            outgoing = [_Outgoing(f.message, f) for f in frames]
            outgoing += [self._record_of(f) for f in frames if not f.record_refused] + extras
            self._begin(deadline)
            failed = [(item, error) for item, error in self._send(outgoing, deadline) if error is not None]
            if not failed:
                self._commit(offsets, deadline)
                self._extras = []
                for frame in frames:
                    self._attempts.pop(frame.position, None)
                return
            self.client.abort_transaction(self._remaining(deadline))
            settled = False
            for item, error in self._refused(failed, deadline):
                settled |= self._settle(item, error, extras)
            for item, error in failed:
                own_retriable = not is_fatal(error) and not isinstance(error, TransactionAbortedError)
                if item.frame is not None and not item.is_record and own_retriable:
                    settled |= self._replace(item.frame, error)  # counts the attempt; dead-letters at the last
            if not settled:
                item, error = failed[0]
                raise DeliveryFailed(
                    f"transaction aborted: {len(failed)} of {len(outgoing)} messages failed, e.g. "
                    f"{item.message.kind} to {item.message.topic}: {_describe(error)}"
                )
        raise DeliveryFailed("transaction aborted: the refused messages could not all be settled")

    def _begin(self, deadline: float) -> None:
        try:
            self.client.begin_transaction(self._remaining(deadline))
        except ProducerFencedError:
            raise  # another worker runs with our id: not a delivery problem
        except KafkaError as error:
            raise DeliveryFailed(f"no transaction could begin: {_describe(error)}") from error

    def _commit(self, offsets: dict[TopicPartition, int], deadline: float) -> None:
        self.waiting_since = time.monotonic()
        try:
            self.client.commit_transaction(offsets, self._remaining(deadline))
        except ProducerFencedError:
            raise  # another worker runs with our id: this one must stop
        except KafkaError as error:
            self.client.abort_transaction(self._remaining(deadline))
            raise DeliveryFailed(f"transaction not committed: {_describe(error)}") from error
        finally:
            self.waiting_since = None

    def _refused(
        self, failed: list[tuple[_Outgoing, BaseException]], deadline: float
    ) -> list[tuple[_Outgoing, BaseException]]:
        """The failed messages the broker refuses for good. One suspect is the one; several are each sent alone
        in a probe transaction (aborted again), since an aborted transaction fails them all with one error."""
        suspects = [(item, error) for item, error in failed if is_fatal(error)]
        if len(suspects) <= 1:
            return suspects
        refused = []
        for item, _error in suspects:
            self._begin(deadline)
            ((_item, error),) = self._send([item], deadline)
            self.client.abort_transaction(self._remaining(deadline))
            if error is not None and is_fatal(error):
                refused.append((item, error))
        return refused

    def _settle(self, item: _Outgoing, error: BaseException, extras: list[_Outgoing]) -> bool:
        """Take a message refused for good out of the transaction: a frame's output becomes a dead letter, a
        record or an aggregate is left out; False when nothing can be done (a dead letter without value)."""
        if item.frame is None:
            log.error("record_refused", kind=item.message.kind, error=_describe(error))
            extras.remove(item)
            return True
        if item.is_record:
            log.error("record_refused", kind="record", error=_describe(error), **_fields(item.frame.lineage))
            item.frame.record_refused = True
            return True
        return self._replace(item.frame, error)

    # -- both -------------------------------------------------------------------------------------------

    def _record_of(self, frame: _Frame) -> _Outgoing:
        return _Outgoing(record_message(frame.processed, frame.record, self.topics.metrics), frame, is_record=True)

    def _remaining(self, deadline: float) -> float:
        stop = self.stop_deadline()
        limit = deadline if stop is None else min(deadline, stop)
        return max(0.0, limit - time.monotonic())

    def _send(self, outgoing: list[_Outgoing], deadline: float) -> list[tuple[_Outgoing, BaseException | None]]:
        start = self.clock()
        sent: list[tuple[_Outgoing, Delivery]] = []
        for item in outgoing:
            message = item.message
            sent.append((item, self.client.send(message.topic, message.value, message.key, message.headers)))
        waiting = self.clock()
        self.waiting_since = began = time.monotonic()
        try:
            while not all(delivery.done() for _item, delivery in sent):
                remaining = self._remaining(deadline)
                if remaining <= 0:
                    break
                self.client.flush(min(remaining, _SLICE_S))
        finally:
            self.waiting_since = None
        self.timings.send_s += waiting - start
        self.timings.wait_s += self.clock() - waiting
        waited = time.monotonic() - began
        return [(item, _failure(delivery, waited)) for item, delivery in sent]

    def _replace(self, frame: _Frame, error: BaseException) -> bool:
        """Turn a failed frame into a dead letter (refused for good, or out of attempts), or a dead letter refused
        for good into one without the value; False when the batch must be retried as it is."""
        fatal = is_fatal(error)
        if frame.error is None:
            outcome = frame.processed.outcome.kind
            if fatal:
                problem = StageError(
                    "output_refused", f"{frame.message.topic} refused the {outcome} frame for good: {_describe(error)}"
                )
            else:
                attempts = self._attempts[frame.position] = self._attempts.get(frame.position, 0) + 1
                if attempts < self.delivery_attempts:
                    return False
                problem = StageError(
                    "delivery_failed",
                    f"{frame.message.topic} did not acknowledge the {outcome} frame in {attempts} attempts: "
                    f"{_describe(error)}",
                )
            self._attempts.pop(frame.position, None)
            frame.error = problem
            frame.message = dead_letter_message(frame.processed, frame.lineage, problem, self.topics.dead_letters)
            frame.record = dropped_record(frame.record, problem)
            return True
        if fatal and frame.message.value:
            # The note comes first, so that cutting the detail to its limit cannot cut the note off.
            note = (
                f"[value left out: {self.topics.dead_letters} refused the original {len(frame.message.value)} "
                f"bytes: {_describe(error)}]"
            )
            frame.error = FrameError(frame.error.reason, f"{note} {frame.error.detail}")
            frame.message = dead_letter_message(
                frame.processed, frame.lineage, frame.error, self.topics.dead_letters, b""
            )
            return True
        return False


def _failure(delivery: Delivery, waited_s: float) -> BaseException | None:
    if not delivery.done():
        error: BaseException = KafkaTimeoutError(f"not acknowledged after {waited_s:.1f} s")
        return error
    return delivery.error()


def _fields(lineage: KafkaLineage) -> dict[str, object]:
    return {"topic": lineage.topic, "partition": lineage.partition, "offset": lineage.offset}


def _item_fields(item: _Outgoing) -> dict[str, object]:
    return _fields(item.frame.lineage) if item.frame is not None else {}
