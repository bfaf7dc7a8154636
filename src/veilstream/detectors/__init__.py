"""Face and licence-plate detection: boxes in frame pixels from batches of RGB frames.

Heavy model libraries (ultralytics, onnxruntime) are imported only when a detector is constructed.
"""

from __future__ import annotations

from veilstream.detectors.base import KINDS, Detection, Detector, Frame, Kind, check_frames
from veilstream.detectors.centerface import CenterFaceDetector
from veilstream.detectors.combined import CombinedDetector, downscale_factor, merge_overlapping
from veilstream.detectors.config import (
    BackendConfig,
    CenterFaceBackendConfig,
    DetectorConfig,
    YoloBackendConfig,
    build_backend,
    build_detector,
)
from veilstream.detectors.weights import DEFAULT_FACE_WEIGHTS, DEFAULT_PLATE_WEIGHTS, resolve_weights
from veilstream.detectors.yolo import YoloDetector

__all__ = [
    "DEFAULT_FACE_WEIGHTS",
    "DEFAULT_PLATE_WEIGHTS",
    "KINDS",
    "BackendConfig",
    "CenterFaceBackendConfig",
    "CenterFaceDetector",
    "CombinedDetector",
    "Detection",
    "Detector",
    "DetectorConfig",
    "Frame",
    "Kind",
    "YoloBackendConfig",
    "YoloDetector",
    "build_backend",
    "build_detector",
    "check_frames",
    "downscale_factor",
    "merge_overlapping",
    "resolve_weights",
]
