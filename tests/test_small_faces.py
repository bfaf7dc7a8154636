"""Small faces: CenterFace's upscaled passes, their size cap and how several passes are merged."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError

from veilstream.detectors.centerface import CenterFaceDetector
from veilstream.detectors.config import CenterFaceBackendConfig, DetectorConfig
from veilstream.evaluation.labels import load_labels

from .conftest import MEDIA, video_frame

LABELS = Path(__file__).parents[1] / "datasets" / "privacy" / "labels.json"


@pytest.fixture(scope="module")
def detector() -> CenterFaceDetector:
    return CenterFaceDetector()


def test_pass_sizes_upscale_up_to_the_cap_and_never_below_the_frame(detector: CenterFaceDetector) -> None:
    detector.scales, detector.max_input_side = (2.0,), 1920
    assert detector.pass_sizes(768, 576) == [(1536, 1152)]
    assert detector.pass_sizes(1280, 720) == [(1920, 1080)], "1.5x: the cap"
    assert detector.pass_sizes(1920, 1080) == [(1920, 1080)], "no upscale, and no downscale because of the cap"
    assert detector.pass_sizes(3840, 2160) == [(3840, 2160)]
    detector.scales = (1.0, 2.0)
    assert detector.pass_sizes(768, 576) == [(768, 576), (1536, 1152)]
    assert detector.pass_sizes(1920, 1080) == [(1920, 1080)], "a pass the cap makes equal to another runs once"
    # The network input is the pass size padded, not stretched, to multiples of 32: 1080p keeps the 32 px grid.
    assert detector.window_grid(1920, 1080) == 32
    assert detector.window_grid(1280, 720) is None, "1.5x: no whole factor"
    detector.scales, detector.max_input_side, detector.in_size = (2.0,), None, (640, 480)
    assert detector.pass_sizes(1920, 1080) == [(1280, 960)], "the factor applies to in_size when it is set"
    detector.scales, detector.in_size = (1.0,), None


def _peak_outputs(blob: NDArray[np.float32], frame_box: tuple[float, float, float, float], frame_size: tuple[int, int],
                  score_of_width: dict[int, float]) -> list[NDArray[np.float32]]:  # fmt: skip
    """CenterFace outputs with one face at `frame_box` (frame pixels), scored by the pass's input width."""
    count, _, net_h, net_w = blob.shape
    sx, sy = net_w / frame_size[0], net_h / frame_size[1]
    heatmap = np.zeros((count, 1, net_h // 4, net_w // 4), np.float32)
    scale = np.zeros((count, 2, net_h // 4, net_w // 4), np.float32)
    offset = np.zeros_like(scale)
    x1, y1, x2, y2 = frame_box
    cx, cy = (x1 + x2) / 2 * sx, (y1 + y2) / 2 * sy
    row, col = int(cy // 4), int(cx // 4)
    heatmap[:, 0, row, col] = score_of_width[net_w]
    scale[:, 0, row, col] = math.log((y2 - y1) * sy / 4)
    scale[:, 1, row, col] = math.log((x2 - x1) * sx / 4)
    offset[:, 0, row, col] = cy / 4 - row - 0.5
    offset[:, 1, row, col] = cx / 4 - col - 0.5
    return [heatmap, scale, offset, np.zeros((count, 10, net_h // 4, net_w // 4), np.float32)]


def test_passes_at_several_scales_merge_into_one_box_per_face(
    detector: CenterFaceDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = np.zeros((96, 128, 3), np.uint8)
    face = (40.0, 20.0, 56.0, 40.0)
    scores = {128: 0.4, 256: 0.8}  # the upscaled pass is the surer one
    monkeypatch.setattr(detector, "_run", lambda blob: _peak_outputs(blob, face, (128, 96), scores))
    monkeypatch.setattr(detector, "scales", (1.0, 2.0))
    (found,) = detector.detect([frame])
    assert len(found) == 1, found
    (box,) = found
    assert box.score == pytest.approx(0.8)
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx(face, abs=0.01), "mapped back to frame pixels"
    monkeypatch.setattr(detector, "scales", (1.0,))
    assert [b.score for b in detector.detect([frame])[0]] == [pytest.approx(0.4)]


def test_scales_are_configured_per_backend_with_an_upscaled_default() -> None:
    config = DetectorConfig()
    (centerface,) = [b for b in config.backends if isinstance(b, CenterFaceBackendConfig)]
    assert centerface.scales == (2.0,) and centerface.max_input_side == 1920
    assert CenterFaceBackendConfig(scales=(1.0, 2.0)).scales == (1.0, 2.0)
    bad_settings: list[dict[str, object]] = [
        {"scales": []},
        {"scales": [0.0]},
        {"scales": [5.0]},
        {"max_input_side": 16},
    ]
    for bad in bad_settings:
        with pytest.raises(ValidationError):
            CenterFaceBackendConfig.model_validate(bad)
    with pytest.raises(ValueError, match="scales"):
        CenterFaceDetector(scales=())


@pytest.mark.slow
def test_the_upscaled_pass_finds_the_small_faces_one_pass_misses(detector: CenterFaceDetector) -> None:
    """vtest.avi frames 100, 300, 500, 700: labelled faces of 5-12 px; at 2x CenterFace finds nearly all of them,
    at 1x few."""
    labels = load_labels(LABELS)
    wanted = {100, 300, 500, 700}
    labelled = [f for f in labels.frames if f.media == "vtest.avi" and f.frame in wanted]
    frames = {f.frame: video_frame(MEDIA / "vtest.avi", f.frame) for f in labelled if f.frame is not None}
    faces = [(f.frame or 0, o.box) for f in labelled for o in f.objects if o.kind == "face" and not o.difficult]

    def found(scales: tuple[float, ...]) -> int:
        detector = CenterFaceDetector(scales=scales, max_input_side=1920)
        boxes = {index: detector.detect([frame])[0] for index, frame in frames.items()}
        return sum(
            any(b.x1 <= (x1 + x2) / 2 <= b.x2 and b.y1 <= (y1 + y2) / 2 <= b.y2 for b in boxes[index])
            for index, (x1, y1, x2, y2) in faces
        )

    one, two = found((1.0,)), found((2.0,))
    print(f"{len(faces)} labelled faces: 1x finds {one}, 2x {two}")
    assert len(faces) >= 10
    assert two >= len(faces) - 1, f"2x found {two} of {len(faces)} labelled faces"
    assert one <= len(faces) // 2, f"1x found {one}, 2x {two}"
