"""The shared pipeline fails closed: a frame whose stage fails is never emitted with raw pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from veilstream.anonymizers.filters import SolidMask
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.decoding.images import Frame, decode_frame
from veilstream.detectors.base import Detection, Kind
from veilstream.detectors.combined import CombinedDetector
from veilstream.detectors.finders import DetectorRegionFinder, residual_detections
from veilstream.outcome import Dropped, Masked, Published
from veilstream.pipeline import FailurePolicy, OnFailure, Pipeline, ResidualCheck
from veilstream.publishing.encoding import Encoder

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


def _pipeline(
    detector: ScriptedDetector,
    on_failure: OnFailure = "drop",
    residual: ResidualCheck = "off",
    correct: bool = True,
) -> Pipeline:
    encoder = Encoder()
    settings = CorrectionSettings(max_change=96, time_budget_ms=None)
    corrector = AdaptiveCorrector(Ensemble([tiny_classifier()]), settings, encoder=encoder) if correct else None
    return Pipeline(
        DetectorRegionFinder(detector),
        SolidMask(value=0),
        encoder,
        corrector,
        FailurePolicy(on_failure, residual),
        leak_detector=detector,
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
    assert [o.kind for o in outcomes] == ["published", "dropped", "published"]
    failed = outcomes[1]
    assert isinstance(failed, Dropped)
    assert failed.error.reason == "detect_failed"
    for outcome in (outcomes[0], outcomes[2]):
        assert isinstance(outcome, Published)
        assert outcome.faces == 1
        pixels = decode_frame(outcome.data)
        assert pixels[15:35, 25:55].mean() < 40, "the face box is masked in the published frame"


def test_mask_frame_policy_publishes_grey_never_raw() -> None:
    frames = _frames()
    outcomes = _pipeline(ScriptedDetector([BOX]), on_failure="mask_frame").process(frames)
    failed = outcomes[1]
    assert isinstance(failed, Masked)
    assert failed.error.reason == "detect_failed"
    pixels = decode_frame(failed.data)
    assert np.abs(pixels.astype(int) - 128).max() <= 2, "a fully grey frame, no trace of the original"


def test_correction_failure_is_fail_closed() -> None:
    frames = noise_frames(2, seed=4)
    pipeline = _pipeline(ScriptedDetector([BOX]))

    def broken(*_args: object) -> list[object]:
        raise RuntimeError("out of memory")

    assert pipeline.corrector is not None
    pipeline.corrector.correct = broken  # type: ignore[method-assign,assignment]
    outcomes = pipeline.process(frames)
    assert all(isinstance(o, Dropped) for o in outcomes)
    assert {o.error.reason for o in outcomes if isinstance(o, Dropped)} == {"correct_failed"}


def test_encoding_failure_is_fail_closed() -> None:
    pipeline = _pipeline(ScriptedDetector([BOX]), correct=False)

    def broken(_frame: Frame) -> bytes:
        raise RuntimeError("encoder crashed")

    object.__setattr__(pipeline.encoder, "encode", broken)
    (outcome,) = pipeline.process(noise_frames(1, seed=3))
    assert isinstance(outcome, Dropped)
    assert outcome.error.reason == "encode_failed"


def test_published_bytes_are_the_bytes_the_decisions_were_checked_on() -> None:
    (outcome,) = _pipeline(ScriptedDetector([BOX])).process(noise_frames(1, seed=8))
    assert isinstance(outcome, Published)
    assert outcome.correction is not None
    assert outcome.data == outcome.correction.encoded.data


def test_correction_off_runs_no_classifier_and_publishes_the_anonymized_frame() -> None:
    (outcome,) = _pipeline(ScriptedDetector([BOX]), correct=False).process(noise_frames(1, seed=2))
    assert isinstance(outcome, Published)
    assert outcome.correction is None
    assert "correct" not in outcome.timings_ms
    assert decode_frame(outcome.data)[15:35, 25:55].mean() < 40


def test_timings_per_stage_are_reported() -> None:
    outcome = _pipeline(ScriptedDetector([BOX]), residual="flag").process(noise_frames(1, seed=5))[0]
    assert set(outcome.timings_ms) >= {"detect", "anonymize", "correct", "residual_check"}
    assert all(v >= 0 for v in outcome.timings_ms.values())


def test_residual_detections_match_anonymized_objects_of_the_same_kind() -> None:
    anonymized = [Detection(0, 0, 40, 40, 0.9, "face")]
    again = [
        Detection(5, 5, 30, 30, 0.5, "face"),  # inside the anonymized face: residual
        Detection(5, 5, 30, 30, 0.5, "plate"),  # other kind: not this face
        Detection(100, 100, 120, 120, 0.5, "face"),  # elsewhere: a new face, not a residual
    ]
    assert residual_detections(anonymized, again) == [again[0]]


def test_residual_check_flags_a_frame_where_the_detector_still_fires() -> None:
    # The scripted detector finds the same box again on the published frame: a residual.
    outcome = _pipeline(ScriptedDetector([BOX]), residual="flag").process(noise_frames(1, seed=6))[0]
    assert isinstance(outcome, Published)
    assert [d.kind for d in outcome.residual] == ["face"]
    assert outcome.flagged


@pytest.mark.parametrize(("on_failure", "kind"), [("drop", Dropped), ("mask_frame", Masked)])
def test_residual_check_fail_applies_the_failure_policy(on_failure: OnFailure, kind: type) -> None:
    outcome = _pipeline(ScriptedDetector([BOX]), on_failure, "fail").process(noise_frames(1, seed=6))[0]
    assert isinstance(outcome, kind)
    assert outcome.error.reason == "residual_detection"  # type: ignore[union-attr]
    assert [d.kind for d in outcome.residual] == ["face"]


def test_residual_check_off_never_looks_again() -> None:
    detector = ScriptedDetector([BOX])
    outcome = _pipeline(detector, residual="off").process(noise_frames(1, seed=6))[0]
    assert outcome.residual == ()
    assert detector.calls == 1


@pytest.mark.parametrize("count", [0, 2])
def test_faces_and_plates_are_counted(count: int) -> None:
    boxes = [BOX, Detection(70, 40, 90, 50, 0.5, "plate")][:count]
    outcome = _pipeline(ScriptedDetector(boxes)).process(noise_frames(1, seed=7))[0]
    assert (outcome.faces, outcome.plates) == ((1, 1) if count else (0, 0))


class KindBackend:
    """A backend of one kind that counts the frames it is given."""

    def __init__(self, kind: Kind, box: Detection) -> None:
        self.kinds = frozenset({kind})
        self.box = box
        self.frames_seen = 0

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        self.frames_seen += len(frames)
        return [[self.box] for _ in frames]


def test_leak_check_runs_only_the_backends_of_the_anonymized_kinds() -> None:
    faces = KindBackend("face", BOX)
    plates = KindBackend("plate", Detection(70, 40, 90, 50, 0.5, "plate"))
    detector = CombinedDetector([faces, plates], padding={})
    pipeline = _pipeline(ScriptedDetector([BOX]), residual="flag", correct=False)
    pipeline.leak_detector = detector
    (outcome,) = pipeline.process(noise_frames(1, seed=6))
    assert faces.frames_seen == 1, "the face was anonymized: faces are looked for again"
    assert plates.frames_seen == 0, "no plate was anonymized: the plate backend does not run"
    assert [d.kind for d in outcome.residual] == ["face"]
    assert detector.detect_kinds(noise_frames(1, seed=6), None) == detector.detect(noise_frames(1, seed=6))


LEFT_HALF = Detection(20, 10, 40, 40, 0.9, "face")


class FindsMovedPixels:
    """Finds BOX on raw frames (noise); on published ones, a face in BOX's left half wherever its pixels moved off
    the mask's 0 (measured inside JPEG blocks of that half only, so the other half's changes do not bleed in)."""

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        found: list[list[Detection]] = []
        for frame in frames:
            if frame[10:40, 20:60].mean() > 60:
                found.append([BOX])
            else:
                found.append([LEFT_HALF] if np.abs(frame[16:40, 24:32].astype(int)).mean() > 2 else [])
        return found


@pytest.mark.parametrize("guard", [True, False])
def test_the_guard_keeps_the_correction_from_making_an_anonymized_face_detectable(guard: bool) -> None:
    detector = FindsMovedPixels()
    settings = CorrectionSettings(max_change=96, time_budget_ms=None)
    encoder = Encoder()
    pipeline = Pipeline(
        DetectorRegionFinder(detector),
        SolidMask(value=0),
        encoder,
        AdaptiveCorrector(Ensemble([tiny_classifier()]), settings, encoder=encoder),
        FailurePolicy("drop", "flag", guard_correction=guard),
        leak_detector=detector,
    )
    outcomes = pipeline.process(noise_frames(12, seed=4))
    stepped = [o for o in outcomes if isinstance(o, Published) and o.correction and o.correction.iterations]
    assert len(stepped) >= 3, "the test needs frames the correction steps"
    found_again = [o for o in outcomes if isinstance(o, Published) and o.residual]
    if guard:
        assert found_again == []
        for outcome in stepped:
            assert outcome.correction is not None
            assert np.array_equal(outcome.correction.pixels[10:40, 20:40], np.zeros((30, 20, 3), np.uint8))
    else:
        assert found_again, "without the guard the correction's steps are found again"


class BesideEachOther:
    """Two overlapping face boxes on every frame: one a third inside BOX (a residual), one mostly beside it."""

    kinds = frozenset({"face"})
    on_the_edge = Detection(50, 10, 80, 40, 0.6, "face")  # 10 of its 30 px inside BOX (20..60)
    beside = Detection(55, 10, 85, 40, 0.3, "face")  # IoU 0.71 with it; their union is only 10/35 inside BOX

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        return [[self.on_the_edge, self.beside] for _ in frames]


def test_a_residual_is_not_lost_by_merging_it_with_a_box_beside_it() -> None:
    pipeline = _pipeline(ScriptedDetector([BOX]), residual="flag", correct=False)
    pipeline.leak_detector = CombinedDetector([BesideEachOther()], padding={})
    (outcome,) = pipeline.process(noise_frames(1, seed=6))
    assert outcome.residual == (BesideEachOther.on_the_edge,)
    merged = pipeline.leak_detector.detect_kinds(noise_frames(1, seed=6), [{"face"}])
    assert residual_detections([BOX], merged[0]) == [], "merged, the residual would have been lost"
