"""Several detectors on one batch, with padding, clipping, merging and a downscale for huge frames."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Protocol

import cv2
import numpy as np

from veilstream.detectors.base import KINDS, Detection, Detector, Frame, Kind, check_frames
from veilstream.detectors.windows import Window, windows_around, windows_on_grid, worth_windows

# Faces get their own size on each side: hair and ears identify too. At 0.15 CenterFace found 5 of 43 blurred
# heads again on 40 vtest.avi frames; since its 2x pass finds 5-10 px heads, 0.5 still let it find heads whose
# hair reached past the box on 205 of 803 sample frames (0 of the first 48 at 1.0).
DEFAULT_PADDING: Mapping[Kind, float] = {"face": 1.0, "plate": 0.1}
# A screened box this much inside an anonymized box sends its frame to the confirmation below (the residual check
# itself counts 0.3: the screen is looser, as its scores are). With the screen at 0.35x the threshold it flagged
# every frame the whole-frame check flagged in 320 checks (4 anonymizers x 80 vtest frames); at 0.5x it missed 1.
SCREEN_OVERLAP = 0.2
# A screened frame's whole-frame pass runs instead in windows this many pixels of the network's input (the context it
# sees) around its anonymized boxes, with edges on the detector's grid (`window_grid`), at its own threshold, where
# they cover under WHOLE_FRAME_SHARE of the frame. Chosen on CenterFace 2x, JPEG q90, blur relative_sigma
# 0.5/0.2/0.1/0.04 and pixelate 8/16 over vtest.avi frames with memory and photos: at 192 one face missed under two
# weak blurs, at 128 3; windows off the grid missed 13 of 87 x 8 at 256; at 1x (1080p) 128 missed 2 of 22 / 2 of 42
# residuals, 192 and 256 none. `bench/residual_windows.py` measures it against the whole frame (README: no
# residual missed or added). A threshold lowered to 0.9x added 233 residuals and lost 2 (merged into a box no
# longer on the anonymized one).
CONFIRM_MARGIN = 256


def merge_overlapping(detections: Iterable[Detection], iou_threshold: float) -> list[Detection]:
    """Same-kind boxes overlapping with IoU > `iou_threshold` replaced by their union, until none do.

    Union rather than NMS: every pixel any detector flagged stays covered, so merging never un-blurs.
    """
    boxes = list(detections)
    merged = True
    while merged:
        merged = False
        out: list[Detection] = []
        for box in boxes:
            for i, kept in enumerate(out):
                if kept.kind == box.kind and kept.iou(box) > iou_threshold:
                    out[i] = kept.union(box)
                    merged = True
                    break
            else:
                out.append(box)
        # A union can grow into boxes it did not overlap before: repeat until stable.
        boxes = out
    return boxes


class BoxCheck(Protocol):
    """A second look at a frame's raw boxes (e.g. is this plate on a vehicle?): returns the boxes to keep."""

    def keep(self, frame: Frame, detections: Sequence[Detection]) -> list[Detection]: ...


def downscale_factor(width: int, height: int, max_side: int | None) -> float:
    """Factor (<= 1) that brings the longest side down to `max_side`; 1 when no downscale is needed."""
    if max_side is None or max(width, height) <= max_side:
        return 1.0
    return max_side / max(width, height)


class CombinedDetector:
    """Runs `detectors` on the same frames and post-processes their boxes.

    For each frame: if its longest side exceeds `max_side` (None = never), the detectors see a copy
    downscaled to `max_side` and their boxes are mapped back (faster; tiny faces may be lost). Boxes are then
    padded by `padding[kind]` of their size on each side, clipped to the frame, and same-kind boxes with
    IoU above `merge_iou` are merged into their union. `check`, when given, first sees each frame's raw boxes
    (on the frame the detectors saw) and drops the ones it rejects.
    """

    def __init__(
        self,
        detectors: Sequence[Detector],
        padding: Mapping[Kind, float] = DEFAULT_PADDING,
        merge_iou: float = 0.3,
        max_side: int | None = 1920,
        check: BoxCheck | None = None,
        screen_factor: float = 0.35,
        confirm_margin: int | None = CONFIRM_MARGIN,
    ) -> None:
        if not detectors:
            raise ValueError("CombinedDetector needs at least one detector")
        for kind, fraction in padding.items():
            if kind not in KINDS:
                raise ValueError(f"padding names unknown kind {kind!r}; known: {KINDS}")
            if not math.isfinite(fraction) or fraction < 0:
                raise ValueError(f"padding for {kind!r} must be finite and >= 0, got {fraction!r}")
        if not 0.0 <= merge_iou <= 1.0:
            raise ValueError(f"merge_iou must be in [0, 1], got {merge_iou!r}")
        if max_side is not None and max_side < 32:
            raise ValueError(f"max_side must be >= 32 or None, got {max_side!r}")
        self.detectors = tuple(detectors)
        self.padding = dict(padding)
        self.merge_iou = merge_iou
        self.max_side = max_side
        self.check = check
        if not 0.0 < screen_factor <= 1.0:
            raise ValueError(f"screen_factor must be in (0, 1], got {screen_factor!r}")
        self.screen_factor = screen_factor
        if confirm_margin is not None and confirm_margin < 0:
            raise ValueError(f"confirm_margin must be >= 0 or None, got {confirm_margin!r}")
        self.confirm_margin = confirm_margin

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        """Post-processed detections of every detector, one list per frame."""
        return self.detect_kinds(frames, None)

    def detect_kinds(
        self,
        frames: Sequence[Frame],
        kinds: Sequence[Set[Kind]] | None,
        around: Sequence[Sequence[Detection]] | None = None,
        merge: bool = True,
    ) -> list[list[Detection]]:
        """Like `detect`, but a backend that declares its `kinds` runs only on the frames that want one of them.

        Merging joins same-kind boxes only, so a frame's boxes of a wanted kind are the same as with `detect`.
        `around` (per frame, boxes in frame pixels) is for checks that only care about those boxes (the residual
        check): a backend that can look in windows (`detect_windows`, a fully convolutional one) first screens windows
        around the boxes of its kinds at `screen_factor` times its threshold; a frame where no screened box (padded)
        touches one of its `around` boxes gets no boxes from it, any other frame gets what the detector finds in
        windows `confirm_margin` pixels of its input around those boxes on its grid where they cover under
        WHOLE_FRAME_SHARE of the frame (`_confirm`), else its whole-frame detections. Scores near the threshold depend
        on context outside a window, hence the screen's lower threshold and the confirmation's wide margin (the README
        and CONFIRM_MARGIN have how often each differed from the whole frame: never, on the frames measured).
        `merge=False` leaves overlapping boxes apart (see `postprocess`).
        """
        check_frames(frames)
        if not frames:
            return []
        if kinds is not None and len(kinds) != len(frames):
            raise ValueError(f"{len(kinds)} kind sets for {len(frames)} frames")
        factors = [downscale_factor(f.shape[1], f.shape[0], self.max_side) for f in frames]
        inputs = [
            frame if factor == 1.0 else _resize(frame, factor) for frame, factor in zip(frames, factors, strict=True)
        ]
        raw: list[list[Detection]] = [[] for _ in frames]
        for detector in self.detectors:
            offered: Set[Kind] | None = getattr(detector, "kinds", None)
            wanted = [i for i in range(len(frames)) if kinds is None or offered is None or offered & kinds[i]]
            if not wanted:
                continue
            found = self._run_backend(detector, wanted, inputs, frames, around, offered)
            if len(found) != len(wanted):
                raise RuntimeError(f"{type(detector).__name__} returned {len(found)} results for {len(wanted)} frames")
            for i, detections in zip(wanted, found, strict=True):
                raw[i].extend(detections)
        if self.check is not None:
            raw = [self.check.keep(small, boxes) if boxes else boxes for small, boxes in zip(inputs, raw, strict=True)]
        out: list[list[Detection]] = []
        for frame, small, detections in zip(frames, inputs, raw, strict=True):
            height, width = frame.shape[:2]
            # Exact per-axis ratios: the resized copy's sides were rounded to whole pixels.
            sx, sy = width / small.shape[1], height / small.shape[0]
            out.append(self.postprocess(detections, width, height, sx, sy, merge))
        return out

    def _run_backend(
        self,
        detector: Detector,
        wanted: list[int],
        inputs: Sequence[Frame],
        frames: Sequence[Frame],
        around: Sequence[Sequence[Detection]] | None,
        offered: Set[Kind] | None,
    ) -> list[list[Detection]]:
        """`detector` on the wanted inputs; with `around`, only on those whose window screen finds something."""
        look_in_windows = getattr(detector, "detect_windows", None)
        if around is None or look_in_windows is None:
            return detector.detect([inputs[i] for i in wanted])
        targets: dict[int, list[Detection]] = {}  # the `around` boxes of the detector's kinds, in input pixels
        windows: dict[int, list[Window]] = {}
        for i in wanted:
            small, frame = inputs[i], frames[i]
            sx, sy = frame.shape[1] / small.shape[1], frame.shape[0] / small.shape[0]
            targets[i] = [d.scaled(1 / sx, 1 / sy) for d in around[i] if offered is None or d.kind in offered]
            found = windows_around(targets[i], small.shape[1], small.shape[0])
            if worth_windows(found, small.shape[1], small.shape[0]):
                windows[i] = found
        results: dict[int, list[Detection]] = {}
        if windows:
            threshold = getattr(detector, "threshold", None)
            screen = None if threshold is None else threshold * self.screen_factor
            seen: list[list[Detection]] = look_in_windows([inputs[i] for i in windows], list(windows.values()), screen)
            for i, screened in zip(windows, seen, strict=True):
                sx, sy = frames[i].shape[1] / inputs[i].shape[1], frames[i].shape[0] / inputs[i].shape[0]
                padded = [d.scaled(sx, sy).padded(self.padding.get(d.kind, 0.0)) for d in screened]
                if not any(_inside(new, old) >= SCREEN_OVERLAP for new in padded for old in around[i]):
                    results[i] = []  # nothing screened lies on an anonymized box
            flagged = [i for i in windows if i not in results]
            results.update(self._confirm(detector, {i: targets[i] for i in flagged}, inputs))
        whole = [i for i in wanted if i not in results]
        if whole:
            results.update(zip(whole, detector.detect([inputs[i] for i in whole]), strict=True))
        return [results[i] for i in wanted]

    def _confirm(
        self, detector: Detector, targets: Mapping[int, Sequence[Detection]], inputs: Sequence[Frame]
    ) -> dict[int, list[Detection]]:
        """What `detector` finds, at its own threshold, in windows `confirm_margin` network input pixels around
        each frame's `targets` on its grid, for the frames where those windows cover under WHOLE_FRAME_SHARE of it; the
        other frames are left out (the whole frame decides there)."""
        window_grid = getattr(detector, "window_grid", None)
        look_in_windows = getattr(detector, "detect_windows", None)
        if self.confirm_margin is None or window_grid is None or look_in_windows is None:
            return {}
        windows: dict[int, list[Window]] = {}
        for i, boxes in targets.items():
            height, width = inputs[i].shape[:2]
            grid: int | None = window_grid(width, height)
            if grid is None:
                continue
            found = windows_on_grid(
                boxes, width, height, _frame_pixels(detector, self.confirm_margin, width, height), grid
            )
            if worth_windows(found, width, height):
                windows[i] = found
        if not windows:
            return {}
        seen: list[list[Detection]] = look_in_windows([inputs[i] for i in windows], list(windows.values()))
        return dict(zip(windows, seen, strict=True))

    def postprocess(
        self,
        detections: Iterable[Detection],
        width: int,
        height: int,
        sx: float = 1.0,
        sy: float = 1.0,
        merge: bool = True,
    ) -> list[Detection]:
        """Scale by (sx, sy) to the full frame, pad, clip to `width` x `height`, merge (unless `merge` is false:
        a check that matches boxes against anonymized ones must not see a found box grown by a neighbour's)."""
        boxes: list[Detection] = []
        for detection in detections:
            full = detection if sx == sy == 1.0 else detection.scaled(sx, sy)
            clipped = full.padded(self.padding.get(full.kind, 0.0)).clipped(width, height)
            if clipped is not None:
                boxes.append(clipped)
        return merge_overlapping(boxes, self.merge_iou) if merge else boxes


def _frame_pixels(detector: Detector, network_pixels: int, width: int, height: int) -> int:
    """`network_pixels` of the detector's input in a `width` x `height` frame's pixels: fewer where its passes
    upscale the frame (the least upscaling pass counts)."""
    pass_sizes = getattr(detector, "pass_sizes", None)
    factors = [size[0] / width for size in pass_sizes(width, height)] if pass_sizes is not None else []
    return math.ceil(network_pixels / min(factors, default=1.0))


def _inside(new: Detection, old: Detection) -> float:
    """The share of `new` inside `old` (0 for another kind)."""
    if new.kind != old.kind:
        return 0.0
    width = max(0.0, min(new.x2, old.x2) - max(new.x1, old.x1))
    height = max(0.0, min(new.y2, old.y2) - max(new.y1, old.y1))
    return width * height / max(new.area, 1e-9)


def _resize(frame: Frame, factor: float) -> Frame:
    height, width = frame.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    # INTER_AREA averages pixels when shrinking, which keeps small faces more recognisable than bilinear.
    resized: Frame = np.ascontiguousarray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
    return resized
