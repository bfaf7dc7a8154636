"""The shared pipeline fails closed: a frame whose stage fails is never emitted with raw pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from veilstream.codec import Frame, decode_frame
from veilstream.correction.anonymizers import SolidMask
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.correction.regions import Region
from veilstream.detectors.base import Detection
from veilstream.pipeline import DetectorRegionFinder, FoundRegions, Pipeline, residual_detections

from .conftest import noise_frames, tiny_classifier


class ScriptedDetector:
    """Returns fixed boxes; raises on frames whose top-left pixel is 0 (a 'poisoned' frame)."""

    def __init__(self, boxes: list[Detection]) -> None:
        self.boxes = boxes
        self.calls = 0

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        self.calls += 1
        if any(int(f[0, 0, 0]) == 0 for f in frames):
            raise RuntimeError("detector crashed")
        return [list(self.boxes) for _ in frames]


def _pipeline(detector: ScriptedDetector, on_failure: str = "drop", residual: bool = False) -> Pipeline:
    corrector = AdaptiveCorrector(Ensemble([tiny_classifier()]), CorrectionSettings(max_change=96, time_budget_ms=None))
    return Pipeline(
        DetectorRegionFinder(detector),
        SolidMask(value=0),
        corrector,
        on_failure,  # type: ignore[arg-type]
        residual_detector=detector if residual else None,
    )


def _frames() -> list[Frame]:
    frames = noise_frames(3, seed=9)
    for frame in frames:
        frame[0, 0] = 200
    frames[1][0, 0] = 0  # poisoned
    return frames


BOX = Detection(20, 10, 60, 40, 0.9, "face")


def test_a_failing_frame_is_dropped_alone() -> None:
    frames = _frames()
    outcomes = _pipeline(ScriptedDetector([BOX])).process(frames)
    assert [o.ok for o in outcomes] == [True, False, True]
    failed = outcomes[1]
    assert failed.published is None
    assert failed.error is not None
    assert failed.error.reason == "detect_failed"
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.found is not None
        assert outcome.found.faces == 1
        pixels = decode_frame(outcome.published or b"")
        assert pixels[15:35, 25:55].mean() < 40, "the face box is masked in the published frame"


def test_mask_frame_policy_publishes_grey_never_raw() -> None:
    frames = _frames()
    outcomes = _pipeline(ScriptedDetector([BOX]), on_failure="mask_frame").process(frames)
    failed = outcomes[1]
    assert failed.error is not None
    assert failed.published is not None
    pixels = decode_frame(failed.published)
    assert np.abs(pixels.astype(int) - 128).max() <= 2, "a fully grey frame, no trace of the original"


def test_correction_failure_is_fail_closed() -> None:
    frames = noise_frames(2, seed=4)
    pipeline = _pipeline(ScriptedDetector([BOX]))

    def broken(*_args: object) -> list[object]:
        raise RuntimeError("out of memory")

    pipeline.corrector.correct = broken  # type: ignore[method-assign,assignment]
    outcomes = pipeline.process(frames)
    assert all(o.published is None for o in outcomes)
    assert {o.error.reason for o in outcomes if o.error} == {"correct_failed"}


def test_timings_per_stage_are_reported() -> None:
    outcome = _pipeline(ScriptedDetector([BOX]), residual=True).process(noise_frames(1, seed=5))[0]
    assert set(outcome.timings_ms) >= {"detect", "anonymize", "correct", "residual_check"}
    assert all(v >= 0 for v in outcome.timings_ms.values())


def test_residual_detections_match_anonymized_objects_of_the_same_kind() -> None:
    found = FoundRegions((Region(0, 0, 10, 10),), (Detection(0, 0, 40, 40, 0.9, "face"),))
    again = [
        Detection(5, 5, 30, 30, 0.5, "face"),  # inside the anonymized face: residual
        Detection(5, 5, 30, 30, 0.5, "plate"),  # other kind: not this face
        Detection(100, 100, 120, 120, 0.5, "face"),  # elsewhere: a new face, not a residual
    ]
    assert residual_detections(found, again) == [again[0]]


def test_residual_check_flags_a_frame_where_the_detector_still_fires() -> None:
    # The scripted detector finds the same box again on the published frame: a residual.
    outcome = _pipeline(ScriptedDetector([BOX]), residual=True).process(noise_frames(1, seed=6))[0]
    assert [d.kind for d in outcome.residual] == ["face"]


@pytest.mark.parametrize("count", [0, 2])
def test_faces_and_plates_are_counted(count: int) -> None:
    boxes = [BOX, Detection(70, 40, 90, 50, 0.5, "plate")][:count]
    outcome = _pipeline(ScriptedDetector(boxes)).process(noise_frames(1, seed=7))[0]
    assert outcome.found is not None
    assert (outcome.found.faces, outcome.found.plates) == ((1, 1) if count else (0, 0))
