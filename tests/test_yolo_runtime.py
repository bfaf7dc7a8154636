"""YOLO on ultralytics' ONNX backend: runtime choice, the cached export, its errors, and agreement with torch on
real frames (slow: the shipped plate model)."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from veilstream.detectors import (
    Detection,
    DetectorConfig,
    Frame,
    Kind,
    YoloBackendConfig,
    build_detector,
    resolve_weights,
)
from veilstream.detectors.config import build_backend
from veilstream.detectors.weights import DEFAULT_PLATE_WEIGHTS, cache_root
from veilstream.detectors.yolo import EXPORT_FOLDER, YoloDetector, export_key, onnx_export, resolve_runtime
from veilstream.errors import ConfigError, ModelLoadError

from .conftest import MEDIA, read_rgb, video_frame

# Low enough that the plate model proposes several boxes per vtest frame: more boxes to compare.
LOW: dict[Kind, float] = {"plate": 0.05}
# Boxes scoring this close to the threshold may fall on either side of it in the other runtime.
SCORE_MARGIN = 0.005


# --- runtime choice and cache keys (no model) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runtime", "weights", "device", "expected"),
    [
        ("auto", "m.pt", "cpu", "onnx"),
        ("auto", "m.pt", "cuda", "torch"),
        ("auto", "m.pt", "cuda:1", "torch"),
        ("auto", "m.onnx", "cuda", "onnx"),
        ("onnx", "m.pt", "cuda", "onnx"),
        ("torch", "m.pt", "cpu", "torch"),
        ("auto", "m.torchscript", "cuda", "torch"),
    ],
)
def test_runtime_choice(runtime: Any, weights: str, device: str, expected: str) -> None:
    assert resolve_runtime(runtime, Path(weights), device) == expected


def test_runtime_choices_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"'torch' needs \.pt weights; m\.onnx is an ONNX file"):
        resolve_runtime("torch", Path("m.onnx"), "cpu")
    with pytest.raises(ConfigError, match=r"cannot export m\.torchscript"):
        resolve_runtime("onnx", Path("m.torchscript"), "cpu")
    with pytest.raises(ConfigError, match="must be one of"):
        resolve_runtime("tensorrt", Path("m.pt"), "cpu")  # type: ignore[arg-type]


def test_config_runtime_and_threads() -> None:
    assert YoloBackendConfig().runtime == "auto"
    assert YoloBackendConfig().threads is None
    config = DetectorConfig.model_validate({"backends": [{"type": "yolo", "runtime": "torch", "threads": 2}]})
    assert config.backends[0] == YoloBackendConfig(runtime="torch", threads=2)
    with pytest.raises(ValidationError, match="runtime"):
        YoloBackendConfig.model_validate({"runtime": "tensorrt"})
    with pytest.raises(ValidationError, match="threads"):
        YoloBackendConfig(threads=0)


def test_export_key_follows_content_and_settings(tmp_path: Path) -> None:
    first, renamed, other = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    first.write_bytes(b"weights one")
    renamed.write_bytes(b"weights one")
    other.write_bytes(b"weights two")
    assert export_key(first, 640) == export_key(renamed, 640)
    assert export_key(first, 640) != export_key(other, 640)
    assert export_key(first, 640) != export_key(first, 1280)


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VEILSTREAM_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("VEILSTREAM_CACHE")
    assert cache_root() == tmp_path / "xdg" / "veilstream"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "veilstream"


# --- the real plate model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("yolo-cache")


@pytest.fixture(scope="module")
def onnx_low(cache: Path) -> YoloDetector:
    return YoloDetector(thresholds=LOW, cache=cache)


@pytest.fixture(scope="module")
def torch_low() -> YoloDetector:
    return YoloDetector(thresholds=LOW, runtime="torch")


@pytest.fixture(scope="module")
def plate_batches() -> list[list[Frame]]:
    """Batches of frames where the model finds plates: the readable one (also at 1080p, another letterbox shape),
    the images, and one batch of vtest.avi every 60th frame (its parked van and car). Ultralytics letterboxes a
    batch of mixed sizes to a square, so each size goes in its own batch, as a camera's frames do."""
    car = read_rgb(MEDIA / "licenseplate_motion.jpg")
    car_1080p: Frame = np.asarray(cv2.resize(car, (1920, 1080), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    images = [[car], [car_1080p], [read_rgb(MEDIA / "bus.jpg")], [read_rgb(MEDIA / "zidane.jpg")]]
    return [*images, [video_frame(MEDIA / "vtest.avi", index) for index in range(0, 795, 60)]]


def unmatched(boxes: Sequence[Detection], others: Sequence[Detection], threshold: float) -> list[Detection]:
    """Boxes clearly above `threshold` with no box of `others` on them (IoU >= 0.99, score within 0.001)."""
    return [
        box
        for box in boxes
        if box.score >= threshold + SCORE_MARGIN
        and not any(box.iou(other) >= 0.99 and abs(box.score - other.score) < 1e-3 for other in others)
    ]


@pytest.mark.slow
def test_onnx_is_the_default_on_cpu(onnx_low: YoloDetector, cache: Path) -> None:
    assert onnx_low.runtime == "onnx"
    assert onnx_low.path == resolve_weights(DEFAULT_PLATE_WEIGHTS)
    assert onnx_low.model_path.parent == cache / EXPORT_FOLDER
    assert onnx_low.model_path.suffix == ".onnx"
    # The session runs without spinning threads, as CenterFace's does.
    options = onnx_low.onnx_session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert onnx_low._model.predictor.model.backend.session is onnx_low.onnx_session


@pytest.mark.slow
def test_plate_boxes_match_torch(
    onnx_low: YoloDetector, torch_low: YoloDetector, plate_batches: list[list[Frame]]
) -> None:
    # The vtest batch also checks the export's dynamic batch size; the images its dynamic input size.
    compared = frames = 0
    for batch in plate_batches:
        for got, expected in zip(onnx_low.detect(batch), torch_low.detect(batch), strict=True):
            assert unmatched(got, expected, LOW["plate"]) == [], f"onnx {got} torch {expected}"
            assert unmatched(expected, got, LOW["plate"]) == [], f"onnx {got} torch {expected}"
            compared += len(expected)
            frames += 1
    # Enough boxes for the comparison to mean something (torch finds at least one in every frame here).
    assert compared >= frames


@pytest.mark.slow
def test_default_threshold_plate_matches_torch(cache: Path) -> None:
    car = read_rgb(MEDIA / "licenseplate_motion.jpg")
    [on_onnx] = YoloDetector(cache=cache).detect([car])
    [on_torch] = YoloDetector(runtime="torch").detect([car])
    assert len(on_onnx) == len(on_torch) == 1
    assert on_onnx[0].iou(on_torch[0]) > 0.99
    assert on_onnx[0].score == pytest.approx(on_torch[0].score, abs=1e-3)


@pytest.mark.slow
def test_threads_reach_the_session(cache: Path) -> None:
    detector = YoloDetector(cache=cache, threads=1)
    assert detector.onnx_session.get_session_options().intra_op_num_threads == 1


@pytest.mark.slow
def test_second_build_reuses_the_export(onnx_low: YoloDetector, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ultralytics.engine.model import Model

    before = onnx_low.model_path.stat()

    def no_export(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("exported again")

    monkeypatch.setattr(Model, "export", no_export)
    again = YoloDetector(thresholds=LOW, cache=cache)
    assert again.model_path == onnx_low.model_path
    after = again.model_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # Nothing but finished exports in the folder: the scratch folder of the export is gone.
    assert all(path.suffix == ".onnx" for path in (cache / EXPORT_FOLDER).iterdir())


@pytest.mark.slow
def test_another_imgsz_is_another_export(onnx_low: YoloDetector, cache: Path) -> None:
    other = YoloDetector(thresholds=LOW, imgsz=320, cache=cache)
    assert other.model_path != onnx_low.model_path
    assert other.model_path.is_file()


@pytest.mark.slow
def test_onnx_weights_are_used_as_they_are(onnx_low: YoloDetector, tmp_path: Path) -> None:
    weights = tmp_path / "plates.onnx"
    shutil.copyfile(onnx_low.model_path, weights)
    detector = YoloDetector(weights=weights, cache=tmp_path / "cache")
    assert (detector.runtime, detector.model_path) == ("onnx", weights)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match=r"needs \.pt weights"):
        YoloDetector(weights=weights, runtime="torch")


@pytest.mark.slow
def test_build_backend_passes_runtime() -> None:
    detector = build_backend(YoloBackendConfig(runtime="torch"))
    assert isinstance(detector, YoloDetector)
    assert (detector.runtime, detector.onnx_session) == ("torch", None)
    combined = build_detector(DetectorConfig(backends=(YoloBackendConfig(runtime="torch"),), plate_check=None))
    assert [getattr(backend, "runtime", None) for backend in combined.detectors] == ["torch"]


@pytest.mark.slow
def test_export_restores_torch_threads(tmp_path: Path) -> None:
    from ultralytics.utils import NUM_THREADS

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(NUM_THREADS + 1)  # ultralytics' device selection would set NUM_THREADS
        onnx_export(resolve_weights(DEFAULT_PLATE_WEIGHTS), 640, tmp_path)
        assert torch.get_num_threads() == NUM_THREADS + 1
    finally:
        torch.set_num_threads(before)


# --- nothing is installed, and failures name the file --------------------------------------------------------------


@pytest.fixture
def pip_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ultralytics' auto-install switched on, and any subprocess it would start (pip, uv) failing the test."""
    from ultralytics.utils import checks

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"ultralytics tried to run {args}")

    monkeypatch.setattr(checks, "AUTOINSTALL", True)
    monkeypatch.setattr(subprocess, "check_output", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)


@pytest.mark.slow
@pytest.mark.usefixtures("pip_forbidden")
def test_export_and_load_install_nothing(tmp_path: Path) -> None:
    detector = YoloDetector(cache=tmp_path)
    assert detector.model_path.is_relative_to(tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("pip_forbidden")
def test_missing_onnx_package_is_an_error_not_an_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ultralytics.utils import checks

    def version(name: str) -> str:
        if name == "onnx":
            raise importlib.metadata.PackageNotFoundError(name)
        return importlib.metadata.version(name)

    fake = types.SimpleNamespace(version=version, PackageNotFoundError=importlib.metadata.PackageNotFoundError)
    monkeypatch.setattr(checks, "metadata", fake)
    with pytest.raises(ModelLoadError, match=r"needs the packages .*onnx.*runtime: torch"):
        YoloDetector(cache=tmp_path)


@pytest.mark.slow
def test_corrupt_cached_export_names_the_file(onnx_low: YoloDetector, tmp_path: Path) -> None:
    cached = tmp_path / EXPORT_FOLDER / onnx_low.model_path.name
    cached.parent.mkdir()
    cached.write_bytes(onnx_low.model_path.read_bytes()[:100_000])  # truncated
    with pytest.raises(ModelLoadError, match=re.escape(f"delete it to export again) from {cached}: ")):
        YoloDetector(thresholds=LOW, cache=tmp_path)


@pytest.mark.slow
def test_unwritable_cache_names_the_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(ModelLoadError, match=f"under {re.escape(str(blocker / EXPORT_FOLDER))}.*VEILSTREAM_CACHE"):
        YoloDetector(cache=blocker)


@pytest.mark.slow
def test_failed_export_names_the_weights_and_leaves_nothing(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="cannot load YOLO model from " + re.escape(str(garbage))):
        YoloDetector(weights=garbage, cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / EXPORT_FOLDER).iterdir()) == []
