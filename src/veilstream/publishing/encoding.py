"""Encoding published frames, and what a consumer of the published bytes decodes from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from veilstream.decoding.images import Frame

Codec = Literal["jpeg", "png", "webp"]

_EXTENSIONS: dict[str, str] = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
CONTENT_TYPES: dict[Codec, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


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


def publish_roundtrip(frame: Frame, codec: Codec, quality: int) -> tuple[bytes, Frame]:
    """What a consumer of the published bytes sees: encode, then decode again."""
    data = encode_frame(frame, codec, quality)
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"OpenCV could not decode the {codec} it just encoded")
    rgb: Frame = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return data, rgb


@dataclass(frozen=True)
class Encoded:
    """Published bytes and the pixels a consumer decodes from them."""

    data: bytes
    decoded: Frame


@dataclass(frozen=True)
class Encoder:
    """The publish stage's codec: the only place that turns pixels into published bytes."""

    codec: Codec = "jpeg"
    quality: int = 90

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be within 1..100, got {self.quality}")

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.codec]

    @property
    def extension(self) -> str:
        return _EXTENSIONS[self.codec]

    def encode(self, frame: Frame) -> bytes:
        return encode_frame(frame, self.codec, self.quality)

    def roundtrip(self, frame: Frame) -> Encoded:
        """Encode, then decode as a consumer would: decisions checked on `decoded` hold for `data`."""
        data, decoded = publish_roundtrip(frame, self.codec, self.quality)
        return Encoded(data, decoded)

    def grey(self, like: Frame) -> bytes:
        """A fully masked frame of the same size: what a failed frame becomes under `mask_frame`."""
        return self.encode(np.full_like(like, 128))
