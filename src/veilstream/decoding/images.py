"""Defensive decoding of image bytes into frames (RGB uint8, HxWx3): bombs and junk are refused before pixels."""

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

Frame = npt.NDArray[np.uint8]
ImageFormat = Literal["jpeg", "png", "webp"]


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds checked on the declared header before any pixel is decoded."""

    min_side: int = 16
    max_pixels: int = 40_000_000  # 8K is 33 Mpx


def sniff_codec(data: bytes) -> ImageFormat | None:
    """The codec named by the magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_frame(data: bytes, limits: DecodeLimits | None = None, expected: ImageFormat | None = None) -> Frame:
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
