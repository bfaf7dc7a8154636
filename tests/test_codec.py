from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from veilstream.decoding.images import DecodeLimits, decode_frame, sniff_codec
from veilstream.publishing.encoding import encode_frame, publish_roundtrip
from veilstream.errors import DecodeError, FrameRejected

from .conftest import noise_frames


@pytest.mark.parametrize("codec", ["jpeg", "png", "webp"])
def test_encode_decode_roundtrip(codec: str) -> None:
    frame = noise_frames(1)[0]
    data = encode_frame(frame, codec, 95)  # type: ignore[arg-type]
    assert sniff_codec(data) == codec
    decoded = decode_frame(data)
    assert decoded.shape == frame.shape
    if codec == "png":
        assert np.array_equal(decoded, frame)
    else:
        assert np.abs(decoded.astype(int) - frame.astype(int)).mean() < 8


def test_roundtrip_returns_the_decoded_published_pixels() -> None:
    frame = noise_frames(1)[0]
    data, decoded = publish_roundtrip(frame, "jpeg", 50)
    assert np.array_equal(decoded, decode_frame(data))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"not an image at all", "unknown_format"),
        (np.random.default_rng(1).bytes(5000), "unknown_format"),
    ],
)
def test_junk_is_a_typed_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_frame(data)
    assert caught.value.reason == reason


def test_truncated_jpeg_is_refused() -> None:
    data = encode_frame(noise_frames(1)[0], "jpeg", 90)
    with pytest.raises(DecodeError) as caught:
        decode_frame(data[: len(data) // 2])
    assert caught.value.reason in {"truncated", "corrupt_data", "corrupt_header"}


def test_tiny_image_is_rejected() -> None:
    data = encode_frame(np.zeros((1, 1, 3), np.uint8), "png")
    with pytest.raises(FrameRejected) as caught:
        decode_frame(data)
    assert caught.value.reason == "too_small"


def test_decompression_bomb_is_rejected_before_decoding() -> None:
    # A small PNG declaring a huge canvas: refused from the header alone.
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")
    with pytest.raises(FrameRejected) as caught:
        decode_frame(buffer.getvalue(), DecodeLimits(max_pixels=10_000_000))
    assert caught.value.reason in {"too_large", "decompression_bomb"}


def test_declared_type_must_match_the_bytes() -> None:
    data = encode_frame(noise_frames(1)[0], "png")
    with pytest.raises(FrameRejected) as caught:
        decode_frame(data, expected="jpeg")
    assert caught.value.reason == "content_type_mismatch"
