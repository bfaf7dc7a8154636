"""What happened to one frame: published, masked or dropped. Every sink and record reads this, nothing else.

Each variant carries exactly what it has. A `Published` frame holds its anonymized (and, when correction is on,
corrected) bytes; a `Masked` frame failed but the policy publishes it fully grey; a `Dropped` frame is never
published and goes to the dead letters with its error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from veilstream.correction.corrector import CorrectionResult
from veilstream.detectors.base import Detection
from veilstream.errors import FrameError

OutcomeKind = Literal["published", "masked", "dropped"]


def _count(detections: tuple[Detection, ...], kind: str) -> int:
    return sum(1 for d in detections if d.kind == kind)


@dataclass(frozen=True)
class _Found:
    """What the detect and leak-check stages saw (empty for simulated regions or a frame that never got there).

    `detections` are the anonymized objects, `remembered` those of them kept from the camera's earlier frames
    (the detectors missed them here). `leaks` are the faces the independent leak check found anywhere in the
    published frame, and `leak_checked` says whether it looked at this frame at all (it may run every Nth frame).
    """

    detections: tuple[Detection, ...] = ()
    residual: tuple[Detection, ...] = ()
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    remembered: tuple[Detection, ...] = field(default=(), kw_only=True)
    leaks: tuple[Detection, ...] = field(default=(), kw_only=True)
    leak_checked: bool = field(default=False, kw_only=True)

    @property
    def faces(self) -> int:
        return _count(self.detections, "face")

    @property
    def plates(self) -> int:
        return _count(self.detections, "plate")

    @property
    def residual_faces(self) -> int:
        return _count(self.residual, "face")

    @property
    def residual_plates(self) -> int:
        return _count(self.residual, "plate")


@dataclass(frozen=True)
class Published(_Found):
    """Anonymized bytes to publish. `correction` is None when correction is disabled (no classifier ran)."""

    kind: ClassVar[OutcomeKind] = "published"
    data: bytes = b""
    correction: CorrectionResult | None = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("a published outcome needs its bytes")

    @property
    def flagged(self) -> bool:
        """Worth a human look: an anonymized object found again, a possible leak, or a decision not kept."""
        return (
            bool(self.residual) or bool(self.leaks) or (self.correction is not None and not self.correction.consistent)
        )


@dataclass(frozen=True)
class Masked(_Found):
    """A frame that failed (`error`) and is published fully masked by policy; never the raw pixels."""

    kind: ClassVar[OutcomeKind] = "masked"
    data: bytes = b""
    error: FrameError = field(default_factory=lambda: FrameError("unknown", ""))
    flagged: ClassVar[bool] = True
    correction: ClassVar[None] = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("a masked outcome needs its bytes")


@dataclass(frozen=True)
class Dropped(_Found):
    """A frame that is not published; it goes to the dead letters (or the error list) with `error`."""

    kind: ClassVar[OutcomeKind] = "dropped"
    error: FrameError = field(default_factory=lambda: FrameError("unknown", ""))
    flagged: ClassVar[bool] = True
    correction: ClassVar[None] = None


FrameOutcome = Published | Masked | Dropped
