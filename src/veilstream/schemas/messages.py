"""Message contracts (schema version 1).

Kafka headers are (name, bytes) pairs; each header model lists its header names as field aliases
(`camera-id`, ...), values UTF-8 text. The frame and aggregate records are in `records`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from veilstream.errors import FrameRejected

SCHEMA_VERSION = "1"
ContentType = Literal["image/jpeg", "image/png", "image/webp"]  # what the worker publishes (`publish.codec`)
# What an input frame may be (`decoding.formats.CONTENT_TYPES`); one frame per message, so an animated GIF, WebP
# or PNG or a multi-page TIFF is dead-lettered as `multiple_frames`.
InputContentType = Literal["image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif"]
Headers = Sequence[tuple[str, bytes]]


class _Headers(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class InputFrameHeaders(_Headers):
    """Headers of a frame on the input topic. The value is the encoded image; the key is the camera id."""

    camera_id: str = Field(alias="camera-id", min_length=1, description="camera identifier (or the message key)")
    content_type: InputContentType | None = Field(
        None,
        alias="content-type",
        description="sniffed from the magic bytes when absent; when present, the bytes must match it "
        "(else dead-lettered as content_type_mismatch)",
    )
    sequence: int | None = Field(None, alias="sequence", ge=0, description="frame number within the camera")
    capture_time: datetime | None = Field(None, alias="capture-time", description="ISO 8601")
    ground_truth: str | None = Field(None, alias="ground-truth", description="true class, for accuracy metrics")


class OutputFrameHeaders(_Headers):
    """Headers of an anonymized frame on the output topic (lineage and decision)."""

    schema_version: str = Field(SCHEMA_VERSION, alias="veilstream-schema")
    content_type: ContentType = Field(alias="content-type")
    camera_id: str = Field(alias="camera-id")
    sequence: int | None = Field(None, alias="sequence")
    capture_time: datetime | None = Field(None, alias="capture-time")
    source_topic: str = Field(alias="source-topic")
    source_partition: int = Field(alias="source-partition")
    source_offset: int = Field(alias="source-offset")
    original_decision: str | None = Field(
        None, alias="original-decision", description="labels joined with '|', per classifier (absent: no correction)"
    )
    final_decision: str | None = Field(None, alias="final-decision", description="decision on these published bytes")
    consistent: bool | None = Field(None, alias="consistent")
    iterations: int = Field(0, alias="iterations")
    faces: int = Field(alias="faces")
    plates: int = Field(alias="plates")
    flagged: bool = Field(alias="flagged", description="masked, inconsistent, or an anonymized object found again")
    outcome: str = Field("published", alias="outcome", description="published, or masked (a failed frame, grey)")
    reason: str | None = Field(None, alias="reason", description="why a masked frame failed")


class DeadLetterHeaders(_Headers):
    """Headers of a dead letter: the value is the original bytes, untouched."""

    schema_version: str = Field(SCHEMA_VERSION, alias="veilstream-schema")
    reason: str = Field(alias="dlq-reason", description="stable code, e.g. truncated, too_large, detect_failed")
    detail: str = Field(alias="dlq-detail")
    source_topic: str = Field(alias="source-topic")
    source_partition: int = Field(alias="source-partition")
    source_offset: int = Field(alias="source-offset")
    camera_id: str | None = Field(None, alias="camera-id")


M = TypeVar("M", bound=_Headers)


def decode_headers(model: type[M], headers: Headers, **defaults: Any) -> M:
    """Parse Kafka headers into `model`; bad values raise FrameRejected('bad_header')."""
    values: dict[str, Any] = dict(defaults)
    for name, raw in headers:
        try:
            values[name] = raw.decode("utf-8") if raw is not None else None
        except UnicodeDecodeError as error:
            raise FrameRejected("bad_header", f"header {name!r} is not UTF-8") from error
    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        missing = all(e["type"] == "missing" for e in error.errors())
        raise FrameRejected("missing_header" if missing else "bad_header", problems) from error


def encode_headers(model: _Headers) -> list[tuple[str, bytes]]:
    """Kafka headers of a model: aliases as names, JSON-mode values as UTF-8 text, None left out."""
    headers = []
    for name, value in model.model_dump(mode="json", by_alias=True, exclude_none=True).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        headers.append((name, text.encode()))
    return headers
