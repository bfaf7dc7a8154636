"""Region finders: what to anonymize in each frame, from a detector or from the classifier's saliency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from veilstream.anonymizers.regions import Region, RegionShape
from veilstream.correction.classifier import Classifier
from veilstream.correction.saliency import salient_window
from veilstream.decoding.images import Frame
from veilstream.detectors.base import Detection, Detector


@dataclass(frozen=True)
class FoundRegions:
    """What to anonymize in one frame, and the detections behind it (none for simulated regions). `remembered`
    are the detections kept from the camera's earlier frames (also in `detections`)."""

    regions: tuple[Region, ...]
    detections: tuple[Detection, ...] = ()
    remembered: tuple[Detection, ...] = ()

    def adding(self, detections: Sequence[Detection], shape: RegionShape, remembered: bool = False) -> FoundRegions:
        """These regions and `detections` as regions of `shape` too."""
        extra = tuple(detections)
        regions = tuple(Region(d.x1, d.y1, d.x2, d.y2, shape) for d in extra)
        kept = self.remembered + extra if remembered else self.remembered
        return FoundRegions(self.regions + regions, self.detections + extra, kept)


class RegionFinder(Protocol):
    def find(self, frames: Sequence[Frame]) -> list[FoundRegions]: ...


@dataclass(frozen=True)
class DetectorRegionFinder:
    """Faces and plates from a detector (already padded, clipped and merged by it)."""

    detector: Detector
    shape: RegionShape = "box"

    def find(self, frames: Sequence[Frame]) -> list[FoundRegions]:
        return [
            FoundRegions(tuple(Region(d.x1, d.y1, d.x2, d.y2, self.shape) for d in found), tuple(found))
            for found in self.detector.detect(frames)
        ]


@dataclass(frozen=True)
class SalientRegionFinder:
    """The paper's simulation: the classifiers' most salient `size` x `size` window (all of them count)."""

    classifiers: tuple[Classifier, ...]
    size: int = 50

    def find(self, frames: Sequence[Frame]) -> list[FoundRegions]:
        device = self.classifiers[0].device
        return [FoundRegions((salient_window(self.classifiers, _tensor(f, device), self.size),)) for f in frames]


def _tensor(frame: Frame, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1).float()


def residual_detections(
    anonymized: Sequence[Detection], again: Sequence[Detection], overlap: float = 0.3
) -> list[Detection]:
    """Detections on the published frame that fall on an anonymized object of the same kind: the
    anonymization did not hold there. `overlap` is the share of the new box inside the old one."""
    residual = []
    for new in again:
        for old in anonymized:
            if old.kind != new.kind:
                continue
            iw = min(old.x2, new.x2) - max(old.x1, new.x1)
            ih = min(old.y2, new.y2) - max(old.y1, new.y1)
            if iw > 0 and ih > 0 and iw * ih >= overlap * new.area:
                residual.append(new)
                break
    return residual
