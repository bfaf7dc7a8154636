"""The residual check looks around the anonymized boxes first, and agrees with the whole-frame check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import Frame
from veilstream.detectors.base import Detection
from veilstream.detectors.centerface import CenterFaceDetector
from veilstream.detectors.combined import CONFIRM_MARGIN, CombinedDetector
from veilstream.detectors.memory import FrameKey
from veilstream.detectors.windows import Window, windows_around, windows_on_grid, worth_windows
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


def test_grid_windows_have_their_edges_on_the_grid_and_cover_each_box_with_its_margin() -> None:
    boxes = [_box(100.5, 50, 130, 90), _box(150, 60, 170, 80), _box(700, 500, 760, 570)]
    windows = windows_on_grid(boxes, 768, 570, margin=40, grid=32)
    assert len(windows) == 2  # the first two boxes' windows overlap: joined
    assert not any(a.overlaps(b) for i, a in enumerate(windows) for b in windows[i + 1 :])
    for window in windows:
        assert all(edge % 32 == 0 or edge in (768, 570) for edge in window)
    for box in boxes:
        assert any(
            w.x1 <= max(0, box.x1 - 40)
            and w.x2 >= min(768, box.x2 + 40)
            and w.y1 <= max(0, box.y1 - 40)
            and w.y2 >= min(570, box.y2 + 40)
            for w in windows
        )


def test_windows_are_worth_it_only_under_most_of_the_frame() -> None:
    assert worth_windows([Window(0, 0, 64, 64)], 768, 576)
    assert worth_windows([Window(0, 0, 768, 300), Window(0, 320, 768, 480)], 768, 576)  # 80%
    assert not worth_windows([Window(0, 0, 768, 500)], 768, 576)  # 87%


@pytest.fixture(scope="module")
def centerface() -> CenterFaceDetector:
    return CenterFaceDetector(scales=(2.0,), max_input_side=1920)


def test_centerface_windows_are_on_its_grid_only_where_every_pass_resizes_by_a_whole_factor(
    centerface: CenterFaceDetector,
) -> None:
    assert centerface.window_grid(768, 576) == 32  # 2x: 1536 x 1152
    assert centerface.window_grid(1920, 1080) == 32  # 1x, padded (not stretched) to 1920 x 1088
    assert centerface.window_grid(810, 1080) is None
    fixed = CenterFaceDetector(in_size=(640, 480))
    assert fixed.window_grid(768, 576) is None


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


class _GridWindowed(_Windowed):
    """The fake with a grid: a flagged frame is confirmed in its windows (`detect_windows` at threshold None)."""

    def __init__(self, screen: list[Detection], whole: list[Detection], confirmed: list[Detection]) -> None:
        super().__init__(screen, whole)
        self.confirmed = confirmed
        self.confirm_windows: list[Sequence[Window]] = []

    def window_grid(self, width: int, height: int) -> int | None:
        return 32

    def pass_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        return [(2 * width, 2 * height)]  # as CenterFace's default 2x pass: the margin is half in frame pixels

    def detect_windows(
        self, frames: Sequence[Frame], windows: Sequence[Sequence[Window]], threshold: float | None = None
    ) -> list[list[Detection]]:
        if threshold is not None:
            return super().detect_windows(frames, windows, threshold)
        self.confirm_windows.extend(windows)
        return [list(self.confirmed) for _ in frames]


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


def test_a_flagged_frame_is_confirmed_in_grid_windows_at_the_detectors_threshold() -> None:
    anonymized = [_box(300, 200, 360, 260)]
    confirmed = [_box(322, 222, 338, 238)]
    backend = _GridWindowed(screen=[_box(320, 220, 340, 240)], whole=[_box(0, 0, 10, 10)], confirmed=confirmed)
    detector = CombinedDetector([backend], padding={"face": 0.0})  # type: ignore[list-item]
    assert detector.detect_kinds([_frame()], [{"face"}], [anonymized]) == [confirmed]
    assert backend.whole_runs == 0
    (windows,) = backend.confirm_windows
    assert windows == windows_on_grid(anonymized, 768, 576, CONFIRM_MARGIN // 2, 32)
    margin = CombinedDetector([backend], padding={"face": 0.0}, confirm_margin=None)  # type: ignore[list-item]
    assert margin.detect_kinds([_frame()], [{"face"}], [anonymized]) == [[_box(0, 0, 10, 10)]]
    assert backend.whole_runs == 1


def test_a_flagged_frame_whose_confirmation_windows_cover_most_of_it_gets_the_whole_frame_pass() -> None:
    corners = [_box(100, 100, 140, 140), _box(600, 100, 640, 140), _box(100, 400, 140, 440), _box(600, 400, 640, 440)]
    anonymized = [*corners, _box(350, 250, 390, 290)]  # windows joined into one over the whole frame
    backend = _GridWindowed(screen=[_box(110, 110, 130, 130)], whole=[_box(0, 0, 10, 10)], confirmed=[])
    detector = CombinedDetector([backend], padding={"face": 0.0})  # type: ignore[list-item]
    windows = windows_on_grid(anonymized, 768, 576, CONFIRM_MARGIN // 2, 32)
    assert not worth_windows(windows, 768, 576)
    assert detector.detect_kinds([_frame()], [{"face"}], [anonymized]) == [[_box(0, 0, 10, 10)]]
    assert backend.whole_runs == 1 and backend.confirm_windows == []


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
    whole = [sorted((d.x1, d.y1, d.x2, d.y2) for d in o.residual) for o in pipeline.finish(prepared)]
    pipeline.residual_scope = "around"
    around = [sorted((d.x1, d.y1, d.x2, d.y2) for d in o.residual) for o in pipeline.finish(prepared)]
    # The same boxes; a confirmation in windows computes them in other sums (differences of ~1e-5 px).
    assert [len(boxes) for boxes in around] == [len(boxes) for boxes in whole]
    for by_windows, by_frame in zip(around, whole, strict=True):
        assert [c for box in by_windows for c in box] == pytest.approx([c for box in by_frame for c in box], abs=0.01)
    if anonymizer["kind"] == "pixelate":
        assert sum(map(len, whole)) > 0, "no residual to compare: the weak anonymizer should leave some"


class _Recording:
    """Wraps a CenterFace detector's `detect_windows`: counts the confirmations (threshold None) per frame."""

    def __init__(self, centerface: CenterFaceDetector) -> None:
        self.original = centerface.detect_windows
        self.confirmed_frames = 0

    def __call__(
        self, frames: Sequence[Frame], windows: Sequence[Sequence[Window]], threshold: float | None = None
    ) -> list[list[Detection]]:
        if threshold is None:
            self.confirmed_frames += len(frames)
        return self.original(frames, windows, threshold)


@pytest.mark.parametrize("size", [None, (1920, 1080)], ids=["768x576", "1920x1080"])
@pytest.mark.parametrize(
    "anonymizer",
    [
        {"kind": "blur", "relative_sigma": 0.1},  # weak: faces are found again
        {"kind": "pixelate", "blocks": 16},
    ],
)
def test_confirmations_in_windows_flag_every_residual_the_whole_frame_flags(
    media: Path, anonymizer: dict[str, Any], size: tuple[int, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consecutive frames with the detection memory (its remembered boxes are where faces are found again),
    weak anonymizers: the windows must flag each residual box the whole frame flags, on frames they confirm.
    At 1080p (vtest upscaled) the network input is padded to 1088 rows: the windows keep the 32 px grid."""
    config = VeilstreamConfig.model_validate({"correction": {"enabled": False}, "anonymizer": anonymizer})
    pipeline = build_pipeline(config)
    assert isinstance(pipeline.leak_detector, CombinedDetector)
    centerface = pipeline.leak_detector.detectors[0]
    assert isinstance(centerface, CenterFaceDetector)
    first = 150
    frames = [video_frame(media / "vtest.avi", first + k) for k in range(12)]
    if size is not None:
        frames = [np.ascontiguousarray(cv2.resize(f, size, interpolation=cv2.INTER_CUBIC)) for f in frames]
    prepared = pipeline.prepare(frames, [FrameKey("vtest", first + k) for k in range(len(frames))])
    pipeline.residual_scope = "frame"
    whole = [o.residual for o in pipeline.finish(prepared)]
    recording = _Recording(centerface)
    monkeypatch.setattr(centerface, "detect_windows", recording)
    pipeline.residual_scope = "around"
    around = [o.residual for o in pipeline.finish(prepared)]
    assert recording.confirmed_frames >= 3, "too few frames confirmed in windows to compare"
    assert sum(map(len, whole)) >= 3, "no residual to compare: the weak anonymizer should leave some"
    for index, (by_frame, by_windows) in enumerate(zip(whole, around, strict=True)):
        for box in by_frame:
            assert any(box.iou(found) >= 0.9 for found in by_windows), (first + index, box, by_windows)
