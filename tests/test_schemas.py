from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from veilstream.decoding.images import DecodeLimits
from veilstream.publishing.encoding import encode_frame
from veilstream.errors import FrameRejected
from veilstream.schemas import InputFrameHeaders, OutputFrameHeaders, decode_headers, encode_headers
from veilstream.schemas.export import SCHEMAS, render
from veilstream.schemas.messages import DecisionRecord, FrameMetrics
from veilstream.worker.messages import Lineage, parse_record
from veilstream.worker.metrics import AggregateWindow

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


def _metrics(label: str, final: str, truth: str | None, iterations: int, latency: float) -> FrameMetrics:
    def decision(name: str) -> list[DecisionRecord]:
        return [DecisionRecord(classifier="c", index=0, label=name, confidence=0.5)]

    return FrameMetrics(
        worker="w",
        time=datetime.now(UTC),
        camera_id="cam",
        source_topic="t",
        source_partition=0,
        source_offset=0,
        faces=1,
        plates=0,
        residual_faces=0,
        residual_plates=0,
        original=decision(label),
        naive=decision(label),
        final=decision(final),
        naive_changed=False,
        consistent=label == final,
        budget_exhausted=label != final,
        stop_reason="corrected",
        iterations=iterations,
        max_pixel_change=3,
        latency_ms=latency,
        stage_ms={},
        ground_truth=truth,
    )


def test_aggregate_window_figures() -> None:
    window = AggregateWindow("w", started=100.0)
    window.add(_metrics("car", "car", "car", 0, 10))
    window.add(_metrics("car", "car", "van", 2, 20))
    window.add(_metrics("bus", "truck", "bus", 4, 30))
    window.add(_metrics("van", "van", None, 0, 40))
    window.dead_letters = 2
    aggregate = window.close(now=102.0)
    assert aggregate.frames == 4
    assert aggregate.final_changed == 1
    assert aggregate.budget_exhausted == 1
    assert aggregate.dead_letters == 2
    assert aggregate.mean_iterations == pytest.approx(3.0)
    assert aggregate.p50_latency_ms == pytest.approx(25.0)
    assert aggregate.frames_per_second == pytest.approx(2.0)
    assert aggregate.labelled_frames == 3
    assert aggregate.accuracy_original == pytest.approx(2 / 3)
    assert aggregate.accuracy_published == pytest.approx(1 / 3)
