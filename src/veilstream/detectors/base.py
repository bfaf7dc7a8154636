"""Detections (boxes in frame pixels) and the `Detector` protocol every backend implements."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from veilstream.geometry import BoxGeometry

Kind = Literal["face", "plate"]
KINDS: tuple[Kind, ...] = ("face", "plate")

Frame = NDArray[np.uint8]
"""An RGB image, uint8, shape (H, W, 3)."""


@dataclass(frozen=True)
class Detection(BoxGeometry):
    """An axis-aligned box in frame pixels (x2, y2 exclusive) with a confidence in [0, 1]."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    kind: Kind

    def __post_init__(self) -> None:
        for name in ("x1", "y1", "x2", "y2", "score"):
            value = getattr(self, name)
            # bool is an int subclass; a True coordinate is a bug, not a 1.
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                raise TypeError(f"Detection.{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Detection.{name} must be finite, got {value!r}")
            # Plain floats keep the dataclass hashable, comparable and serializable.
            object.__setattr__(self, name, float(value))
        if self.x2 <= self.x1:
            raise ValueError(f"Detection needs x2 > x1, got x1={self.x1!r} x2={self.x2!r}")
        if self.y2 <= self.y1:
            raise ValueError(f"Detection needs y2 > y1, got y1={self.y1!r} y2={self.y2!r}")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Detection.score must be in [0, 1], got {self.score!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Detection.kind must be one of {KINDS}, got {self.kind!r}")

    def padded(self, fraction: float) -> Detection:
        """Grown by `fraction` of its width (height) on the left and right (top and bottom)."""
        if not math.isfinite(fraction) or fraction < 0:
            raise ValueError(f"padding fraction must be finite and >= 0, got {fraction!r}")
        dx, dy = self.width * fraction, self.height * fraction
        return Detection(self.x1 - dx, self.y1 - dy, self.x2 + dx, self.y2 + dy, self.score, self.kind)

    def clipped(self, width: int, height: int) -> Detection | None:
        """Restricted to a `width` x `height` frame; None if nothing of it lies inside."""
        x1, y1 = max(0.0, self.x1), max(0.0, self.y1)
        x2, y2 = min(float(width), self.x2), min(float(height), self.y2)
        if x2 <= x1 or y2 <= y1:
            return None
        return Detection(x1, y1, x2, y2, self.score, self.kind)

    def scaled(self, sx: float, sy: float) -> Detection:
        """Coordinates multiplied by (sx, sy): maps a box between two resolutions of a frame."""
        if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
            raise ValueError(f"scale factors must be finite and > 0, got sx={sx!r} sy={sy!r}")
        return Detection(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy, self.score, self.kind)

    def union(self, other: Detection) -> Detection:
        """The smallest box holding both, with the higher score; kinds must match."""
        if other.kind != self.kind:
            raise ValueError(f"cannot merge a {self.kind} box with a {other.kind} box")
        return Detection(
            min(self.x1, other.x1),
            min(self.y1, other.y1),
            max(self.x2, other.x2),
            max(self.y2, other.y2),
            max(self.score, other.score),
            self.kind,
        )


@runtime_checkable
class Detector(Protocol):
    """Finds faces and/or plates in a batch of frames."""

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        """One list of detections per input frame, in input order; frames are RGB uint8 (H, W, 3)."""
        ...


def check_frames(frames: Sequence[Frame]) -> None:
    """Raise ValueError unless every frame is an RGB uint8 (H, W, 3) array with H, W > 0."""
    for index, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray):
            raise TypeError(f"frame {index} must be a numpy array, got {type(frame).__name__}")
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame {index} must be RGB uint8 of shape (H, W, 3), got {frame.dtype} {frame.shape}")
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise ValueError(f"frame {index} is empty: shape {frame.shape}")
