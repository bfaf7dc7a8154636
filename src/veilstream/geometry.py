"""Box geometry shared by detections (what was found) and regions (what is anonymized)."""

from __future__ import annotations


class BoxGeometry:
    """Size of an axis-aligned box in frame pixels (x2, y2 exclusive); the subclass holds the coordinates."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height
