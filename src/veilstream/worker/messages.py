"""Consumed records into source items: validate the headers, decode the image, keep the lineage.

A record that does not decode still becomes a `SourceItem` (with its typed error), so it flows through the
runner like any frame and comes out as a dropped outcome with a record and a dead letter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from veilstream.decoding.formats import FORMAT_OF_CONTENT_TYPE, ImageFormat
from veilstream.decoding.images import DecodeLimits, Frame, decode_frame
from veilstream.errors import DecodeError, FrameError, FrameRejected
from veilstream.runner import KafkaLineage, Origin, SourceItem
from veilstream.schemas import InputFrameHeaders, decode_headers
from veilstream.worker.client import Message

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Lineage:
    topic: str
    partition: int
    offset: int
    key: bytes | None

    def fields(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


def parse_record(
    value: bytes | None, headers: Headers, lineage: Lineage, limits: DecodeLimits, max_bytes: int
) -> tuple[InputFrameHeaders, Frame]:
    """Validate headers and decode the image; raises FrameError with a stable reason."""
    if value is None or len(value) == 0:
        raise DecodeError("empty", "the message has no value")
    if len(value) > max_bytes:
        raise FrameRejected("too_large", f"{len(value)} bytes exceeds the {max_bytes}-byte frame limit")
    defaults = {"camera-id": lineage.key.decode("utf-8", "replace")} if lineage.key else {}
    parsed = decode_headers(InputFrameHeaders, headers, **defaults)
    expected: ImageFormat | None = FORMAT_OF_CONTENT_TYPE[parsed.content_type] if parsed.content_type else None
    return parsed, decode_frame(value, limits, expected)


def camera_of(headers: Headers, key: bytes | None) -> str:
    """The camera a record names (header, else key), for a record whose headers did not validate; "" if none."""
    for name, value in headers:
        if name == "camera-id" and value:
            return value.decode("utf-8", "replace")
    return key.decode("utf-8", "replace") if key else ""


def source_item(message: Message, limits: DecodeLimits, max_bytes: int, received_at: float) -> SourceItem:
    """The decoded frame of a consumed record, or the error that stopped it, with the record's lineage (its
    raw value and headers travel along for the dead letter)."""
    headers: Headers = [(name, value) for name, value in (message.headers or ()) if value is not None]
    kafka = KafkaLineage(message.topic, message.partition, message.offset, message.key, message.value, tuple(headers))
    lineage = Lineage(message.topic, message.partition, message.offset, message.key)
    try:
        parsed, frame = parse_record(message.value, headers, lineage, limits, max_bytes)
    except FrameError as error:
        return SourceItem(Origin(camera_of(headers, message.key), kafka=kafka), error=error, received_at=received_at)
    origin = Origin(
        parsed.camera_id,
        sequence=parsed.sequence,
        capture_time=parsed.capture_time,
        ground_truth=parsed.ground_truth,
        kafka=kafka,
    )
    return SourceItem(origin, frame=frame, received_at=received_at)
