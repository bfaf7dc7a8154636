"""CenterFace `precision: int8` (detectors/quantize.py; `auto`, the default, picks it for the shipped weights on the
CPU): the option reaches the network, the int8 model is built once and reused, other weights are refused, and the int8
network finds the faces the fp32 one finds on the face photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from veilstream.detectors import Detection
from veilstream.detectors import quantize as quantize_module
from veilstream.detectors.centerface import CenterFaceDetector, network_input
from veilstream.detectors.config import CenterFaceBackendConfig, DetectorConfig, build_backend
from veilstream.detectors.onnx_shapes import dynamic_shapes
from veilstream.detectors.quantize import (
    CACHE_FOLDER,
    activation_ranges,
    int8_model,
    measure_ranges,
    prepare,
)
from veilstream.detectors.weights import DEFAULT_FACE_WEIGHTS, resolve_weights
from veilstream.errors import ModelLoadError

from .conftest import read_rgb

# Photos with faces of 13-240 px; messi5.jpg is left out: its defocused crowd (an ignored area of the privacy set)
# holds only near-threshold boxes, which flip either way between fp32 and int8.
FACE_PHOTOS = ("bus.jpg", "zidane.jpg", "grace_hopper.jpg", "astronaut.png", "camera.png", "basketball1.png")


def iou(a: Detection, b: Detection) -> float:
    width = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    height = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = width * height
    return inter / ((a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fp32() -> CenterFaceDetector:
    return CenterFaceDetector(scales=(2.0,), max_input_side=1920)


@pytest.fixture(scope="module")
def int8(cache: Path) -> CenterFaceDetector:
    return CenterFaceDetector(scales=(2.0,), max_input_side=1920, precision="int8", cache=cache)


def test_precision_defaults_to_auto_and_accepts_only_auto_fp32_or_int8() -> None:
    assert CenterFaceBackendConfig().precision == "auto"
    assert all(getattr(b, "precision", "auto") == "auto" for b in DetectorConfig().backends)
    assert CenterFaceBackendConfig(precision="int8").precision == "int8"
    with pytest.raises(ValidationError, match="precision"):
        CenterFaceBackendConfig(precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be 'auto', 'fp32' or 'int8'"):
        CenterFaceDetector(precision="fp16")  # type: ignore[arg-type]


@pytest.mark.slow
def test_auto_runs_int8_for_the_shipped_weights_and_fp32_for_others(tmp_path: Path) -> None:
    assert CenterFaceDetector(precision="auto", cache=tmp_path).precision == "int8"
    other = tmp_path / "centerface-copy.onnx"  # a valid CenterFace file with other bytes
    other.write_bytes(dynamic_shapes(resolve_weights(DEFAULT_FACE_WEIGHTS).read_bytes()))
    assert CenterFaceDetector(weights=other, precision="auto", cache=tmp_path).precision == "fp32"


@pytest.mark.slow
def test_the_option_runs_the_int8_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, media: Path) -> None:
    monkeypatch.setenv("VEILSTREAM_CACHE", str(tmp_path))
    frame = read_rgb(media / "zidane.jpg")
    fp32 = build_backend(CenterFaceBackendConfig(precision="fp32"))
    int8 = build_backend(CenterFaceBackendConfig(precision="int8"))
    assert isinstance(int8, CenterFaceDetector)
    assert int8.precision == "int8"
    assert len(list((tmp_path / CACHE_FOLDER).glob("*.onnx"))) == 1
    # Same faces, other scores: the quantized network ran, not the fp32 one.
    faces_fp32, faces_int8 = fp32.detect([frame])[0], int8.detect([frame])[0]
    assert len(faces_fp32) == len(faces_int8) == 2
    pairs = [(a, max(faces_int8, key=lambda b: iou(a, b))) for a in faces_fp32]
    assert all(iou(a, b) > 0.7 for a, b in pairs)
    assert any(abs(a.score - b.score) > 1e-4 for a, b in pairs), pairs


@pytest.mark.slow
def test_int8_model_is_built_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_weights(DEFAULT_FACE_WEIGHTS)
    built = int8_model(source, tmp_path)
    assert built.parent == tmp_path / CACHE_FOLDER
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name]  # no scratch folder left behind
    stamp = built.stat().st_mtime_ns

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cached int8 model was built again")

    monkeypatch.setattr(quantize_module, "quantize", no_rebuild)
    assert int8_model(source, tmp_path) == built
    assert built.stat().st_mtime_ns == stamp
    # Another onnxruntime may quantize differently: its model gets its own key, so it is built anew.
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "0.0.0-other")
    with pytest.raises(AssertionError, match="built again"):
        int8_model(source, tmp_path)


@pytest.mark.slow
def test_int8_refuses_weights_it_was_not_calibrated_for(tmp_path: Path) -> None:
    # A valid CenterFace file with other bytes (the shape-rewritten copy): fp32 loads it, int8 refuses it.
    other = tmp_path / "centerface-copy.onnx"
    other.write_bytes(dynamic_shapes(resolve_weights(DEFAULT_FACE_WEIGHTS).read_bytes()))
    assert CenterFaceDetector(weights=other).precision == "fp32"
    with pytest.raises(ModelLoadError, match="calibrated ranges only"):
        CenterFaceDetector(weights=other, precision="int8", cache=tmp_path)
    assert not (tmp_path / CACHE_FOLDER).exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", FACE_PHOTOS)
def test_int8_finds_the_faces_fp32_finds(
    name: str, fp32: CenterFaceDetector, int8: CenterFaceDetector, media: Path
) -> None:
    frame = read_rgb(media / name)
    expected = [f for f in fp32.detect([frame])[0] if f.score >= 0.3]
    found = int8.detect([frame])[0]
    assert expected, f"fp32 finds no face in {name}"
    missed = [f for f in expected if not any(iou(f, g) >= 0.5 for g in found)]
    assert not missed, f"int8 misses {missed} in {name}; it found {found}"


@pytest.mark.slow
def test_shipped_ranges_hold_a_calibration_photo(media: Path, fp32: CenterFaceDetector) -> None:
    # The table is the MinMax over the calibration set, which holds this photo at the default pass size: this photo's
    # own ranges lie inside it, and it names every tensor the calibrator sees.
    frame = read_rgb(media / "grace_hopper.jpg")
    ((width, height),) = fp32.pass_sizes(frame.shape[1], frame.shape[0])
    blob = network_input([frame], (width, height))
    measured = measure_ranges(prepare(resolve_weights(DEFAULT_FACE_WEIGHTS).read_bytes()), [blob.astype(np.float32)])
    shipped = activation_ranges()
    assert set(measured) == set(shipped)
    outside = {
        name: (low, high, shipped[name])
        for name, (low, high) in measured.items()
        if low < shipped[name][0] - 1e-3 * abs(shipped[name][0])
        or high > shipped[name][1] + 1e-3 * abs(shipped[name][1])
    }
    assert not outside, outside


@pytest.mark.gpu
def test_int8_on_cuda_stays_fp32() -> None:
    assert CenterFaceDetector(device="cuda", precision="int8").precision == "fp32"
