"""Windows of a frame around given boxes, for looking again only where something was anonymized.

A fully convolutional detector (CenterFace) sees the same pixels at the same scale in a window as in the whole
frame, so around an anonymized box it finds what a whole-frame pass would find there, for a fraction of the
cost. The margin gives it context beyond the box; window sides are multiples of the network's alignment so a
pass resizes a window by exactly the factor it resizes the whole frame by.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

from veilstream.geometry import BoxGeometry

# Windows covering more than this share of the frame are not worth it: the whole frame costs about the same. A
# window costs what its pixels cost (CenterFace int8 at 2x: 0.46 ms for a 32 px window, 7.0 ms for 256 px, 27 ns
# per network pixel against 31 for the whole 768x576 frame); the rest of the share pays for the per-run overhead.
# At 0.5, 2 of 48 vtest frames still took a whole-frame confirmation (residual check 14-17 ms per frame; at 0.85,
# 11.5-12.3).
WHOLE_FRAME_SHARE = 0.85


class Window(NamedTuple):
    """Integer pixel bounds, x2 and y2 exclusive."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def overlaps(self, other: Window) -> bool:
        return self.x1 < other.x2 and other.x1 < self.x2 and self.y1 < other.y2 and other.y1 < self.y2

    def union(self, other: Window) -> Window:
        return Window(min(self.x1, other.x1), min(self.y1, other.y1), max(self.x2, other.x2), max(self.y2, other.y2))


def _aligned(start: float, end: float, limit: int, align: int) -> tuple[int, int]:
    """[start, end) grown to a multiple of `align` (centred), shifted to stay inside [0, limit); the whole
    range when it cannot fit."""
    low, high = math.floor(start), math.ceil(end)
    size = min(limit, math.ceil((high - low) / align) * align)
    low = max(0, min(low - (size - (high - low)) // 2, limit - size))
    return low, low + size


def windows_around(
    boxes: Iterable[BoxGeometry], width: int, height: int, margin: float = 0.5, min_margin: int = 16, align: int = 32
) -> list[Window]:
    """Non-overlapping windows covering every box grown by `margin` of its longer side (at least `min_margin`
    pixels) on each side, sides multiples of `align` where the frame allows, inside the `width` x `height`
    frame. Overlapping windows are joined, so no pixel is looked at twice."""
    windows: list[Window] = []
    for box in boxes:
        pad = max(min_margin, margin * max(box.x2 - box.x1, box.y2 - box.y1))
        x1, x2 = _aligned(max(0.0, box.x1 - pad), min(float(width), box.x2 + pad), width, align)
        y1, y2 = _aligned(max(0.0, box.y1 - pad), min(float(height), box.y2 + pad), height, align)
        if x2 > x1 and y2 > y1:
            windows.append(Window(x1, y1, x2, y2))
    return _joined(windows, lambda union: _realign(union, width, height, align))


def windows_on_grid(boxes: Iterable[BoxGeometry], width: int, height: int, margin: int, grid: int) -> list[Window]:
    """Non-overlapping windows covering every box grown by `margin` pixels on each side, every edge on a
    multiple of `grid` or on the frame's edge. Where a pass resizes the frame by a whole factor and `grid` times
    it is a multiple of the network's alignment, the network sees a window's pixels on the same grid of
    strides as in the whole frame, so away from the window's edges its features are the whole frame's (128 px
    around anonymized faces on vtest.avi, windows off the grid moved a residual's score by up to 0.26, windows
    on it by up to 0.03)."""
    windows: list[Window] = []
    for box in boxes:
        x1 = max(0, math.floor((box.x1 - margin) / grid) * grid)
        y1 = max(0, math.floor((box.y1 - margin) / grid) * grid)
        x2 = min(width, math.ceil((box.x2 + margin) / grid) * grid)
        y2 = min(height, math.ceil((box.y2 + margin) / grid) * grid)
        if x2 > x1 and y2 > y1:
            windows.append(Window(x1, y1, x2, y2))
    return _joined(windows, lambda union: union)  # a union of windows on the grid is on the grid


def _joined(windows: list[Window], fit: Callable[[Window], Window]) -> list[Window]:
    """Overlapping windows replaced by their union (passed through `fit`), until none overlap."""
    joined = True
    while joined:  # a union can reach windows it did not overlap before
        joined = False
        out: list[Window] = []
        for window in windows:
            for i, kept in enumerate(out):
                if kept.overlaps(window):
                    out[i] = fit(kept.union(window))
                    joined = True
                    break
            else:
                out.append(window)
        windows = out
    return windows


def _realign(window: Window, width: int, height: int, align: int) -> Window:
    x1, x2 = _aligned(window.x1, window.x2, width, align)
    y1, y2 = _aligned(window.y1, window.y2, height, align)
    return Window(x1, y1, x2, y2)


def worth_windows(windows: Iterable[Window], width: int, height: int) -> bool:
    """Whether looking in `windows` is cheaper than looking at the whole frame."""
    return sum(w.width * w.height for w in windows) < WHOLE_FRAME_SHARE * width * height
