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

    def iou(self, other: BoxGeometry) -> float:
        """Intersection over union of the two boxes (a detection's kind is ignored)."""
        iw = min(self.x2, other.x2) - max(self.x1, other.x1)
        ih = min(self.y2, other.y2) - max(self.y1, other.y1)
        if iw <= 0 or ih <= 0:
            return 0.0
        inter = iw * ih
        return inter / (self.area + other.area - inter)
