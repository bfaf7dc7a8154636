"""Detection with any Ultralytics YOLO detect model (`.pt`, or an exported `.onnx`).

The default weights are pyplatex's YOLOv8n licence-plate model (one class, `license_plate`). Its wheel is
MIT-licensed, but Ultralytics claims AGPL-3.0 on weights trained with its software: check that before
shipping these weights in a product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veilstream.detectors.base import KINDS, Detection, Frame, Kind, check_frames
from veilstream.detectors.weights import DEFAULT_PLATE_WEIGHTS, loading, resolve_weights
from veilstream.errors import ConfigError, ModelLoadError

DEFAULT_CLASS_MAP: Mapping[str, Kind] = {"license_plate": "plate"}
DEFAULT_THRESHOLDS: Mapping[Kind, float] = {"plate": 0.2}


class YoloDetector:
    """Boxes of the model classes named in `class_map` (class name -> kind); other classes are ignored.

    `thresholds` gives the minimum score per kind and must cover every kind in `class_map`. `imgsz` is the
    inference size (ignored by a static-shape ONNX export, which keeps its own). `device` is "cpu", "cuda"
    or "cuda:N".
    """

    def __init__(
        self,
        weights: str | Path = DEFAULT_PLATE_WEIGHTS,
        class_map: Mapping[str, Kind] = DEFAULT_CLASS_MAP,
        thresholds: Mapping[Kind, float] = DEFAULT_THRESHOLDS,
        imgsz: int = 640,
        device: str = "cpu",
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
        self.path = resolve_weights(weights)
        self.thresholds = {kind: thresholds[kind] for kind in set(class_map.values())}
        self.kinds: frozenset[Kind] = frozenset(self.thresholds)
        self.imgsz = imgsz
        self.device = device
        with loading(self.path, "YOLO model"):
            from ultralytics.models.yolo import YOLO

            self._model: Any = YOLO(str(self.path), task="detect")
            if self._model.task != "detect":
                raise ModelLoadError(f"{self.path} is a {self._model.task!r} model, not a detection model")
            # ONNX files are only opened at the first predict: run one now so a broken file fails here.
            warmup = np.zeros((imgsz, imgsz, 3), np.uint8)
            self._predict([warmup])
            names: Mapping[int, str] = self._model.names
        unknown = sorted(set(class_map) - set(names.values()))
        if unknown:
            raise ConfigError(
                f"YOLO class_map names {unknown} that {self.path} does not have; its classes: {sorted(names.values())}"
            )
        self._kind_of_class = {index: class_map[name] for index, name in names.items() if name in class_map}

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
