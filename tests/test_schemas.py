from __future__ import annotations

from pathlib import Path

import pytest

from veilstream.decoding.images import DecodeLimits
from veilstream.detectors.base import Detection
from veilstream.errors import FrameError, FrameRejected
from veilstream.outcome import Dropped, Masked, Published
from veilstream.publishing.encoding import encode_frame
from veilstream.publishing.records import frame_record
from veilstream.runner import KafkaLineage, Origin
from veilstream.schemas import InputFrameHeaders, OutputFrameHeaders, decode_headers, encode_headers
from veilstream.schemas.export import SCHEMAS, render
from veilstream.schemas.records import FrameRecord
from veilstream.worker.messages import Lineage, parse_record

from .conftest import noise_frames

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "src" / "veilstream" / "schemas"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_json_schemas_match_the_python_types(name: str) -> None:
    committed = (SCHEMA_DIR / f"{name}.schema.json").read_text()
    assert committed == render(SCHEMAS[name], name), "run `python -m veilstream.schemas.export`"


def test_headers_roundtrip_through_kafka_form() -> None:
    headers = OutputFrameHeaders(
        content_type="image/jpeg",
        camera_id="gantry-7",
        sequence=3,
        source_topic="frames",
        source_partition=1,
        source_offset=42,
        original_decision="minivan",
        final_decision="minivan",
        consistent=True,
        iterations=2,
        faces=1,
        plates=1,
        flagged=False,
    )
    encoded = encode_headers(headers)
    assert ("consistent", b"true") in encoded
    assert ("veilstream-schema", b"1") in encoded
    assert decode_headers(OutputFrameHeaders, encoded) == headers


def test_input_headers_take_the_camera_from_the_key() -> None:
    frame = encode_frame(noise_frames(1)[0], "jpeg")
    lineage = Lineage("frames", 0, 5, b"cam-3")
    parsed, pixels = parse_record(frame, [("sequence", b"9")], lineage, DecodeLimits(), 10_000_000)
    assert parsed.camera_id == "cam-3"
    assert parsed.sequence == 9
    assert pixels.shape == (64, 96, 3)
    with pytest.raises(FrameRejected) as caught:
        parse_record(frame, [], Lineage("frames", 0, 6, None), DecodeLimits(), 10_000_000)
    assert caught.value.reason == "missing_header"
    with pytest.raises(FrameRejected) as caught:
        parse_record(frame, [("camera-id", b"c"), ("sequence", b"-1")], lineage, DecodeLimits(), 10_000_000)
    assert caught.value.reason == "bad_header"
    with pytest.raises(FrameRejected) as caught:
        parse_record(frame, [("camera-id", b"c")], lineage, DecodeLimits(), 100)
    assert caught.value.reason == "too_large"
    assert decode_headers(
        InputFrameHeaders, [("camera-id", b"c"), ("capture-time", b"2026-01-02T03:04:05Z")]
    ).capture_time


def test_frame_records_of_each_outcome() -> None:
    box = Detection(1, 2, 30, 40, 0.9, "face")
    origin = Origin("cam", 4, kafka=KafkaLineage("frames", 1, 7, b"cam", b"raw", (("camera-id", b"cam"),)))
    dropped = frame_record(origin, Dropped((box,), (), {"detect": 2.0}, FrameError("detect_failed", "boom")), "w")
    assert (dropped.outcome, dropped.reason, dropped.flagged, dropped.corrected) == (
        "dropped",
        "detect_failed",
        True,
        False,
    )
    assert (dropped.faces, dropped.source_offset, dropped.published_bytes) == (1, 7, None)
    assert dropped.latency_ms == 2.0, "without a queue, a frame's latency is its own time in the stages"
    masked = frame_record(origin, Masked((box,), (box,), {}, b"grey", FrameError("residual_detection", "1")), "w", 9.0)
    assert (masked.outcome, masked.published_bytes, masked.residual_faces, masked.latency_ms) == ("masked", 4, 1, 9.0)
    published = frame_record(Origin("file.jpg", source="in/file.jpg"), Published((), (), {}, b"jpeg"), "anonymize")
    assert (published.outcome, published.flagged, published.consistent, published.original) == (
        "published",
        False,
        None,
        [],
    )
    assert FrameRecord.model_validate_json(published.model_dump_json()) == published
