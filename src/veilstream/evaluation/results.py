"""What one published frame shows of its labelled objects: per object, per detection, and the blurred area."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from veilstream.detectors.base import Detection, Kind
from veilstream.evaluation.labels import Box, LabelledFrame, LabelledObject
from veilstream.evaluation.measures import (
    ANONYMIZED_BELOW,
    BlurredArea,
    Mask,
    blurred_area,
    coverage,
    detail_kept,
    detection_verdict,
    grey,
    is_anonymized,
)
from veilstream.outcome import OutcomeKind

Pixels = npt.NDArray[np.uint8]
# Padding a detector may add around a true face without it counting as blur "away from" the face: the default
# face padding (0.5 of the box on each side).
NEAR_MARGIN = 0.5


@dataclass(frozen=True)
class ObjectResult:
    media: str
    frame: int | None
    label: LabelledObject
    outcome: OutcomeKind
    detail_kept: float | None
    coverage: float
    anonymized: bool

    @property
    def leaked(self) -> bool:
        return not self.anonymized and not self.label.difficult


@dataclass(frozen=True)
class DetectionResult:
    kind: Kind
    box: Box
    score: float
    verdict: str


@dataclass(frozen=True)
class FrameResult:
    media: str
    frame: int | None
    outcome: OutcomeKind
    objects: tuple[ObjectResult, ...]
    detections: tuple[DetectionResult, ...]
    area: BlurredArea | None
    leak_check: tuple[dict[str, object], ...] = field(default=())

    @property
    def leaks(self) -> int:
        return sum(1 for o in self.objects if o.leaked)


def object_anonymized(outcome: OutcomeKind, kept: float | None, covered: float, threshold: float) -> bool:
    """Hidden: never published (dropped), or published with little of its detail left. A flat box (no detail to
    judge) counts as hidden when the blurred regions cover most of it."""
    if outcome == "dropped":
        return True
    decided = is_anonymized(kept, threshold)
    return covered >= 0.5 if decided is None else decided


def measure_frame(
    labelled: LabelledFrame,
    original: Pixels | None,
    published: Pixels | None,
    blurred: Mask | None,
    detections: Sequence[Detection],
    outcome: OutcomeKind,
    threshold: float = ANONYMIZED_BELOW,
) -> FrameResult:
    """Measure one frame. `published` and `blurred` (the anonymized regions' pixels) are None for a dropped frame,
    and `original` too when the input never decoded."""
    if (published is None) != (outcome == "dropped") or (blurred is None) != (published is None):
        raise ValueError("a dropped frame has no published pixels and no blurred mask; every other frame has both")
    pair = None
    if published is not None:
        if original is None or published.shape != original.shape:
            raise ValueError("a published frame is measured against its original of the same size")
        pair = grey(original), grey(published)
    objects = []
    for item in labelled.objects:
        kept = None if pair is None else detail_kept(pair[0], pair[1], item.box)
        covered = 0.0 if blurred is None else coverage(item.box, blurred)
        hidden = object_anonymized(outcome, kept, covered, threshold)
        objects.append(ObjectResult(labelled.media, labelled.frame, item, outcome, kept, covered, hidden))
    verdicts = []
    for found in detections:
        box = (found.x1, found.y1, found.x2, found.y2)
        same = [o for o in labelled.objects if o.kind == found.kind]
        verdict = detection_verdict(
            box, [o.box for o in same if not o.difficult], [o.box for o in same if o.difficult], labelled.ignore
        )
        verdicts.append(DetectionResult(found.kind, box, found.score, verdict))
    area = None
    if blurred is not None:
        judged = [o.box for o in labelled.objects] + list(labelled.ignore)
        area = blurred_area(blurred, judged, NEAR_MARGIN)
    return FrameResult(labelled.media, labelled.frame, outcome, tuple(objects), tuple(verdicts), area)
