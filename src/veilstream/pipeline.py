"""The one pipeline every entry point shares: detect -> remember -> anonymize -> correct -> publish -> leak check.

Pure with respect to I/O: frames in, one `FrameOutcome` per frame out. Its one state is the optional memory of
recent boxes per camera, consulted between detection and anonymization for frames given with their keys.
Fail-closed: a frame whose detection, anonymization, correction or encoding fails, or whose anonymized object
(or, by the leak check, any face) is found again when the policy says that is a failure, is never published with
raw pixels; by policy it is dropped with its error, or masked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from veilstream.anonymizers.filters import Anonymizer
from veilstream.anonymizers.regions import RegionShape, region_mask
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionResult
from veilstream.decoding.images import Frame
from veilstream.detectors.base import Detection, Detector
from veilstream.detectors.combined import CombinedDetector
from veilstream.detectors.finders import FoundRegions, RegionFinder, residual_detections
from veilstream.detectors.leakcheck import LeakCheck
from veilstream.detectors.memory import DetectionMemory, FrameKey
from veilstream.errors import FrameError, StageError
from veilstream.geometry import BoxGeometry
from veilstream.outcome import Dropped, FrameOutcome, Masked, Published
from veilstream.publishing.encoding import Encoder

T = TypeVar("T")
OnFailure = Literal["drop", "mask_frame"]
ResidualCheck = Literal["off", "flag", "fail"]
ResidualScope = Literal["around", "frame"]


@dataclass(frozen=True)
class FailurePolicy:
    """One policy for every failure. `residual`: look again for anonymized objects on the published frame;
    `flag` publishes and flags the frame, `fail` treats it as a failed frame (dropped or masked).
    `residual_scope`: `around` looks again only in windows around the anonymized objects where the detector
    allows it (CenterFace: same pixels, same scale), `frame` runs the detectors on the whole frame.
    `guard_correction`: the residual check's detector also looks at every frame the correction stepped before it
    is published, and what the correction made detectable goes back to its anonymized pixels (needs `residual`)."""

    on_failure: OnFailure = "drop"
    residual: ResidualCheck = "flag"
    residual_scope: ResidualScope = "around"
    guard_correction: bool = True


# Per frame of a batch, the published pixels the correction's guard looked at and what it found there.
Looked = dict[int, tuple[Frame, tuple[Detection, ...]]]


@dataclass
class Prepared:
    """Frames with their regions found and anonymized, ready for correction and publishing."""

    originals: list[Frame]
    found: list[FoundRegions | FrameError]
    anonymized: list[Frame | None]
    masks: list[npt.NDArray[np.bool_] | None]
    timings_ms: dict[str, float] = field(default_factory=dict)
    keys: list[FrameKey | None] = field(default_factory=list)


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


def _stage_error(stage: str, error: Exception) -> StageError:
    return StageError(f"{stage}_failed", f"{type(error).__name__}: {error}")


@dataclass
class _Encoded:
    """The publish stage's result for one frame: bytes, what a consumer decodes (if known), the correction."""

    data: bytes
    decoded: Frame | None
    correction: CorrectionResult | None


class Pipeline:
    """`leak_detector` runs the residual check (policy.residual); `memory` keeps boxes across a camera's frames;
    `leak_check` is the independent check on the published frame; `shape` is how remembered and leak-check
    boxes are drawn (the finder's shape)."""

    def __init__(
        self,
        finder: RegionFinder,
        anonymizer: Anonymizer,
        encoder: Encoder,
        corrector: AdaptiveCorrector | None = None,
        policy: FailurePolicy | None = None,
        leak_detector: Detector | None = None,
        device: torch.device | str = "cpu",
        memory: DetectionMemory | None = None,
        leak_check: LeakCheck | None = None,
        shape: RegionShape = "box",
    ) -> None:
        self.finder = finder
        self.anonymizer = anonymizer
        self.encoder = encoder
        self.corrector = corrector
        self.policy = policy or FailurePolicy()
        self.leak_detector = leak_detector if self.policy.residual != "off" else None
        self.residual_scope: ResidualScope = self.policy.residual_scope
        self.device = torch.device(device)
        self.memory = memory
        self.leak_check = leak_check
        self.shape: RegionShape = shape

    def process(self, frames: Sequence[Frame], keys: Sequence[FrameKey | None] | None = None) -> list[FrameOutcome]:
        return self.finish(self.prepare(frames, keys))

    def prepare(self, frames: Sequence[Frame], keys: Sequence[FrameKey | None] | None = None) -> Prepared:
        """Find and anonymize the regions of every frame. `keys` (camera, sequence, capture time) let the memory
        keep boxes across a camera's frames, which must then come in order; without keys nothing is remembered."""
        frame_keys: list[FrameKey | None] = list(keys) if keys is not None else [None] * len(frames)
        if len(frame_keys) != len(frames):
            raise ValueError(f"{len(frame_keys)} keys for {len(frames)} frames")
        start = time.perf_counter()
        found: list[FoundRegions | FrameError] = [
            r if isinstance(r, FoundRegions | FrameError) else StageError("detect_failed", repr(r))
            for r in _per_frame(frames, self.finder.find, "detect")  # type: ignore[arg-type]
        ]
        if self.memory is not None:
            for index, (frame, key) in enumerate(zip(frames, frame_keys, strict=True)):
                regions = found[index]
                if isinstance(regions, FoundRegions):  # a failed frame is not recorded: the next one starts afresh
                    height, width = frame.shape[:2]
                    remembered = self.memory.remember(key, regions.detections, width, height)
                    found[index] = regions.adding(remembered, self.shape, remembered=True)
        detected = time.perf_counter()
        anonymized: list[Frame | None] = []
        masks: list[npt.NDArray[np.bool_] | None] = []
        for index, (frame, regions) in enumerate(zip(frames, found, strict=True)):
            anon: Frame | None = None
            mask: npt.NDArray[np.bool_] | None = None
            if isinstance(regions, FoundRegions):
                try:
                    anon, mask = self._anonymize(frame, regions)
                except Exception as error:
                    found[index] = _stage_error("anonymize", error)
            anonymized.append(anon)
            masks.append(mask)
        count = max(1, len(frames))
        timings = {
            "detect": (detected - start) * 1000 / count,
            "anonymize": (time.perf_counter() - detected) * 1000 / count,
        }
        return Prepared(list(frames), found, anonymized, masks, timings, frame_keys)

    def _anonymize(self, frame: Frame, found: FoundRegions) -> tuple[Frame, npt.NDArray[np.bool_]]:
        regions = list(found.regions)
        # uint8 in and out: the anonymizer converts only the regions' crops to float.
        tensor = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device).permute(2, 0, 1)
        hidden = self.anonymizer.anonymize(tensor, regions) if regions else tensor
        mask = region_mask(regions, frame.shape[0], frame.shape[1], self.device)
        pixels = hidden.permute(1, 2, 0).cpu().numpy()
        return np.ascontiguousarray(pixels), mask.cpu().numpy()

    def finish(self, prepared: Prepared, corrector: AdaptiveCorrector | None = None) -> list[FrameOutcome]:
        """Correct (with `corrector`, default the pipeline's; none = publish the anonymized pixels), encode,
        check for leaks and apply the failure policy."""
        corrector = corrector or self.corrector
        ready = [i for i, a in enumerate(prepared.anonymized) if a is not None]
        stages: dict[int, dict[str, float]] = {i: dict(prepared.timings_ms) for i in range(len(prepared.originals))}
        looked: Looked = {}
        encoded: dict[int, _Encoded | FrameError] = (
            self._correct(prepared, ready, corrector, stages, looked)
            if corrector
            else self._encode(prepared, ready, stages)
        )
        residual = self._leak_check(prepared, encoded, stages, looked)
        leaks = self._independent_check(prepared, encoded, stages)
        if self.leak_check is not None and self.leak_check.on_leak == "blur":
            prepared = self._blur_leaks(prepared, leaks, encoded, corrector, stages)
        return [
            self._outcome(prepared, i, encoded.get(i), residual.get(i, ()), stages[i], leaks.get(i))
            for i in range(len(stages))
        ]

    def _correct(
        self,
        prepared: Prepared,
        ready: list[int],
        corrector: AdaptiveCorrector,
        stages: dict[int, dict[str, float]],
        looked: Looked,
    ) -> dict[int, _Encoded | FrameError]:
        """`looked` gets what the correction's guard found on the published pixels it looked at."""

        def run(indices: Sequence[int]) -> list[object]:
            def found_again(positions: Sequence[int], published: Sequence[Frame]) -> list[list[BoxGeometry]]:
                found = self._residual([prepared.found[indices[p]] for p in positions], published)
                looked.update((indices[p], (f, r)) for p, f, r in zip(positions, published, found, strict=True))
                return [list(r) for r in found]

            guarded = self.leak_detector is not None and self.policy.guard_correction
            return list(
                corrector.correct(
                    [prepared.originals[i] for i in indices],
                    [prepared.anonymized[i] for i in indices],  # type: ignore[misc]
                    [prepared.masks[i] for i in indices],  # type: ignore[misc]
                    found_again if guarded else None,
                )
            )

        results: dict[int, _Encoded | FrameError] = {}
        for i, result in zip(ready, _per_frame(ready, run, "correct") if ready else [], strict=True):
            if isinstance(result, CorrectionResult):
                # The corrector checked its decisions on exactly these bytes: they are what is published.
                stages[i]["correct"] = result.elapsed_ms
                results[i] = _Encoded(result.encoded.data, result.encoded.decoded, result)
            else:
                results[i] = result if isinstance(result, FrameError) else StageError("correct_failed", repr(result))
        return results

    def _encode(
        self, prepared: Prepared, ready: list[int], stages: dict[int, dict[str, float]]
    ) -> dict[int, _Encoded | FrameError]:
        results: dict[int, _Encoded | FrameError] = {}
        for i in ready:
            start = time.perf_counter()
            pixels = prepared.anonymized[i]
            assert pixels is not None  # `ready` holds only anonymized frames
            try:
                if self.leak_detector is not None or self.leak_check is not None:  # a check decodes the bytes
                    roundtrip = self.encoder.roundtrip(pixels)
                    results[i] = _Encoded(roundtrip.data, roundtrip.decoded, None)
                else:
                    results[i] = _Encoded(self.encoder.encode(pixels), None, None)
            except Exception as error:
                results[i] = _stage_error("encode", error)
            stages[i]["encode"] = (time.perf_counter() - start) * 1000
        return results

    def _leak_check(
        self,
        prepared: Prepared,
        encoded: dict[int, _Encoded | FrameError],
        stages: dict[int, dict[str, float]],
        looked: Looked,
    ) -> dict[int, tuple[Detection, ...] | FrameError]:
        """Detect again on the published pixels; keep what lands on an anonymized object. A frame the correction's
        guard already looked at in these very pixels is not looked at twice."""
        if self.leak_detector is None:
            return {}
        # A frame with nothing anonymized has nothing to find again: skip it (same result, one detection less).
        checked = [
            (i, e)
            for i, e in encoded.items()
            if isinstance(e, _Encoded) and isinstance(f := prepared.found[i], FoundRegions) and f.detections
        ]

        def residual(indices: list[int], frames: list[Frame]) -> list[tuple[Detection, ...]]:
            seen = {
                k: looked[i][1] for k, (i, f) in enumerate(zip(indices, frames, strict=True)) if _same(looked, i, f)
            }
            todo = [k for k in range(len(indices)) if k not in seen]
            fresh = (
                self._residual([prepared.found[indices[k]] for k in todo], [frames[k] for k in todo]) if todo else []
            )
            seen.update(zip(todo, fresh, strict=True))
            return [seen[k] for k in range(len(indices))]

        return _on_published(checked, residual, "residual_check", stages)

    def _residual(
        self, found: list[FoundRegions | FrameError], published: Sequence[Frame]
    ) -> list[tuple[Detection, ...]]:
        """Per frame, the detections on its published pixels that land on one of its anonymized objects."""
        again = self._detect_again(list(published), found)
        return [
            tuple(residual_detections(f.detections, a)) if isinstance(f, FoundRegions) else ()
            for f, a in zip(found, again, strict=True)
        ]

    def _independent_check(
        self, prepared: Prepared, encoded: dict[int, _Encoded | FrameError], stages: dict[int, dict[str, float]]
    ) -> dict[int, tuple[Detection, ...] | FrameError]:
        """Faces the leak check's detector finds anywhere in the published frames that are due for it."""
        check = self.leak_check
        if check is None:
            return {}
        due = [(i, e) for i, e in sorted(encoded.items()) if isinstance(e, _Encoded) and check.due(prepared.keys[i])]

        def faces(_indices: list[int], frames: list[Frame]) -> list[tuple[Detection, ...]]:
            return [tuple(found) for found in check.detector.detect(frames)]

        return _on_published(due, faces, "leak_check", stages)

    def _blur_leaks(
        self,
        prepared: Prepared,
        leaks: dict[int, tuple[Detection, ...] | FrameError],
        encoded: dict[int, _Encoded | FrameError],
        corrector: AdaptiveCorrector | None,
        stages: dict[int, dict[str, float]],
    ) -> Prepared:
        """Frames with possible leaks anonymized again with the found faces added, then corrected and encoded
        again (so the decisions are checked on the bytes published); `prepared` itself is left as it was."""
        assert self.leak_check is not None
        redo = [i for i, found in sorted(leaks.items()) if isinstance(found, tuple) and found]
        if not redo:
            return prepared
        start = time.perf_counter()
        again = replace(
            prepared, found=list(prepared.found), anonymized=list(prepared.anonymized), masks=list(prepared.masks)
        )
        for i in redo:
            found, faces = again.found[i], leaks[i]
            assert isinstance(found, FoundRegions) and isinstance(faces, tuple)
            height, width = again.originals[i].shape[:2]
            more = found.adding(self.leak_check.blur_boxes(faces, width, height), self.shape)
            again.found[i] = more
            try:
                again.anonymized[i], again.masks[i] = self._anonymize(again.originals[i], more)
            except Exception as error:
                again.found[i], again.anonymized[i] = _stage_error("anonymize", error), None
        ready = [i for i in redo if again.anonymized[i] is not None]
        first = {i: dict(stages[i]) for i in redo}
        encoded.update(
            self._correct(again, ready, corrector, stages, {}) if corrector else self._encode(again, ready, stages)
        )
        elapsed = (time.perf_counter() - start) * 1000 / len(redo)
        for i in redo:
            stages[i].clear()
            stages[i].update(first[i], leak_blur=elapsed)
        return again

    def _detect_again(self, frames: list[Frame], found: list[FoundRegions | FrameError]) -> list[list[Detection]]:
        """Only the kinds anonymized in a frame are looked for again, and (scope `around`) a fully convolutional
        detector looks only in windows around the anonymized boxes: only there can a detection be residual."""
        assert self.leak_detector is not None
        if isinstance(self.leak_detector, CombinedDetector):
            kinds = [{d.kind for d in f.detections} if isinstance(f, FoundRegions) else set() for f in found]
            around = [f.detections if isinstance(f, FoundRegions) else () for f in found]
            # Unmerged: a residual merged with a box beside it could end up less than 0.3 inside its anonymized box.
            scope = around if self.residual_scope == "around" else None
            return self.leak_detector.detect_kinds(frames, kinds, scope, merge=False)
        return self.leak_detector.detect(frames)

    def _outcome(
        self,
        prepared: Prepared,
        i: int,
        encoded: _Encoded | FrameError | None,
        residual: tuple[Detection, ...] | FrameError,
        timings: dict[str, float],
        leaks: tuple[Detection, ...] | FrameError | None = None,
    ) -> FrameOutcome:
        found = prepared.found[i]
        detections = found.detections if isinstance(found, FoundRegions) else ()
        error: FrameError | None = found if isinstance(found, FrameError) else None
        for stage_result in (encoded, residual, leaks):
            if error is None and isinstance(stage_result, FrameError):
                error = stage_result
        hits = residual if isinstance(residual, tuple) else ()
        if error is None and hits and self.policy.residual == "fail":
            error = StageError("residual_detection", f"{len(hits)} anonymized object(s) found again")
        possible = leaks if isinstance(leaks, tuple) else ()
        if error is None and possible and self.leak_check is not None and self.leak_check.on_leak == "fail":
            error = StageError("leak_detected", f"the leak check found {len(possible)} face(s) in the published frame")
        remembered = found.remembered if isinstance(found, FoundRegions) else ()
        checked = isinstance(leaks, tuple)
        if error is None and isinstance(encoded, _Encoded):
            return Published(
                detections,
                hits,
                timings,  # type: ignore[arg-type]
                encoded.data,
                encoded.correction,
                remembered=remembered,
                leaks=possible,
                leak_checked=checked,
            )
        error = error or StageError("internal", "the frame reached no stage result")
        if self.policy.on_failure == "mask_frame":
            try:
                grey = self.encoder.grey(prepared.originals[i])
            except Exception as mask_error:  # cannot even mask: drop
                error = _stage_error("mask", mask_error)
            else:
                return Masked(
                    detections, hits, timings, grey, error, remembered=remembered, leaks=possible, leak_checked=checked
                )  # type: ignore[arg-type]
        return Dropped(detections, hits, timings, error, remembered=remembered, leaks=possible, leak_checked=checked)  # type: ignore[arg-type]


def _same(looked: Looked, index: int, frame: Frame) -> bool:
    return index in looked and looked[index][0] is frame


def _on_published(
    items: Sequence[tuple[int, _Encoded | FrameError]],
    detect: Callable[[list[int], list[Frame]], list[tuple[Detection, ...]]],
    stage: str,
    stages: dict[int, dict[str, float]],
) -> dict[int, tuple[Detection, ...] | FrameError]:
    """Run a check on the pixels a consumer decodes from the published bytes, timing each frame's share. A frame
    the check could not look at is a frame in doubt: it fails closed."""
    published = [(i, e) for i, e in items if isinstance(e, _Encoded)]
    if not published:
        return {}
    start = time.perf_counter()
    indices = [i for i, _ in published]
    results: dict[int, tuple[Detection, ...] | FrameError]
    try:
        frames = [e.decoded if e.decoded is not None else _decode(e.data) for _, e in published]
        results = dict(zip(indices, detect(indices, frames), strict=True))
    except Exception as error:
        results = {i: _stage_error(stage, error) for i in indices}
    each = (time.perf_counter() - start) * 1000 / len(indices)
    for i in indices:
        stages[i][stage] = each
    return results


def _decode(data: bytes) -> Frame:
    from veilstream.decoding.images import decode_frame

    return decode_frame(data)
