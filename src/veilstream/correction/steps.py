"""A frame being stepped, and where a correction step takes its gradient: at the float frame (the paper), at the
published pixels, or through a differentiable JPEG of them.

A region is a (1, H, W) boolean mask; frames are (3, H, W) float tensors of RGB values in [0, 255].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from veilstream.geometry import BoxGeometry

GradientPoint = Literal["float", "published", "codec"]

_JPEG_BLOCK = 16  # one MCU with 4:2:0 chroma subsampling: the codec's blocks never straddle it


def mask_box(region: torch.Tensor, align: int = 1) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the mask's bounding box, widened to multiples of `align`."""
    rows = torch.nonzero(region[0].any(dim=1)).flatten()
    cols = torch.nonzero(region[0].any(dim=0)).flatten()
    height, width = region.shape[1:]
    top, left = int(rows[0]) // align * align, int(cols[0]) // align * align
    bottom = min(height, math.ceil((int(rows[-1]) + 1) / align) * align)
    right = min(width, math.ceil((int(cols[-1]) + 1) / align) * align)
    return top, bottom, left, right


def seen_by_classifier(
    current: torch.Tensor, published: torch.Tensor, region: torch.Tensor, point: GradientPoint, quality: int
) -> torch.Tensor:
    """What the classifiers see for the gradient step, as a function of `current`.

    float: the float frame itself (the paper). published: the decoded published pixels, with the gradient
    passed straight through to `current`. codec: the published pixels as well, with the gradient inside the
    region's JPEG blocks through kornia's differentiable JPEG (Reich et al., WACV 2024), so the step accounts
    for what quantisation will remove; outside those blocks there is no gradient (nothing there may move).
    """
    if point == "float":
        return current
    if point == "published":
        return current + (published - current).detach()
    from kornia.enhance import jpeg_codec_differentiable

    top, bottom, left, right = mask_box(region, _JPEG_BLOCK)
    crop = current[:, top:bottom, left:right]
    coded = jpeg_codec_differentiable(crop.unsqueeze(0) / 255, torch.tensor([float(quality)], device=crop.device))
    coded = coded.squeeze(0) * 255
    # Outside the region's blocks nothing may move, so no gradient path is needed there: the published pixels.
    seen = published.detach().clone()
    seen[:, top:bottom, left:right] = coded + (published[:, top:bottom, left:right] - coded).detach()
    return seen


# A box found again on the corrected frame that overlaps one found on the uncorrected frame this much was there
# before the correction (the anonymizer's, not the correction's); one overlapping a box put back this much was
# found again at that place.
SAME_PLACE_IOU = 0.3


@dataclass
class Stepping:
    """A frame being stepped: its anonymized pixels, region, bounds and current float pixels, on the device, and
    what the correction's guard put back so far."""

    anon: torch.Tensor
    region: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    current: torch.Tensor
    put_back_boxes: list[BoxGeometry] = field(default_factory=list)
    widened: bool = False

    @classmethod
    def start(cls, anon: torch.Tensor, region: torch.Tensor, max_change: int) -> Stepping:
        """`anon` (3, H, W) float, `region` (1, H, W) bool, owned by the new state (reverting shrinks it)."""
        low, high = (anon - max_change).clamp_min(0), (anon + max_change).clamp_max(255)
        return cls(anon, region, low, high, anon.clone())

    def bounded(self, move: torch.Tensor | None) -> torch.Tensor:
        """The current pixels plus `move`, inside the bounds."""
        if move is None:
            return self.current
        return torch.minimum(torch.maximum(self.current + move, self.low), self.high)

    def move(self, move: torch.Tensor | None) -> None:
        self.current = self.bounded(move)

    def revert(self, boxes: Sequence[BoxGeometry], grow: float = 0.0) -> None:
        """Put the pixels of `boxes` back to their anonymized values and take them out of the region; `grow`:
        each box first grown by that share of its width and height on every side."""
        height, width = self.region.shape[1:]
        for box in boxes:
            dx, dy = grow * box.width, grow * box.height
            x1, y1 = max(0, math.floor(box.x1 - dx)), max(0, math.floor(box.y1 - dy))
            x2, y2 = min(width, math.ceil(box.x2 + dx)), min(height, math.ceil(box.y2 + dy))
            self.region[:, y1:y2, x1:x2] = False
            self.current[:, y1:y2, x1:x2] = self.anon[:, y1:y2, x1:x2]

    def put_back(self, found: Sequence[BoxGeometry]) -> None:
        """Revert what the guard found. A detection also depends on the pixels around its box: one found again
        where its pixels already went back goes back with its surroundings (the box grown by its size on every
        side), and the next time every pixel does. At most two escalations, so the guard's loop ends."""
        again = [box for box in found if any(box.iou(old) > SAME_PLACE_IOU for old in self.put_back_boxes)]
        first = [box for box in found if not any(box is other for other in again)]
        if again and self.widened:
            self.revert_all()
        else:
            if again:
                self.revert(again, grow=1.0)
                self.widened = True
            self.revert(first)
        self.put_back_boxes = [*self.put_back_boxes, *found]

    def revert_all(self) -> None:
        """Every pixel back to its anonymized value, and nothing left to step."""
        self.region[:] = False
        self.current = self.anon.clone()
