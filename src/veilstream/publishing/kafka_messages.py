"""The Kafka messages of one processed frame: its output (published or masked), its dead letter, its record.

- published: the anonymized bytes on the output topic, with `OutputFrameHeaders`;
- masked (`pipeline.on_failure: mask_frame`): the grey frame on the output topic, flagged, `outcome=masked` and
  the reason;
- dropped: a dead letter with the original value and the original headers prefixed `original-`;
- the frame's `FrameRecord` as JSON on the metrics topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from veilstream.correction.classifier import Decision
from veilstream.errors import FrameError, StageError
from veilstream.outcome import Masked, Published
from veilstream.runner import KafkaLineage, Processed
from veilstream.schemas import DeadLetterHeaders, FrameRecord, OutputFrameHeaders, encode_headers

Headers = list[tuple[str, bytes]]
MessageKind = Literal["frame", "dead letter", "record", "aggregate"]
DETAIL_LIMIT = 1000


@dataclass(frozen=True)
class KafkaTopics:
    output: str
    metrics: str
    dead_letters: str


@dataclass(frozen=True)
class OutgoingMessage:
    kind: MessageKind
    topic: str
    value: bytes
    key: bytes | None
    headers: Headers


def _labels(decisions: tuple[Decision, ...]) -> str:
    return "|".join(d.label for d in decisions)


def message_key(item: Processed) -> bytes | None:
    """The input's key (the camera), so that a camera's outputs stay in order on one partition."""
    assert item.origin.kafka is not None
    return item.origin.kafka.key or item.origin.camera_id.encode() or None


def output_message(item: Processed, outcome: Published | Masked, topic: str, content_type: str) -> OutgoingMessage:
    origin = item.origin
    assert origin.kafka is not None
    correction = outcome.correction
    headers = encode_headers(
        OutputFrameHeaders(
            content_type=content_type,
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
    return OutgoingMessage("frame", topic, outcome.data, message_key(item), headers)


def dead_letter_message(
    item: Processed, lineage: KafkaLineage, error: FrameError, topic: str, value: bytes | None = None
) -> OutgoingMessage:
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
    return OutgoingMessage("dead letter", topic, body, lineage.key, headers)


def record_message(item: Processed, record: FrameRecord, topic: str) -> OutgoingMessage:
    return OutgoingMessage("record", topic, record.model_dump_json().encode(), message_key(item), [])


def dropped_record(record: FrameRecord, problem: StageError) -> FrameRecord:
    """The record of a frame whose output became a dead letter."""
    return record.model_copy(
        update={
            "outcome": "dropped",
            "reason": problem.reason,
            "detail": problem.detail[:DETAIL_LIMIT],
            "flagged": True,
            "published_bytes": None,
        }
    )
