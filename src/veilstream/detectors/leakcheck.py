"""The leak check that can see misses: a face detector of another family looks at the whole published frame.

The residual check runs our own detectors again inside the regions we blurred, so it can never see a face they
missed. This one runs a different model (MTCNN) on the published pixels, and every face it finds, anywhere, is a
possible leak: counted in the records, and by `on_leak` flagged, blurred (the frame is anonymized again with the
found boxes and published) or failed (then the failure policy drops or masks the frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from veilstream.detectors.base import Detection, Detector
from veilstream.detectors.memory import FrameKey

LeakAction = Literal["flag", "blur", "fail"]
LEAK_ACTIONS: tuple[LeakAction, ...] = ("flag", "blur", "fail")


@dataclass
class LeakCheck:
    """`detector` (another model family than the one that found the regions) on every `every`-th frame: frames whose
    sequence number is a multiple of `every`, and every `every`-th frame without one. A found face is blurred
    with `padding` of its size on each side (the face padding) when `on_leak` is "blur"."""

    detector: Detector
    every: int = 1
    on_leak: LeakAction = "flag"
    padding: float = 0.5
    _unsequenced: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"leak check 'every' must be >= 1, got {self.every!r}")
        if self.on_leak not in LEAK_ACTIONS:
            raise ValueError(f"on_leak must be one of {LEAK_ACTIONS}, got {self.on_leak!r}")
        if self.padding < 0:
            raise ValueError(f"leak padding must be >= 0, got {self.padding!r}")

    def due(self, key: FrameKey | None) -> bool:
        """Whether this frame is checked; call once per published frame, in order."""
        if key is not None and key.sequence is not None:
            return key.sequence % self.every == 0
        due = self._unsequenced % self.every == 0
        self._unsequenced += 1
        return due

    def blur_boxes(self, leaks: tuple[Detection, ...], width: int, height: int) -> list[Detection]:
        """The regions that hide the found faces in a `width` x `height` frame."""
        boxes = (leak.padded(self.padding).clipped(width, height) for leak in leaks)
        return [box for box in boxes if box is not None]
