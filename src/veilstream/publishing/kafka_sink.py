"""The Kafka sink: frames, frame records and dead letters, confirmed by the broker before `flush` returns.

Per frame outcome:
- published: the anonymized bytes on the output topic, with `OutputFrameHeaders`;
- masked (`pipeline.on_failure: mask_frame`): the grey frame on the output topic, flagged, `outcome=masked` and
  the reason;
- dropped: a dead letter with the original value and the original headers prefixed `original-`.
Each frame's `FrameRecord` goes to the metrics topic once its frame or dead letter is acknowledged, so the record
says what became of the frame.

`flush` sends the frames and dead letters, waits for every acknowledgement, then sends the records and waits
again. An output the broker refuses for good (a non-retriable error, e.g. larger than the topic's
`max.message.bytes`) becomes a dead letter `output_refused` at once (without its value if the dead-letter topic
refuses that too). An output that fails retriably fails the flush (`DeliveryFailed`: the worker rewinds and
processes the batch again) until it has failed `delivery_attempts` flushes; then it becomes a dead letter
`delivery_failed`. A dead letter that cannot be delivered fails the flush however often: a frame is never lost,
and never published raw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

import structlog
from kafka.errors import KafkaError, KafkaTimeoutError

from veilstream.correction.classifier import Decision
from veilstream.errors import FrameError, StageError
from veilstream.outcome import Dropped, Masked, Published
from veilstream.runner import KafkaLineage, Processed
from veilstream.schemas import DeadLetterHeaders, FrameRecord, OutputFrameHeaders, encode_headers
from veilstream.worker.client import Delivery, KafkaClient, TopicPartition

log = structlog.get_logger("veilstream.worker")

Headers = list[tuple[str, bytes]]
MessageKind = Literal["frame", "dead letter", "record"]
DETAIL_LIMIT = 1000


class DeliveryFailed(Exception):
    """Some output of a batch was not acknowledged; the batch must be processed again."""


@dataclass(frozen=True)
class KafkaTopics:
    output: str
    metrics: str
    dead_letters: str


@dataclass(frozen=True)
class _Message:
    kind: MessageKind
    topic: str
    value: bytes
    key: bytes | None
    headers: Headers


@dataclass
class _Frame:
    """One input frame on its way through a flush: what is sent for it now, and its record as it stands."""

    processed: Processed
    lineage: KafkaLineage
    record: FrameRecord
    message: _Message
    error: FrameError | None  # why it is a dead letter (None while it is an output)

    @property
    def position(self) -> tuple[str, int, int]:
        return (self.lineage.topic, self.lineage.partition, self.lineage.offset)


@dataclass
class FlushTimings:
    """Where the last flush spent its time (for benchmarks): sending, and waiting for acknowledgements."""

    send_s: float = 0.0
    wait_s: float = 0.0


def is_fatal(error: BaseException) -> bool:
    """Refused for good: a Kafka error whose retry cannot succeed (too large, invalid, not authorized)."""
    return isinstance(error, KafkaError) and not error.retriable


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _labels(decisions: tuple[Decision, ...]) -> str:
    return "|".join(d.label for d in decisions)


class KafkaSink:
    """A Sink (see `veilstream.runner`) that publishes to Kafka; `delivered` holds the final records of the last
    successful flush, for whoever counts delivered frames."""

    def __init__(
        self,
        client: KafkaClient,
        topics: KafkaTopics,
        content_type: str,
        delivery_timeout_s: float,
        delivery_attempts: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if delivery_attempts < 1:
            raise ValueError("delivery_attempts must be at least 1")
        self.client = client
        self.topics = topics
        self.content_type = content_type
        self.delivery_timeout_s = delivery_timeout_s
        self.delivery_attempts = delivery_attempts
        self.clock = clock
        self.delivered: list[FrameRecord] = []
        self.timings = FlushTimings()
        self._pending: list[_Frame] = []
        self._attempts: dict[tuple[str, int, int], int] = {}  # failed flushes per input frame, until delivered

    def add(self, item: Processed) -> None:
        lineage = item.origin.kafka
        if lineage is None:
            raise ValueError("the Kafka sink publishes consumed frames: the origin needs its Kafka lineage")
        outcome = item.outcome
        if isinstance(outcome, Dropped):
            frame = _Frame(item, lineage, item.record, self._dead_letter(item, lineage, outcome.error), outcome.error)
        else:
            output = _Message("frame", self.topics.output, outcome.data, self._key(item), self._headers(item, outcome))
            frame = _Frame(item, lineage, item.record, output, None)
        self._pending.append(frame)

    def flush(self) -> None:
        """Deliver everything added since the last flush; raises DeliveryFailed when the batch must be retried."""
        frames, self._pending = self._pending, []
        self.delivered = []
        self.timings = FlushTimings()
        if not frames:
            return
        self._deliver_outputs(frames)
        self._deliver_records(frames)
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

    # -- delivery -----------------------------------------------------------------------------------

    def _deliver_outputs(self, frames: list[_Frame]) -> None:
        todo = frames
        while todo:
            again: list[_Frame] = []
            failed: list[tuple[_Frame, BaseException]] = []
            for frame, error in self._send(todo, lambda f: f.message):
                if error is None:
                    self._attempts.pop(frame.position, None)
                elif self._replace(frame, error):
                    again.append(frame)
                else:
                    failed.append((frame, error))
            if failed:  # the batch is retried: replacements not sent yet are made again then
                frame, error = failed[0]
                raise DeliveryFailed(
                    f"{len(failed)} of {len(frames)} outputs not acknowledged, e.g. {frame.message.kind} to "
                    f"{frame.message.topic}: {_describe(error)}"
                )
            todo = again

    def _deliver_records(self, frames: list[_Frame]) -> None:
        failed: list[BaseException] = []
        for frame, error in self._send(frames, self._record_message):
            if error is None:
                continue
            if is_fatal(error):  # the frame itself is delivered; its record can never be
                log.error("frame_record_refused", error=_describe(error), **_fields(frame.lineage))
            else:
                failed.append(error)
        if failed:
            raise DeliveryFailed(f"{len(failed)} of {len(frames)} frame records not acknowledged: {failed[0]}")

    def _send(
        self, frames: list[_Frame], message_of: Callable[[_Frame], _Message]
    ) -> list[tuple[_Frame, BaseException | None]]:
        start = self.clock()
        sent: list[tuple[_Frame, Delivery]] = []
        for frame in frames:
            message = message_of(frame)
            sent.append((frame, self.client.send(message.topic, message.value, message.key, message.headers)))
        waiting = self.clock()
        self.client.flush(self.delivery_timeout_s)
        self.timings.send_s += waiting - start
        self.timings.wait_s += self.clock() - waiting
        return [(frame, self._failure(delivery)) for frame, delivery in sent]

    def _failure(self, delivery: Delivery) -> BaseException | None:
        if not delivery.done():
            error: BaseException = KafkaTimeoutError(f"not acknowledged within {self.delivery_timeout_s:g} s")
            return error
        return delivery.error()

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
            frame.message = self._dead_letter(frame.processed, frame.lineage, problem)
            frame.record = frame.record.model_copy(
                update={
                    "outcome": "dropped",
                    "reason": problem.reason,
                    "detail": problem.detail[:DETAIL_LIMIT],
                    "flagged": True,
                    "published_bytes": None,
                }
            )
            return True
        if fatal and frame.message.value:
            # The note comes first, so that cutting the detail to its limit cannot cut the note off.
            note = (
                f"[value left out: {self.topics.dead_letters} refused the original {len(frame.message.value)} "
                f"bytes: {_describe(error)}]"
            )
            frame.error = FrameError(frame.error.reason, f"{note} {frame.error.detail}")
            frame.message = self._dead_letter(frame.processed, frame.lineage, frame.error, b"")
            return True
        return False

    # -- messages -----------------------------------------------------------------------------------

    def _key(self, item: Processed) -> bytes | None:
        assert item.origin.kafka is not None
        return item.origin.kafka.key or item.origin.camera_id.encode() or None

    def _headers(self, item: Processed, outcome: Published | Masked) -> Headers:
        origin = item.origin
        assert origin.kafka is not None
        correction = outcome.correction
        return encode_headers(
            OutputFrameHeaders(
                content_type=self.content_type,
                camera_id=origin.camera_id,
                sequence=origin.sequence,
                capture_time=origin.capture_time,
                source_topic=origin.kafka.topic,
                source_partition=origin.kafka.partition,
                source_offset=origin.kafka.offset,
                original_decision=_labels(correction.original) if correction else None,
                final_decision=_labels(correction.final) if correction else None,
                consistent=correction.consistent if correction else None,
                iterations=correction.iterations if correction else 0,
                faces=outcome.faces,
                plates=outcome.plates,
                flagged=outcome.flagged,
                outcome=outcome.kind,
                reason=outcome.error.reason if isinstance(outcome, Masked) else None,
            )
        )

    def _dead_letter(
        self, item: Processed, lineage: KafkaLineage, error: FrameError, value: bytes | None = None
    ) -> _Message:
        """The original bytes (or `value`) with the typed reason, the lineage and the original headers."""
        headers = encode_headers(
            DeadLetterHeaders(
                reason=error.reason,
                detail=error.detail[:DETAIL_LIMIT],
                source_topic=lineage.topic,
                source_partition=lineage.partition,
                source_offset=lineage.offset,
                camera_id=item.origin.camera_id or None,
            )
        )
        headers += [(f"original-{name}", data) for name, data in lineage.headers]
        body = (lineage.value or b"") if value is None else value
        return _Message("dead letter", self.topics.dead_letters, body, lineage.key, headers)

    def _record_message(self, frame: _Frame) -> _Message:
        value = frame.record.model_dump_json().encode()
        return _Message("record", self.topics.metrics, value, self._key(frame.processed), [])


def _fields(lineage: KafkaLineage) -> dict[str, object]:
    return {"topic": lineage.topic, "partition": lineage.partition, "offset": lineage.offset}
