"""Image encoding and defensive decoding of frames (RGB uint8, HxWx3)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from veilstream.errors import DecodeError, FrameRejected

Codec = Literal["jpeg", "png", "webp"]
Frame = npt.NDArray[np.uint8]

_EXTENSIONS: dict[str, str] = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
_PIL_FORMATS: dict[str, Codec] = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
CONTENT_TYPES: dict[Codec, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds checked on the declared header before any pixel is decoded."""

    min_side: int = 16
    max_pixels: int = 40_000_000  # 8K is 33 Mpx


def encode_frame(frame: Frame, codec: Codec = "jpeg", quality: int = 90) -> bytes:
    """Encode an RGB frame. `quality` is JPEG/WebP quality (1-100); PNG ignores it (lossless)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 RGB, got shape {frame.shape} dtype {frame.dtype}")
    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    params: list[int] = []
    if codec == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif codec == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    ok, buffer = cv2.imencode(_EXTENSIONS[codec], bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {frame.shape} frame as {codec}")
    return bytes(buffer.tobytes())


def sniff_codec(data: bytes) -> Codec | None:
    """The codec named by the magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_frame(data: bytes, limits: DecodeLimits | None = None, expected: Codec | None = None) -> Frame:
    """Decode image bytes to RGB uint8, refusing bombs and junk before decoding pixels.

    Raises DecodeError (not an image, truncated) or FrameRejected (outside `limits`, wrong type).
    """
    limits = limits or DecodeLimits()
    if not data:
        raise DecodeError("empty", "the message holds no bytes")
    codec = sniff_codec(data)
    if codec is None:
        raise DecodeError("unknown_format", "not a JPEG, PNG or WebP image (magic bytes)")
    if expected is not None and codec != expected:
        raise FrameRejected("content_type_mismatch", f"declared {expected}, bytes are {codec}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
            width, height = header.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise FrameRejected("decompression_bomb", str(error)) from error
    except Exception as error:  # Pillow raises many types for corrupt headers
        raise DecodeError("corrupt_header", f"{type(error).__name__}: {error}") from error
    if width * height > limits.max_pixels:
        raise FrameRejected("too_large", f"{width}x{height} exceeds {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise FrameRejected("too_small", f"{width}x{height} is below {limits.min_side} px per side")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError("corrupt_data", "the image data does not decode")
    if bgr.shape[:2] != (height, width):
        raise DecodeError("size_mismatch", f"header says {width}x{height}, pixels are {bgr.shape[1]}x{bgr.shape[0]}")
    if codec == "jpeg" and not _jpeg_is_complete(data):
        raise DecodeError("truncated", "the JPEG stream has no end-of-image marker")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _jpeg_is_complete(data: bytes) -> bool:
    # OpenCV fills a truncated JPEG with grey and reports success; the EOI marker tells the truth.
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def publish_roundtrip(frame: Frame, codec: Codec, quality: int) -> tuple[bytes, Frame]:
    """What a consumer of the published bytes sees: encode, then decode again."""
    data = encode_frame(frame, codec, quality)
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"OpenCV could not decode the {codec} it just encoded")
    rgb: Frame = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return data, rgb
