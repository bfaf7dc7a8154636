"""The one pipeline every entry point shares: regions -> anonymize -> classify + correct -> encode.

Pure with respect to I/O: frames in, outcomes out. Fail-closed: a frame whose region finding, anonymization
or correction fails is never emitted with raw pixels; by policy it is dropped with its error, or published
fully masked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from veilstream.codec import Codec, Frame, decode_frame, encode_frame
from veilstream.correction.anonymizers import Anonymizer
from veilstream.correction.classifier import Classifier
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionResult
from veilstream.correction.regions import Region, RegionShape, region_mask
from veilstream.correction.saliency import salient_window
from veilstream.detectors.base import Detection, Detector
from veilstream.errors import FrameError, StageError

FailurePolicy = Literal["drop", "mask_frame"]
T = TypeVar("T")


@dataclass(frozen=True)
class FoundRegions:
    """What to anonymize in one frame, and the detections behind it (none for simulated regions)."""

    regions: tuple[Region, ...]
    detections: tuple[Detection, ...] = ()

    @property
    def faces(self) -> int:
        return sum(1 for d in self.detections if d.kind == "face")

    @property
    def plates(self) -> int:
        return sum(1 for d in self.detections if d.kind == "plate")


class RegionFinder(Protocol):
    def find(self, frames: Sequence[Frame]) -> list[FoundRegions]: ...


@dataclass(frozen=True)
class SalientRegionFinder:
    """The paper's simulation: the classifier's most salient `size` x `size` window."""

    classifier: Classifier
    size: int = 50

    def find(self, frames: Sequence[Frame]) -> list[FoundRegions]:
        device = self.classifier.device
        return [FoundRegions((salient_window(self.classifier, _tensor(f, device), self.size),)) for f in frames]


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


def residual_detections(found: FoundRegions, again: Sequence[Detection], overlap: float = 0.3) -> list[Detection]:
    """Detections on the published frame that fall on an anonymized object of the same kind: the
    anonymization did not hold there. `overlap` is the share of the new box inside the old one."""
    residual = []
    for new in again:
        for old in found.detections:
            if old.kind != new.kind:
                continue
            iw = min(old.x2, new.x2) - max(old.x1, new.x1)
            ih = min(old.y2, new.y2) - max(old.y1, new.y1)
            if iw > 0 and ih > 0 and iw * ih >= overlap * new.area:
                residual.append(new)
                break
    return residual


@dataclass
class Prepared:
    """Frames with their regions found and anonymized, ready for correction."""

    originals: list[Frame]
    found: list[FoundRegions | FrameError]
    anonymized: list[Frame | None]
    masks: list[npt.NDArray[np.bool_] | None]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FrameOutcome:
    """One frame through the pipeline. `published` is None only when the frame is dropped."""

    found: FoundRegions | None
    correction: CorrectionResult | None
    error: FrameError | None
    published: bytes | None
    timings_ms: dict[str, float]
    residual: tuple[Detection, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def _tensor(frame: Frame, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1).float()


def _per_frame(items: Sequence[T], run: Callable[[Sequence[T]], list[object]], stage: str) -> list[object]:
    """Run a batch stage; if the batch fails, run frame by frame so one bad frame fails alone."""
    try:
        return run(items)
    except Exception:
        results: list[object] = []
        for item in items:
            try:
                results.extend(run([item]))
            except Exception as error:
                results.append(StageError(f"{stage}_failed", f"{type(error).__name__}: {error}"))
        return results


class Pipeline:
    def __init__(
        self,
        finder: RegionFinder,
        anonymizer: Anonymizer,
        corrector: AdaptiveCorrector,
        on_failure: FailurePolicy = "drop",
        residual_detector: Detector | None = None,
    ) -> None:
        self.finder = finder
        self.anonymizer = anonymizer
        self.corrector = corrector
        self.on_failure = on_failure
        self.residual_detector = residual_detector
        self.device = corrector.device

    def prepare(self, frames: Sequence[Frame]) -> Prepared:
        """Find and anonymize the regions of every frame."""
        start = time.perf_counter()
        found: list[FoundRegions | FrameError] = [
            r if isinstance(r, FoundRegions | FrameError) else StageError("detect_failed", repr(r))
            for r in _per_frame(frames, self.finder.find, "detect")  # type: ignore[arg-type]
        ]
        detected = time.perf_counter()
        anonymized: list[Frame | None] = []
        masks: list[npt.NDArray[np.bool_] | None] = []
        for frame, regions in zip(frames, found, strict=True):
            if isinstance(regions, FrameError):
                anonymized.append(None)
                masks.append(None)
                continue
            try:
                anon, mask = self._anonymize(frame, regions)
            except Exception as error:
                found[len(anonymized)] = StageError("anonymize_failed", f"{type(error).__name__}: {error}")
                anonymized.append(None)
                masks.append(None)
                continue
            anonymized.append(anon)
            masks.append(mask)
        done = time.perf_counter()
        count = max(1, len(frames))
        return Prepared(
            list(frames),
            found,
            anonymized,
            masks,
            {"detect": (detected - start) * 1000 / count, "anonymize": (done - detected) * 1000 / count},
        )

    def _anonymize(self, frame: Frame, found: FoundRegions) -> tuple[Frame, npt.NDArray[np.bool_]]:
        regions = list(found.regions)
        tensor = _tensor(frame, self.device)
        hidden = self.anonymizer.anonymize(tensor, regions) if regions else tensor
        mask = region_mask(regions, frame.shape[0], frame.shape[1], self.device)
        pixels = hidden.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return np.ascontiguousarray(pixels), mask.cpu().numpy()

    def correct(self, prepared: Prepared, corrector: AdaptiveCorrector | None = None) -> list[FrameOutcome]:
        """Correct the prepared frames (with `corrector`, default the pipeline's) and apply the failure policy."""
        corrector = corrector or self.corrector
        ready = [i for i, a in enumerate(prepared.anonymized) if a is not None]
        start = time.perf_counter()

        def run(indices: Sequence[int]) -> list[object]:
            return list(
                corrector.correct(
                    [prepared.originals[i] for i in indices],
                    [prepared.anonymized[i] for i in indices],  # type: ignore[misc]
                    [prepared.masks[i] for i in indices],  # type: ignore[misc]
                )
            )

        corrected = dict(zip(ready, _per_frame(ready, run, "correct"), strict=True)) if ready else {}
        correct_ms = (time.perf_counter() - start) * 1000 / max(1, len(prepared.originals))
        residuals = self._residuals(prepared, corrected)
        outcomes: list[FrameOutcome] = []
        for i, found in enumerate(prepared.found):
            timings = {**prepared.timings_ms, "correct": correct_ms, **residuals[1]}
            result = corrected.get(i)
            if isinstance(result, CorrectionResult) and isinstance(found, FoundRegions):
                outcomes.append(FrameOutcome(found, result, None, result.published, timings, residuals[0].get(i, ())))
                continue
            error = found if isinstance(found, FrameError) else result
            if not isinstance(error, FrameError):
                error = StageError("internal", f"unexpected stage result {error!r}")
            outcomes.append(
                FrameOutcome(
                    found if isinstance(found, FoundRegions) else None,
                    None,
                    error,
                    self._fallback(prepared.originals[i], corrector.settings.codec, corrector.settings.quality),
                    timings,
                )
            )
        return outcomes

    def _residuals(
        self, prepared: Prepared, corrected: dict[int, object]
    ) -> tuple[dict[int, tuple[Detection, ...]], dict[str, float]]:
        """Detect again on the published pixels; keep what lands on an anonymized object."""
        if self.residual_detector is None:
            return {}, {}
        start = time.perf_counter()
        # A frame with nothing anonymized has nothing to find again: skip it (same result, one detection less).
        checked = [
            (i, r)
            for i, r in corrected.items()
            if isinstance(r, CorrectionResult) and isinstance(f := prepared.found[i], FoundRegions) and f.detections
        ]
        frames = [decode_frame(r.published) for _, r in checked]
        found_again = self.residual_detector.detect(frames) if frames else []
        residual: dict[int, tuple[Detection, ...]] = {}
        for (i, _), again in zip(checked, found_again, strict=True):
            found = prepared.found[i]
            if isinstance(found, FoundRegions):
                residual[i] = tuple(residual_detections(found, again))
        elapsed = (time.perf_counter() - start) * 1000 / max(1, len(prepared.originals))
        return residual, {"residual_check": elapsed}

    def _fallback(self, frame: Frame, codec: Codec, quality: int) -> bytes | None:
        if self.on_failure == "drop":
            return None
        return encode_frame(np.full_like(frame, 128), codec, quality)

    def process(self, frames: Sequence[Frame]) -> list[FrameOutcome]:
        return self.correct(self.prepare(frames))
