"""What image bytes say about themselves: the format (magic bytes), its content type, a JPEG's completeness, and
the EXIF orientation that turns stored pixels upright."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

ImageFormat = Literal["jpeg", "png", "webp", "bmp", "tiff", "gif"]

# The input content types a Kafka message may declare; any other value is refused as `bad_header`.
CONTENT_TYPES: dict[ImageFormat, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "gif": "image/gif",
}
FORMAT_OF_CONTENT_TYPE: dict[str, ImageFormat] = {value: key for key, value in CONTENT_TYPES.items()}
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, TIFF or GIF"

_MAGIC: tuple[tuple[bytes, ImageFormat], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)

EXIF_ORIENTATION_TAG = 0x0112
UPRIGHT = 1


def sniff_codec(data: bytes) -> ImageFormat | None:
    """The format named by the magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, codec in _MAGIC:
        if data.startswith(magic):
            return codec
    return None


def riff_size(data: bytes) -> int:
    """The total size a RIFF container (WebP) declares for itself: its size field plus the 8 bytes before it."""
    return int.from_bytes(data[4:8], "little") + 8


def jpeg_is_complete(data: bytes) -> bool:
    """Whether the first image of a JPEG stream reaches its end-of-image marker.

    OpenCV fills a truncated JPEG with grey and reports success, so the EOI marker has to tell. It is searched for
    after the first start-of-scan, found by walking the header segments: an EXIF thumbnail (a whole JPEG inside
    APP1) has an EOI of its own, and phones append data after the EOI (motion photos, maker trailers).
    """
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data follows; 0xFF is stuffed there, so FFD9 is the end
            return data.find(b"\xff\xd9", position + 2 + length) != -1
        position += 2 + length
    return False


def orientation_value(raw: object) -> int:
    """An EXIF orientation (1-8); anything else (absent, 0, 9, text) counts as upright."""
    return raw if isinstance(raw, int) and 1 <= raw <= 8 else UPRIGHT


def orient(pixels: npt.NDArray[np.uint8], orientation: int) -> npt.NDArray[np.uint8]:
    """Stored pixels turned upright per EXIF orientation (the same result as Pillow's `exif_transpose`)."""
    if orientation == 2:
        turned = pixels[:, ::-1]
    elif orientation == 3:
        turned = pixels[::-1, ::-1]
    elif orientation == 4:
        turned = pixels[::-1]
    elif orientation == 5:
        turned = pixels.swapaxes(0, 1)
    elif orientation == 6:
        turned = np.rot90(pixels, k=-1)
    elif orientation == 7:
        turned = np.rot90(pixels, k=-1)[::-1]
    elif orientation == 8:
        turned = np.rot90(pixels, k=1)
    else:
        return pixels
    return np.ascontiguousarray(turned)
