from __future__ import annotations

import io
from typing import get_args

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from veilstream.decoding.formats import (
    CONTENT_TYPES,
    FORMAT_OF_CONTENT_TYPE,
    jpeg_is_complete,
    orient,
    orientation_value,
)
from veilstream.decoding.images import DecodeLimits, decode_frame, open_image, sniff_codec
from veilstream.errors import DecodeError, FrameRejected
from veilstream.publishing.encoding import encode_frame, publish_roundtrip
from veilstream.schemas.messages import ContentType, InputContentType

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


def _pil_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "codec"), [("BMP", "bmp"), ("TIFF", "tiff"), ("PNG", "png"), ("WEBP", "webp")])
def test_lossless_formats_decode_exactly(fmt: str, codec: str) -> None:
    frame = noise_frames(1)[0]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = _pil_bytes(Image.fromarray(frame), fmt, **options)
    assert sniff_codec(data) == codec
    assert np.array_equal(decode_frame(data), frame)


def test_gif_decodes_to_its_palette_colours() -> None:
    frame = np.zeros((32, 48, 3), np.uint8)
    frame[:, 24:] = (200, 30, 60)
    data = _pil_bytes(Image.fromarray(frame), "GIF")
    assert sniff_codec(data) == "gif"
    assert np.array_equal(decode_frame(data), frame)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(fmt: str, orientation: int) -> None:
    """The EXIF orientation turns the stored pixels upright (issue 14: orientation 6 was refused as a size
    mismatch), the same way for every format that carries the tag."""
    stored = noise_frames(1, height=40, width=64)[0]
    exif = Image.Exif()
    exif[0x0112] = orientation
    options: dict[str, object] = {"tiffinfo": {0x0112: orientation}} if fmt == "TIFF" else {"exif": exif.tobytes()}
    options |= {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = _pil_bytes(Image.fromarray(stored), fmt, **options)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_frame(data)
    assert decoded.shape == upright.shape
    assert decoded.shape[:2] == ((64, 40) if orientation >= 5 else (40, 64))
    assert np.abs(decoded.astype(int) - upright.astype(int)).max() <= (2 if fmt == "JPEG" else 0)


@pytest.mark.parametrize("value", [0, 9, 300])
def test_an_orientation_outside_1_to_8_leaves_the_pixels_as_stored(value: int) -> None:
    assert orientation_value(value) == 1
    frame = noise_frames(1)[0]
    assert np.array_equal(orient(frame, orientation_value(value)), frame)


def test_a_jpeg_with_data_after_its_end_is_complete_and_a_cut_one_is_not() -> None:
    data = encode_frame(noise_frames(1)[0], "jpeg", 90)
    assert jpeg_is_complete(data + b"\x00\x00\x00\x18ftypmp42" + bytes(300)), "a motion photo's tail"
    decode_frame(data + b"trailing maker notes")
    # An EXIF thumbnail is a whole JPEG with its own end marker, inside APP1: it must not make a cut image whole.
    thumbnail = encode_frame(noise_frames(1, 16, 16)[0], "jpeg", 50)
    app1 = b"Exif\x00\x00" + thumbnail
    with_thumbnail = data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:]
    assert jpeg_is_complete(with_thumbnail)
    assert not jpeg_is_complete(with_thumbnail[: len(with_thumbnail) - 200])


def _animation(fmt: str, count: int, **options: object) -> bytes:
    frames = [Image.fromarray(frame) for frame in noise_frames(count, seed=4)]
    return _pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **options)


@pytest.mark.parametrize(("fmt", "options"), [("GIF", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_a_multi_frame_file_reads_frame_by_frame_but_is_not_one_message(fmt: str, options: dict[str, object]) -> None:
    data = _animation(fmt, 3, **options)
    image = open_image(data)
    frames = list(image.frames())
    assert image.header.frames == len(frames) == 3
    if fmt != "GIF":  # GIF frames are palette-quantized
        assert all(np.array_equal(a, b) for a, b in zip(frames, noise_frames(3, seed=4), strict=True))
    with pytest.raises(FrameRejected) as caught:
        decode_frame(data)
    assert caught.value.reason == "multiple_frames"


def test_frame_counts_and_every_page_size_are_bounded_before_decoding() -> None:
    with pytest.raises(FrameRejected) as caught:
        open_image(_animation("GIF", 4), DecodeLimits(max_frames=3))
    assert caught.value.reason == "too_many_frames"
    small = Image.fromarray(noise_frames(1)[0])
    data = _pil_bytes(small, "TIFF", save_all=True, append_images=[Image.new("1", (5000, 3000))])
    with pytest.raises(FrameRejected) as caught:
        open_image(data, DecodeLimits(max_pixels=10_000_000))
    assert (caught.value.reason, "frame 1" in caught.value.detail) == ("too_large", True)


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_a_huge_declared_canvas_is_refused_from_the_header(fmt: str) -> None:
    data = _pil_bytes(Image.new("1" if fmt != "GIF" else "P", (12000, 12000)), fmt)
    with pytest.raises(FrameRejected) as caught:
        decode_frame(data, DecodeLimits(max_pixels=10_000_000))
    assert caught.value.reason in {"too_large", "decompression_bomb"}


@pytest.mark.parametrize(("fmt", "options"), [("BMP", {}), ("TIFF", {}), ("GIF", {}), ("WEBP", {}), ("PNG", {})])
def test_truncated_files_of_every_format_are_typed(fmt: str, options: dict[str, object]) -> None:
    data = _pil_bytes(Image.fromarray(noise_frames(1)[0]), fmt, **options)
    with pytest.raises(DecodeError) as caught:
        decode_frame(data[: len(data) * 2 // 3])
    assert caught.value.reason == "truncated"


def test_16_bit_samples_keep_their_top_8_bits_in_every_format() -> None:
    grey16 = (np.arange(48 * 32, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)
    expected = (grey16 >> 8).astype(np.uint8)
    png = cv2.imencode(".png", grey16)[1].tobytes()
    tiff = _pil_bytes(Image.fromarray(grey16), "TIFF")
    for data in (png, tiff):
        decoded = decode_frame(data)
        assert np.abs(decoded[..., 0].astype(int) - expected.astype(int)).max() <= 1


def test_float_samples_are_refused_with_a_reason() -> None:
    data = _pil_bytes(Image.fromarray(np.ones((32, 32), np.float32)), "TIFF")
    with pytest.raises(FrameRejected) as caught:
        decode_frame(data)
    assert caught.value.reason == "unsupported_pixel_format"


def test_input_content_types_match_the_decoder() -> None:
    assert set(get_args(InputContentType)) == set(CONTENT_TYPES.values())
    assert set(get_args(ContentType)) <= set(CONTENT_TYPES.values())
    for content_type, codec in FORMAT_OF_CONTENT_TYPE.items():
        assert CONTENT_TYPES[codec] == content_type


def test_a_broken_image_is_reported_as_such_after_ultralytics_patched_pillow() -> None:
    """Loading YOLO patches Image.open to pip-install a HEIF plugin for files Pillow cannot identify."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)

    with pytest.raises(DecodeError) as caught:
        decode_frame(b"\xff\xd8\xff junk")
    assert caught.value.reason == "corrupt_header"
    assert "heif" not in caught.value.detail.lower()
