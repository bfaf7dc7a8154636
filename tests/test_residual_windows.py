"""The residual check looks around the anonymized boxes first, and agrees with the whole-frame check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import Frame
from veilstream.detectors.base import Detection
from veilstream.detectors.centerface import CenterFaceDetector
from veilstream.detectors.combined import CombinedDetector
from veilstream.detectors.windows import Window, windows_around, worth_windows
from veilstream.factory import build_pipeline

from .conftest import read_rgb, video_frame

PHOTOS = ("grace_hopper.jpg", "zidane.jpg", "messi5.jpg")


def _box(x1: float, y1: float, x2: float, y2: float, kind: str = "face") -> Detection:
    return Detection(x1, y1, x2, y2, 0.9, kind)  # type: ignore[arg-type]


def test_windows_are_aligned_inside_the_frame_and_cover_each_box_with_its_margin() -> None:
    boxes = [_box(100, 50, 130, 90), _box(700, 500, 760, 570)]
    windows = windows_around(boxes, 768, 576, margin=0.5, min_margin=16)
    assert len(windows) == 2
    for window in windows:
        assert 0 <= window.x1 < window.x2 <= 768 and 0 <= window.y1 < window.y2 <= 576
        assert window.width % 32 == 0 and window.height % 32 == 0
    for box, window in zip(boxes, windows, strict=True):
        pad = max(16, 0.5 * max(box.x2 - box.x1, box.y2 - box.y1))
        assert window.x1 <= max(0, box.x1 - pad) and window.x2 >= min(768, box.x2 + pad)
        assert window.y1 <= max(0, box.y1 - pad) and window.y2 >= min(576, box.y2 + pad)


def test_overlapping_windows_are_joined_until_none_overlap() -> None:
    boxes = [_box(100, 100, 140, 140), _box(150, 100, 190, 140), _box(400, 300, 420, 330)]
    windows = windows_around(boxes, 768, 576)
    assert len(windows) == 2
    assert not any(a.overlaps(b) for i, a in enumerate(windows) for b in windows[i + 1 :])


def test_a_frame_too_small_to_align_gets_the_whole_side() -> None:
    (window,) = windows_around([_box(5, 5, 15, 15)], 40, 20)
    assert window == Window(0, 0, 32, 20)


def test_windows_are_worth_it_only_under_half_the_frame() -> None:
    assert worth_windows([Window(0, 0, 64, 64)], 768, 576)
    assert not worth_windows([Window(0, 0, 768, 300)], 768, 576)


@pytest.fixture(scope="module")
def centerface() -> CenterFaceDetector:
    return CenterFaceDetector(scales=(2.0,), max_input_side=1920)


@pytest.mark.parametrize("name", PHOTOS)
def test_a_window_sees_the_faces_the_whole_frame_sees(centerface: CenterFaceDetector, media: Path, name: str) -> None:
    frame = read_rgb(media / name)
    whole = centerface.detect([frame])[0]
    assert whole, f"no face in {name}"
    windows = windows_around(whole, frame.shape[1], frame.shape[0])
    inside = centerface.detect_windows([frame], [windows])[0]
    for face in (f for f in whole if f.score >= 0.5):  # near the threshold, scores depend on context
        best = max((face.iou(found) for found in inside), default=0.0)
        assert best >= 0.8, (name, face, inside)


class _Windowed:
    """A fake windowed backend: `screen` boxes from the window pass, `whole` from the whole-frame pass."""

    kinds = frozenset({"face"})
    threshold = 0.2

    def __init__(self, screen: list[Detection], whole: list[Detection]) -> None:
        self.screen, self.whole = screen, whole
        self.whole_runs = 0
        self.screen_thresholds: list[float | None] = []

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        self.whole_runs += len(frames)
        return [list(self.whole) for _ in frames]

    def detect_windows(
        self, frames: Sequence[Frame], windows: Sequence[Sequence[Window]], threshold: float | None = None
    ) -> list[list[Detection]]:
        self.screen_thresholds.append(threshold)
        return [list(self.screen) for _ in frames]


def _frame() -> Frame:
    import numpy as np

    return np.zeros((576, 768, 3), np.uint8)


def test_a_screened_box_on_an_anonymized_box_sends_the_frame_to_the_whole_frame_pass() -> None:
    anonymized = [_box(300, 200, 360, 260)]
    backend = _Windowed(screen=[_box(320, 220, 340, 240)], whole=[_box(321, 221, 339, 239), _box(0, 0, 10, 10)])
    detector = CombinedDetector([backend], padding={"face": 0.0})  # type: ignore[list-item]
    found = detector.detect_kinds([_frame()], [{"face"}], [anonymized])
    assert backend.whole_runs == 1
    assert found == detector.detect([_frame()])  # exactly what the whole-frame pass gives
    assert backend.screen_thresholds == [pytest.approx(0.2 * detector.screen_factor)]


def test_a_frame_whose_screen_finds_nothing_on_its_boxes_skips_the_whole_frame_pass() -> None:
    anonymized = [_box(300, 200, 360, 260)]
    elsewhere = _box(100, 100, 120, 120)  # in a window's margin at most, not on the anonymized box
    backend = _Windowed(screen=[elsewhere], whole=[_box(320, 220, 340, 240)])
    detector = CombinedDetector([backend], padding={"face": 0.0})  # type: ignore[list-item]
    assert detector.detect_kinds([_frame()], [{"face"}], [anonymized]) == [[]]
    assert backend.whole_runs == 0


def test_without_boxes_to_look_around_or_when_windows_cost_more_the_whole_frame_is_used() -> None:
    backend = _Windowed(screen=[], whole=[_box(320, 220, 340, 240)])
    detector = CombinedDetector([backend], padding={"face": 0.0})  # type: ignore[list-item]
    detector.detect_kinds([_frame()], [{"face"}], None)
    assert backend.whole_runs == 1 and backend.screen_thresholds == []
    huge = [_box(0, 0, 700, 500)]
    detector.detect_kinds([_frame()], [{"face"}], [huge])
    assert backend.whole_runs == 2 and backend.screen_thresholds == []


def _vtest(media: Path, count: int, step: int, first: int) -> list[Frame]:
    return [video_frame(media / "vtest.avi", first + k * step) for k in range(count)]


@pytest.mark.parametrize(
    "anonymizer",
    [
        {"kind": "blur", "relative_sigma": 0.04},  # weak: faces are found again
        {"kind": "pixelate", "blocks": 6},
        {"kind": "blur"},  # the default
    ],
)
def test_around_flags_the_same_residuals_as_the_whole_frame(media: Path, anonymizer: dict[str, Any]) -> None:
    config = VeilstreamConfig.model_validate({"correction": {"enabled": False}, "anonymizer": anonymizer})
    pipeline = build_pipeline(config)
    frames = _vtest(media, 12, 25, 11)
    prepared = pipeline.prepare(frames)
    pipeline.residual_scope = "frame"
    whole = [[(d.x1, d.y1, d.x2, d.y2) for d in o.residual] for o in pipeline.finish(prepared)]
    pipeline.residual_scope = "around"
    around = [[(d.x1, d.y1, d.x2, d.y2) for d in o.residual] for o in pipeline.finish(prepared)]
    assert around == whole
    if anonymizer["kind"] == "pixelate":
        assert sum(map(len, whole)) > 0, "no residual to compare: the weak anonymizer should leave some"
