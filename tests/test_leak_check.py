"""The leak check that can see misses: another detector on the whole published frame, and the policy on its finds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from veilstream.anonymizers.filters import SolidMask
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.decoding.images import Frame, decode_frame
from veilstream.detectors.base import Detection
from veilstream.detectors.finders import DetectorRegionFinder
from veilstream.detectors.leakcheck import LeakAction, LeakCheck
from veilstream.detectors.memory import FrameKey
from veilstream.outcome import Dropped, Masked, Published
from veilstream.pipeline import FailurePolicy, OnFailure, Pipeline
from veilstream.publishing.encoding import Encoder
from veilstream.runner import MemorySink, Origin, Runner, SourceItem
from veilstream.stats import figures

from .conftest import tiny_classifier

W, H = 160, 120
FACE = Detection(100, 60, 120, 80, 0.95, "face")  # where a face is in every frame
ELSEWHERE = Detection(10, 10, 30, 30, 0.9, "face")


class Finder:
    """Our detector: finds `boxes` in every frame (nothing = it misses the face)."""

    def __init__(self, boxes: Sequence[Detection] = ()) -> None:
        self.boxes = list(boxes)

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        return [list(self.boxes) for _ in frames]


class SeesVisibleFaces:
    """The independent detector: finds FACE wherever its pixels are still visible (our mask fills 0)."""

    def __init__(self) -> None:
        self.frames_seen = 0

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        self.frames_seen += len(frames)
        return [[FACE] if int(f[70, 110, 0]) != 0 else [] for f in frames]


class Crashes:
    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        raise RuntimeError("leak detector crashed")


def _frames(count: int = 1) -> list[Frame]:
    return [np.full((H, W, 3), 200, np.uint8) for _ in range(count)]


def _pipeline(
    found: Sequence[Detection] = (),
    on_leak: LeakAction = "flag",
    on_failure: OnFailure = "drop",
    every: int = 1,
    checker: object | None = None,
    correct: bool = False,
) -> Pipeline:
    encoder = Encoder("png")
    corrector = None
    if correct:
        settings = CorrectionSettings(max_change=96, time_budget_ms=None)
        corrector = AdaptiveCorrector(Ensemble([tiny_classifier()]), settings, encoder=encoder)
    check = LeakCheck(checker or SeesVisibleFaces(), every, on_leak, padding=0.5)  # type: ignore[arg-type]
    return Pipeline(
        DetectorRegionFinder(Finder(found)),
        SolidMask(value=0),
        encoder,
        corrector,
        FailurePolicy(on_failure, "off"),
        leak_check=check,
    )


def _visible(outcome: Published) -> bool:
    return int(decode_frame(outcome.data)[70, 110, 0]) != 0


def test_a_face_our_detector_missed_is_found_anywhere_in_the_published_frame_and_flagged() -> None:
    (outcome,) = _pipeline(found=[ELSEWHERE]).process(_frames())
    assert isinstance(outcome, Published)
    assert outcome.leak_checked and outcome.leaks == (FACE,)
    assert outcome.flagged, "a possible leak is worth a human look"
    assert outcome.residual == (), "the residual check only looks inside our regions: it cannot see this"
    assert _visible(outcome), "flag only: the frame is published as it was"


def test_a_face_we_hid_is_no_leak_because_the_check_sees_the_published_pixels() -> None:
    (outcome,) = _pipeline(found=[FACE]).process(_frames())
    assert isinstance(outcome, Published)
    assert outcome.leak_checked and outcome.leaks == () and not outcome.flagged


def test_a_frame_with_nothing_anonymized_is_checked_too() -> None:
    checker = SeesVisibleFaces()
    (outcome,) = _pipeline(checker=checker).process(_frames())
    assert checker.frames_seen == 1 and outcome.leaks == (FACE,)


@pytest.mark.parametrize("correct", [False, True])
def test_blur_hides_the_found_face_and_publishes(correct: bool) -> None:
    (outcome,) = _pipeline(on_leak="blur", correct=correct).process(_frames())
    assert isinstance(outcome, Published)
    assert outcome.leaks == (FACE,)
    assert not _visible(outcome), "the found face is blurred in the published bytes"
    (blurred,) = outcome.detections
    assert (blurred.x1, blurred.y1, blurred.x2, blurred.y2) == (90, 50, 130, 90), "with the face padding"
    assert "leak_blur" in outcome.timings_ms
    if correct:
        assert outcome.correction is not None
        assert outcome.correction.encoded.data == outcome.data, "decisions checked on the bytes published"


@pytest.mark.parametrize(("on_failure", "kind"), [("drop", Dropped), ("mask_frame", Masked)])
def test_fail_applies_the_failure_policy(on_failure: OnFailure, kind: type) -> None:
    (outcome,) = _pipeline(on_leak="fail", on_failure=on_failure).process(_frames())
    assert isinstance(outcome, kind)
    assert outcome.error.reason == "leak_detected"  # type: ignore[union-attr]
    assert outcome.leaks == (FACE,)


def test_a_check_that_fails_fails_the_frame_closed() -> None:
    (outcome,) = _pipeline(checker=Crashes()).process(_frames())
    assert isinstance(outcome, Dropped) and outcome.error.reason == "leak_check_failed"
    assert not outcome.leak_checked


def test_every_nth_frame_by_sequence_and_by_arrival_without_one() -> None:
    pipeline = _pipeline(every=3)
    keys = [FrameKey("cam", sequence) for sequence in range(6)]
    assert [o.leak_checked for o in pipeline.process(_frames(6), keys)] == [True, False, False] * 2
    pipeline = _pipeline(every=2)
    first, second = pipeline.process(_frames(3)), pipeline.process(_frames(3))
    checked = [o.leak_checked for o in first + second]
    assert checked == [True, False] * 3, "counted across batches"


def test_leaks_are_in_the_records_and_the_figures() -> None:
    sink = MemorySink()
    runner = Runner(_pipeline(every=2), [sink], batch_size=4, worker="test")
    runner.run(SourceItem(Origin("cam", sequence=i), frame) for i, frame in enumerate(_frames(4)))
    records = [p.record for p in sink.flushed]
    assert [(r.leak_checked, r.leaks, r.flagged) for r in records] == [(True, 1, True), (False, 0, False)] * 2
    assert records[0].leak_detections[0].x1 == FACE.x1
    totals = figures(records)
    assert (totals.leak_checked, totals.leaks, totals.leak_frames, totals.flagged) == (2, 2, 2, 2)


def test_leak_check_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="every"):
        LeakCheck(SeesVisibleFaces(), every=0)
    with pytest.raises(ValueError, match="on_leak"):
        LeakCheck(SeesVisibleFaces(), on_leak="ignore")  # type: ignore[arg-type]
