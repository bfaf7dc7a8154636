"""Defensive decoding of image bytes into frames (RGB uint8, HxWx3): bombs and junk are refused before pixels.

Formats: JPEG, PNG, WebP, BMP, TIFF and GIF, told apart by their magic bytes (never by a file name).

The orientation rule: a frame is turned upright by its EXIF orientation (JPEG, PNG eXIf, WebP, TIFF) when it is
decoded, so detection, anonymization, correction, the decision check and the published bytes all see the same
upright pixels. Published frames carry no orientation tag. Values outside 1-8 count as upright.

Every frame's declared size is checked before any of its pixels are decoded (`DecodeLimits`), and so is the
number of frames. A multi-frame file (animated GIF, multi-page TIFF, animated WebP or PNG) is read frame by
frame by `open_image`; `decode_frame`, for a Kafka message that carries one frame, refuses it.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from veilstream.decoding.formats import (
    EXIF_ORIENTATION_TAG,
    FORMAT_NAMES,
    UPRIGHT,
    ImageFormat,
    jpeg_is_complete,
    orient,
    orientation_value,
    riff_size,
    sniff_codec,
)
from veilstream.errors import DecodeError, FrameError, FrameRejected

__all__ = [
    "DecodeLimits",
    "EncodedImage",
    "Frame",
    "ImageFormat",
    "ImageHeader",
    "decode_frame",
    "open_image",
    "sniff_codec",
]

Frame = npt.NDArray[np.uint8]

# OpenCV decodes the pixels of still JPEG, PNG, WebP and BMP (fast; it scales 16-bit samples to 8 bits). Pillow
# reads every header, composes GIF and other animation frames, and decodes TIFF: OpenCV's TIFF reader applies the
# orientation tag by itself in some paths, and orientation is applied here, once, for every format.
_CV_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_PILLOW_PIXELS: frozenset[ImageFormat] = frozenset({"gif", "tiff"})


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds checked on the declared header before any pixel is decoded."""

    min_side: int = 16
    max_pixels: int = 40_000_000  # 8K is 33 Mpx; checked for every frame of a multi-frame file
    max_frames: int = 1000  # frames of an animated GIF/WebP/PNG, pages of a TIFF


@dataclass(frozen=True)
class ImageHeader:
    """What the header declares: format, stored size of the first frame, frame count."""

    codec: ImageFormat
    width: int
    height: int
    frames: int


class EncodedImage:
    """Image bytes whose headers passed every check; `frames()` decodes the frames one at a time."""

    def __init__(self, data: bytes, header: ImageHeader, image: Image.Image, limits: DecodeLimits) -> None:
        self.data = data
        self.header = header
        self._image = image
        self._limits = limits

    def frames(self) -> Iterator[Frame]:
        """Every frame, upright RGB, in file order; raises FrameError on the first one that does not decode."""
        if self.header.codec in _PILLOW_PIXELS or self.header.frames > 1:
            yield from self._pillow_frames()
        else:
            yield self._opencv_frame()

    def _opencv_frame(self) -> Frame:
        bgr = cv2.imdecode(np.frombuffer(self.data, dtype=np.uint8), _CV_FLAGS)
        width, height = self._image.size
        if bgr is None:
            raise _failure_reason(self._image)
        if bgr.shape[:2] != (height, width):
            raise DecodeError(
                "size_mismatch", f"header says {width}x{height}, pixels are {bgr.shape[1]}x{bgr.shape[0]}"
            )
        if self.header.codec == "jpeg" and not jpeg_is_complete(self.data):
            raise DecodeError("truncated", "the JPEG stream has no end-of-image marker")
        rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        return orient(rgb, _orientation(self._image, self.header.codec, self.data))

    def _pillow_frames(self) -> Iterator[Frame]:
        image = self._image
        for index in range(self.header.frames):
            try:
                with _quiet_pillow():
                    image.seek(index)
                    _check_size(*image.size, self._limits, index)
                    image.load()
            except FrameError:
                raise
            except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... on broken data
                raise _pillow_failure(error, index) from error
            yield orient(_pillow_rgb(image, index), _orientation(image, self.header.codec, self.data))


def open_image(data: bytes, limits: DecodeLimits | None = None, expected: ImageFormat | None = None) -> EncodedImage:
    """Check the bytes' format, declared sizes and frame count without decoding pixels.

    Raises DecodeError (not an image, corrupt header) or FrameRejected (outside `limits`, wrong declared type).
    """
    limits = limits or DecodeLimits()
    if not data:
        raise DecodeError("empty", "the input holds no bytes")
    codec = sniff_codec(data)
    if codec is None:
        raise DecodeError("unknown_format", f"not a {FORMAT_NAMES} image (magic bytes)")
    if expected is not None and codec != expected:
        raise FrameRejected("content_type_mismatch", f"declared {expected}, bytes are {codec}")
    declared = riff_size(data) if codec == "webp" else None
    if declared is not None and declared > len(data):
        raise DecodeError("truncated", f"the WebP header declares {declared} bytes, {len(data)} are present")
    try:
        with _quiet_pillow():
            image = _pillow_open()(io.BytesIO(data))
            width, height = image.size
            # A JPEG is one frame (the extra images of an MPO file are previews); others may animate or hold pages.
            frames = 1 if codec == "jpeg" else int(getattr(image, "n_frames", 1))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise FrameRejected("decompression_bomb", str(error)) from error
    except UnidentifiedImageError as error:  # its message names a BytesIO object, not the problem
        raise DecodeError("corrupt_header", f"the {codec} header does not parse") from error
    except Exception as error:  # Pillow raises many types for corrupt headers
        raise DecodeError("corrupt_header", f"{type(error).__name__}: {error}") from error
    _check_size(width, height, limits, 0)
    if frames > limits.max_frames:
        raise FrameRejected("too_many_frames", f"{frames} frames exceed the limit of {limits.max_frames}")
    if codec == "tiff":  # every page declares a size of its own
        for page in range(1, frames):
            try:
                with _quiet_pillow():
                    image.seek(page)
            except Exception as error:
                raise DecodeError("corrupt_header", f"page {page}: {type(error).__name__}: {error}") from error
            _check_size(*image.size, limits, page)
        image.seek(0)
    return EncodedImage(data, ImageHeader(codec, width, height, frames), image, limits)


def _pillow_open() -> Callable[[IO[bytes]], Image.Image]:
    """Pillow's own `Image.open`. Loading YOLO replaces it with ultralytics' patch, which answers a file Pillow
    cannot identify by trying to install and import a HEIF plugin (a pip install at run time, or an error that
    names a missing module instead of the broken input)."""
    opener = Image.open
    if opener.__module__ == "ultralytics.utils.patches":
        opener = sys.modules[opener.__module__]._image_open
    return opener  # type: ignore[no-any-return]


def decode_frame(data: bytes, limits: DecodeLimits | None = None, expected: ImageFormat | None = None) -> Frame:
    """Decode image bytes holding one frame to upright RGB uint8, refusing bombs and junk before decoding pixels.

    Raises DecodeError (not an image, truncated) or FrameRejected (outside `limits`, wrong type, several frames).
    """
    image = open_image(data, limits, expected)
    if image.header.frames > 1:
        raise FrameRejected(
            "multiple_frames",
            f"a {image.header.codec} with {image.header.frames} frames; a message carries one frame "
            "(send each frame as a message of its own)",
        )
    return next(image.frames())


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Pillow's warnings about odd metadata are noise here (the outcome says what matters); a decompression
    bomb warning becomes an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _check_size(width: int, height: int, limits: DecodeLimits, index: int) -> None:
    where = f"frame {index}: " if index else ""
    if width * height > limits.max_pixels:
        raise FrameRejected("too_large", f"{where}{width}x{height} exceeds {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise FrameRejected("too_small", f"{where}{width}x{height} is below {limits.min_side} px per side")


def _orientation(image: Image.Image, codec: ImageFormat, data: bytes) -> int:
    if codec == "tiff":
        tags: Any = getattr(image, "tag_v2", {})  # the current page's own tags
        return orientation_value(tags.get(EXIF_ORIENTATION_TAG))
    if codec == "png" and b"eXIf" not in data:
        return UPRIGHT  # Pillow would decode the whole PNG looking for an eXIf chunk after the pixels
    try:
        with _quiet_pillow():
            return orientation_value(image.getexif().get(EXIF_ORIENTATION_TAG))
    except Exception:  # a broken EXIF block: the pixels are still good, taken as stored
        return UPRIGHT


def _failure_reason(image: Image.Image) -> FrameError:
    """Why OpenCV could not decode the pixels (it does not say): ask Pillow, which names truncation."""
    try:
        with _quiet_pillow():
            image.load()
    except Exception as error:
        return _pillow_failure(error, 0)
    return DecodeError("corrupt_data", "the image data does not decode")


def _pillow_rgb(image: Image.Image, index: int) -> Frame:
    """A loaded Pillow frame as RGB uint8; 16-bit grey keeps its top 8 bits, as OpenCV does for other formats."""
    if image.mode.startswith("I;16"):
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode in {"F", "I"}:
        raise FrameRejected(
            "unsupported_pixel_format", f"{image.mode!r} samples (32-bit float or integer) are not read"
        )
    try:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except ValueError as error:
        raise FrameRejected("unsupported_pixel_format", f"frame {index}: mode {image.mode!r}: {error}") from error


def _pillow_failure(error: Exception, index: int) -> FrameError:
    where = f"frame {index}: " if index else ""
    if isinstance(error, (OSError, EOFError)) and "truncated" in str(error):
        return DecodeError("truncated", f"{where}{error}")
    return DecodeError("corrupt_data", f"{where}{type(error).__name__}: {error}")
