"""Regions to anonymize (boxes or ellipses in frame pixels) and their pixel masks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from veilstream.geometry import BoxGeometry

RegionShape = Literal["box", "ellipse"]


@dataclass(frozen=True)
class Region(BoxGeometry):
    """An axis-aligned area of a frame, in pixel coordinates (x2, y2 exclusive)."""

    x1: float
    y1: float
    x2: float
    y2: float
    shape: RegionShape = "box"

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.x1, self.y1, self.x2, self.y2)):
            raise ValueError(f"region coordinates must be finite, got {self}")
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError(f"region must have positive size, got x {self.x1}..{self.x2} y {self.y1}..{self.y2}")

    def padded(self, fraction: float) -> Region:
        """Grown by `fraction` of its size on every side."""
        dx, dy = self.width * fraction, self.height * fraction
        return Region(self.x1 - dx, self.y1 - dy, self.x2 + dx, self.y2 + dy, self.shape)

    def pixel_bounds(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """Integer (x1, y1, x2, y2) covering the region, clipped to the frame; None if outside it."""
        x1, y1 = max(0, math.floor(self.x1)), max(0, math.floor(self.y1))
        x2, y2 = min(width, math.ceil(self.x2)), min(height, math.ceil(self.y2))
        if x2 <= x1 or y2 <= y1:
            return None
        return x1, y1, x2, y2

    def crop_mask(self, bounds: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        """Boolean (h, w) mask of this region inside the integer crop `bounds`."""
        x1, y1, x2, y2 = bounds
        if self.shape == "box":
            return torch.ones((y2 - y1, x2 - x1), dtype=torch.bool, device=device)
        ys = torch.arange(y1, y2, device=device, dtype=torch.float32) + 0.5
        xs = torch.arange(x1, x2, device=device, dtype=torch.float32) + 0.5
        cy, cx = (self.y1 + self.y2) / 2, (self.x1 + self.x2) / 2
        ry, rx = self.height / 2, self.width / 2
        inside: torch.Tensor = ((ys[:, None] - cy) / ry) ** 2 + ((xs[None, :] - cx) / rx) ** 2 <= 1.0
        return inside


def region_mask(regions: Sequence[Region], height: int, width: int, device: torch.device) -> torch.Tensor:
    """Boolean (H, W) union of the regions' pixels."""
    mask = torch.zeros((height, width), dtype=torch.bool, device=device)
    for region in regions:
        bounds = region.pixel_bounds(height, width)
        if bounds is None:
            continue
        x1, y1, x2, y2 = bounds
        mask[y1:y2, x1:x2] |= region.crop_mask(bounds, device)
    return mask
