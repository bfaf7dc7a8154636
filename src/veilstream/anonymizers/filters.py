"""Anonymizers: torch operations that hide regions of a (3, H, W) float frame in [0, 255].

Each returns a new tensor (the input is never modified). Default strengths scale with the region, so a
face filling the frame is as unrecognisable as a small one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from veilstream.anonymizers.regions import Region


class Anonymizer(Protocol):
    def anonymize(self, frame: torch.Tensor, regions: Sequence[Region]) -> torch.Tensor:
        """The frame with every region hidden; pixels outside the regions unchanged."""
        ...


def _apply_per_region(
    frame: torch.Tensor,
    regions: Sequence[Region],
    margin: int,
    hide: _CropOperation,
) -> torch.Tensor:
    """Run `hide` on a crop around each region (plus `margin` context) and paste it inside the region. An integer
    frame (uint8) is hidden in float crop by crop and rounded where pasted: only the regions are ever converted."""
    if frame.ndim != 3 or frame.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) frame, got {tuple(frame.shape)}")
    integer = not frame.is_floating_point()
    out = frame.clone()
    height, width = frame.shape[1:]
    for region in regions:
        bounds = region.pixel_bounds(height, width)
        if bounds is None:
            continue
        x1, y1, x2, y2 = bounds
        cx1, cy1 = max(0, x1 - margin), max(0, y1 - margin)
        cx2, cy2 = min(width, x2 + margin), min(height, y2 + margin)
        # Hide from the original pixels so overlapping regions do not compound.
        crop = frame[:, cy1:cy2, cx1:cx2]
        hidden = hide(crop.float() if integer else crop, region)
        inner = hidden[:, y1 - cy1 : y2 - cy1, x1 - cx1 : x2 - cx1]
        if integer:
            inner = inner.round().clamp(0, 255).to(frame.dtype)
        mask = region.crop_mask(bounds, frame.device)
        out[:, y1:y2, x1:x2] = torch.where(mask, inner, out[:, y1:y2, x1:x2])
    return out


class _CropOperation(Protocol):
    def __call__(self, crop: torch.Tensor, region: Region) -> torch.Tensor: ...


def gaussian_kernel1d(sigma: float, size: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def separable_gaussian(image: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Gaussian blur of a (C, H, W) tensor with reflect padding (replicate when the crop is too small)."""
    kernel = gaussian_kernel1d(sigma, size, image.device)
    channels = image.shape[0]
    pad = size // 2
    x = image.unsqueeze(0)
    mode = "reflect" if min(image.shape[1:]) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return x.squeeze(0)


_DIRECT_SIGMA = 4.0


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur. Fixed `kernel`/`sigma` (the paper: 9 and 10) or, by default, sigma scaled to the region.

    With `sigma=None`, sigma = `relative_sigma` x the region's shorter side (at least `min_sigma`), and the
    kernel spans +-3 sigma.
    """

    kernel: int | None = None
    sigma: float | None = None
    relative_sigma: float = 0.5
    min_sigma: float = 3.0

    def __post_init__(self) -> None:
        if self.kernel is not None and (self.kernel < 1 or self.kernel % 2 == 0):
            raise ValueError(f"blur kernel must be a positive odd integer, got {self.kernel}")
        if self.sigma is not None and self.sigma <= 0:
            raise ValueError(f"blur sigma must be positive, got {self.sigma}")

    def parameters_for(self, region: Region) -> tuple[float, int]:
        sigma = (
            self.sigma
            if self.sigma is not None
            else max(self.min_sigma, self.relative_sigma * min(region.width, region.height))
        )
        kernel = self.kernel if self.kernel is not None else 2 * math.ceil(3 * sigma) + 1
        return sigma, kernel

    def anonymize(self, frame: torch.Tensor, regions: Sequence[Region]) -> torch.Tensor:
        largest = max((self.parameters_for(r)[1] for r in regions), default=1)
        return _apply_per_region(frame, regions, largest // 2, self._blur)

    def _blur(self, crop: torch.Tensor, region: Region) -> torch.Tensor:
        sigma, size = self.parameters_for(region)
        if self.kernel is not None or sigma <= _DIRECT_SIGMA:
            return separable_gaussian(crop, sigma, size)
        # A wide Gaussian costs O(sigma) per pixel; on a copy shrunk by sigma / _DIRECT_SIGMA the same blur costs
        # O(1), and enlarging the already smooth result bilinearly changes it imperceptibly.
        height, width = crop.shape[1:]
        factor = sigma / _DIRECT_SIGMA
        small_size = (max(1, round(height / factor)), max(1, round(width / factor)))
        small = F.interpolate(crop.unsqueeze(0), size=small_size, mode="area")[0]
        small_sigma = sigma * small_size[1] / width
        blurred = separable_gaussian(small, small_sigma, 2 * math.ceil(3 * small_sigma) + 1)
        return F.interpolate(blurred.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0]


@dataclass(frozen=True)
class Pixelate:
    """Averages blocks; block side = region's shorter side / `blocks` (or a fixed `block` in pixels)."""

    blocks: int = 8
    block: int | None = None

    def block_for(self, region: Region) -> int:
        if self.block is not None:
            return max(1, self.block)
        return max(2, round(min(region.width, region.height) / self.blocks))

    def anonymize(self, frame: torch.Tensor, regions: Sequence[Region]) -> torch.Tensor:
        return _apply_per_region(frame, regions, 0, self._pixelate)

    def _pixelate(self, crop: torch.Tensor, region: Region) -> torch.Tensor:
        block = self.block_for(region)
        height, width = crop.shape[1:]
        pooled = F.avg_pool2d(crop.unsqueeze(0), block, stride=block, ceil_mode=True)
        up = pooled.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
        return up[0, :, :height, :width]


@dataclass(frozen=True)
class SolidMask:
    """One flat value over the region (the paper's "extreme" variant)."""

    value: float = 128.0

    def anonymize(self, frame: torch.Tensor, regions: Sequence[Region]) -> torch.Tensor:
        return _apply_per_region(frame, regions, 0, lambda crop, _region: torch.full_like(crop, self.value))
