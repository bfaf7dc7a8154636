"""Turning consumed records into frames, and outcomes into the messages the worker produces."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from veilstream.decoding.images import DecodeLimits, Frame, decode_frame
from veilstream.publishing.encoding import CONTENT_TYPES, Codec
from veilstream.correction.classifier import Decision
from veilstream.errors import DecodeError, FrameError, FrameRejected
from veilstream.pipeline import FrameOutcome
from veilstream.schemas import (
    DeadLetterHeaders,
    DecisionRecord,
    FrameMetrics,
    InputFrameHeaders,
    OutputFrameHeaders,
    decode_headers,
    encode_headers,
)

_CODEC_OF = {v: k for k, v in CONTENT_TYPES.items()}
Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Lineage:
    topic: str
    partition: int
    offset: int
    key: bytes | None

    def fields(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class InputFrame:
    """A consumed record that decoded into a frame."""

    lineage: Lineage
    headers: InputFrameHeaders
    frame: Frame
    raw: bytes
    polled_at: float


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
    expected: Codec | None = _CODEC_OF[parsed.content_type] if parsed.content_type else None
    return parsed, decode_frame(value, limits, expected)


def _label(decisions: tuple[Decision, ...]) -> str:
    return "|".join(d.label for d in decisions)


def _records(decisions: tuple[Decision, ...]) -> list[DecisionRecord]:
    return [DecisionRecord(**asdict(d)) for d in decisions]


def output_headers(item: InputFrame, outcome: FrameOutcome, codec: Codec, flagged: bool) -> Headers:
    result = outcome.correction
    assert result is not None and outcome.found is not None
    return encode_headers(
        OutputFrameHeaders(
            content_type=CONTENT_TYPES[codec],
            camera_id=item.headers.camera_id,
            sequence=item.headers.sequence,
            capture_time=item.headers.capture_time,
            source_topic=item.lineage.topic,
            source_partition=item.lineage.partition,
            source_offset=item.lineage.offset,
            original_decision=_label(result.original),
            final_decision=_label(result.final),
            consistent=result.consistent,
            iterations=result.iterations,
            faces=outcome.found.faces,
            plates=outcome.found.plates,
            flagged=flagged,
        )
    )


def frame_metrics(item: InputFrame, outcome: FrameOutcome, worker: str, latency_ms: float) -> FrameMetrics:
    result = outcome.correction
    assert result is not None and outcome.found is not None
    residual_faces = sum(1 for d in outcome.residual if d.kind == "face")
    return FrameMetrics(
        worker=worker,
        time=datetime.now(UTC),
        camera_id=item.headers.camera_id,
        sequence=item.headers.sequence,
        capture_time=item.headers.capture_time,
        source_topic=item.lineage.topic,
        source_partition=item.lineage.partition,
        source_offset=item.lineage.offset,
        faces=outcome.found.faces,
        plates=outcome.found.plates,
        residual_faces=residual_faces,
        residual_plates=len(outcome.residual) - residual_faces,
        original=_records(result.original),
        naive=_records(result.naive),
        final=_records(result.final),
        naive_changed=result.naive_changed,
        consistent=result.consistent,
        budget_exhausted=result.budget_exhausted,
        stop_reason=result.stop_reason,
        iterations=result.iterations,
        max_pixel_change=result.max_pixel_change,
        latency_ms=latency_ms,
        stage_ms=outcome.timings_ms,
        ground_truth=item.headers.ground_truth,
    )


def dead_letter_headers(lineage: Lineage, error: FrameError, original: Headers, camera_id: str | None) -> Headers:
    """The original headers (prefixed `original-`) plus the typed reason and lineage."""
    ours = encode_headers(
        DeadLetterHeaders(
            reason=error.reason,
            detail=error.detail[:1000],
            source_topic=lineage.topic,
            source_partition=lineage.partition,
            source_offset=lineage.offset,
            camera_id=camera_id,
        )
    )
    return ours + [(f"original-{name}", value) for name, value in original if value is not None]


def to_json(model: FrameMetrics | Any) -> bytes:
    return json.dumps(model.model_dump(mode="json")).encode()
