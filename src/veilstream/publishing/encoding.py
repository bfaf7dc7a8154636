"""Encoding published frames, and what a consumer of the published bytes decodes from them.

Two backends. `opencv` (libjpeg-turbo, libpng, libwebp) on the CPU for every codec. `nvjpeg` for JPEG on a CUDA
device: torchvision's `encode_jpeg` on CUDA tensors and `decode_jpeg(..., device=cuda)`, one call per batch.
Either way `Encoded.decoded` is what decoding `Encoded.data` gives, so checks on it are checks on the published
bytes. nvJPEG's decoder is not libjpeg-turbo's: the same bytes decode within a grey level or two of each other
(torchvision's own tests allow a mean difference below 2), so a consumer decoding on the CPU sees pixels that
close to the ones checked.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import torch

from veilstream.decoding.images import Frame

Codec = Literal["jpeg", "png", "webp"]
Backend = Literal["opencv", "nvjpeg"]
# A frame to publish: HxWx3 uint8 RGB on the host, or a 3xHxW uint8 RGB tensor on any device.
Pixels = Frame | torch.Tensor

_EXTENSIONS: dict[str, str] = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
CONTENT_TYPES: dict[Codec, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

log = logging.getLogger(__name__)


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


def is_cuda(device: str) -> bool:
    """Whether `device` names a CUDA device; anything but cpu, cuda and cuda:N is refused."""
    if device == "cpu":
        return False
    if re.fullmatch(r"cuda(:\d+)?", device):
        return True
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")


@functools.cache
def nvjpeg_available() -> bool:
    """Whether this torchvision offers JPEG encode and decode on CUDA (deprecated since 0.29 in favour of
    TorchCodec: a release without them makes this False, and a CUDA encoder falls back to OpenCV)."""
    try:
        import torchvision.io as tvio
    except Exception:  # a torchvision whose native part fails to load is as good as none here
        return False
    ops = torch.ops.image
    return all(hasattr(tvio, name) for name in ("encode_jpeg", "decode_jpeg")) and all(
        hasattr(ops, name) for name in ("encode_jpegs_cuda", "decode_jpegs_cuda")
    )


def select_backend(codec: Codec, device: str, nvjpeg: bool) -> Backend:
    """nvJPEG for JPEG on a CUDA device where torchvision offers it; OpenCV on the CPU otherwise."""
    return "nvjpeg" if codec == "jpeg" and is_cuda(device) and nvjpeg else "opencv"


@dataclass(frozen=True)
class Encoded:
    """Published bytes and the pixels a consumer decodes from them. `on_device`: the same decoded pixels as a
    3xHxW uint8 tensor on the encoder's device (nvjpeg only), for stages that would otherwise upload them again."""

    data: bytes
    decoded: Frame
    on_device: torch.Tensor | None = None


@dataclass(frozen=True)
class Encoder:
    """The publish stage's codec: the only place that turns pixels into published bytes. `device` picks the
    backend (`select_backend`); on a CUDA device with no nvJPEG in torchvision it logs a warning and uses OpenCV."""

    codec: Codec = "jpeg"
    quality: int = 90
    device: str = "cpu"
    backend: Backend = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be within 1..100, got {self.quality}")
        if is_cuda(self.device) and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        backend = select_backend(self.codec, self.device, is_cuda(self.device) and nvjpeg_available())
        if backend == "nvjpeg" and not self._nvjpeg_works():
            backend = "opencv"
        elif self.codec == "jpeg" and is_cuda(self.device) and backend == "opencv":
            log.warning("torchvision %s has no JPEG on CUDA: JPEG is encoded on the CPU", _torchvision_version())
        object.__setattr__(self, "backend", backend)

    def _nvjpeg_works(self) -> bool:
        """One tiny frame through nvJPEG now, so a broken install shows at start-up, not as failed frames."""
        try:
            probe = torch.zeros((3, 16, 16), dtype=torch.uint8, device=self.device)
            torchvision_roundtrip([probe], self.quality, self.device)
        except Exception as error:
            log.warning(
                "nvJPEG failed on %s (%s: %s): JPEG is encoded on the CPU", self.device, type(error).__name__, error
            )
            return False
        return True

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.codec]

    @property
    def extension(self) -> str:
        return _EXTENSIONS[self.codec]

    def encode(self, frame: Pixels) -> bytes:
        return self.encode_batch([frame])[0]

    def roundtrip(self, frame: Pixels) -> Encoded:
        """Encode, then decode as a consumer would: decisions checked on `decoded` hold for `data`."""
        return self.roundtrip_batch([frame])[0]

    def encode_batch(self, frames: Sequence[Pixels]) -> list[bytes]:
        """The published bytes of each frame (one nvJPEG call for the batch)."""
        if not frames:
            return []
        if self.backend == "nvjpeg":
            return torchvision_encode([self._on_device(f) for f in frames], self.quality)
        return [encode_frame(_on_host(f), self.codec, self.quality) for f in frames]

    def roundtrip_batch(self, frames: Sequence[Pixels]) -> list[Encoded]:
        """`roundtrip` of each frame (one nvJPEG encode and one decode call for the batch)."""
        if not frames:
            return []
        if self.backend == "nvjpeg":
            return torchvision_roundtrip([self._on_device(f) for f in frames], self.quality, self.device)
        return [Encoded(*publish_roundtrip(_on_host(f), self.codec, self.quality)) for f in frames]

    def grey(self, like: Frame) -> bytes:
        """A fully masked frame of the same size: what a failed frame becomes under `mask_frame`. Always on the
        CPU: it is the fallback when a frame failed, maybe because the device did."""
        return encode_frame(np.full_like(like, 128), self.codec, self.quality)

    def _on_device(self, frame: Pixels) -> torch.Tensor:
        if isinstance(frame, torch.Tensor):
            _check_tensor(frame)
            return frame.to(self.device)
        _check_frame(frame)
        return torch.from_numpy(np.ascontiguousarray(frame)).to(self.device).permute(2, 0, 1)


def torchvision_encode(tensors: list[torch.Tensor], quality: int) -> list[bytes]:
    """JPEG bytes of 3xHxW uint8 tensors, all on one device (nvJPEG on CUDA, libjpeg-turbo on the CPU)."""
    from torchvision.io import encode_jpeg

    encoded = encode_jpeg(tensors, quality=quality)
    return [bytes(t.cpu().numpy().tobytes()) for t in encoded]


def torchvision_roundtrip(tensors: list[torch.Tensor], quality: int, device: str) -> list[Encoded]:
    """`torchvision_encode`, then the published bytes decoded on `device` (nvJPEG on CUDA), one call each."""
    from torchvision.io import ImageReadMode, decode_jpeg

    published = torchvision_encode(tensors, quality)
    # Decoded from the bytes objects themselves: exactly what is published, nothing kept from the encoder.
    buffers = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in published]
    decoded = decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device)
    return [
        Encoded(data, np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy()), pixels)
        for data, pixels in zip(published, decoded, strict=True)
    ]


def _check_frame(frame: Frame) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 RGB, got shape {frame.shape} dtype {frame.dtype}")


def _check_tensor(tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a 3xHxW uint8 RGB tensor, got shape {tuple(tensor.shape)} dtype {tensor.dtype}")


def _on_host(frame: Pixels) -> Frame:
    if isinstance(frame, torch.Tensor):
        _check_tensor(frame)
        return np.ascontiguousarray(frame.permute(1, 2, 0).cpu().numpy())
    return frame


def _torchvision_version() -> str:
    try:
        import torchvision
    except Exception:
        return "(not importable)"
    return str(torchvision.__version__)
