"""Pure measurements of privacy on a published frame against its labels.

"Anonymized" is decided on the pixels: `detail_kept` is how much of the original's detail (a high-pass of the grey
image at a scale proportional to the box, so that eyes and mouth count for a large face as single pixels do for a
tiny one) is still in the published box, as the least-squares factor of the published detail on the original
detail. An untouched box keeps about 0.9-1 (JPEG loses some), a blurred or masked box about 0. The threshold
(`ANONYMIZED_BELOW`) was chosen by looking at boxes on both sides of it (datasets/privacy/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from veilstream.evaluation.labels import Box

Detail = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

HEIGHT_BINS: tuple[tuple[str, float, float], ...] = (
    ("<10", 0.0, 10.0),
    ("10-16", 10.0, 16.0),
    ("16-32", 16.0, 32.0),
    ("32-64", 32.0, 64.0),
    (">=64", 64.0, math.inf),
)
# Scale of the detail measure: a Gaussian of this share of the box height (at least MIN_DETAIL_SIGMA px) separates
# the features that make a face recognisable from its overall shading.
DETAIL_FRACTION = 1 / 16
MIN_DETAIL_SIGMA = 1.0
# Below this mean squared detail per pixel a box is flat: there is nothing to hide, the measure is undefined.
MIN_DETAIL_ENERGY = 0.5
ANONYMIZED_BELOW = 0.2


def height_bin(height: float) -> str:
    """The face-height bin (px) a box of this height falls in."""
    for name, low, high in HEIGHT_BINS:
        if low <= height < high:
            return name
    raise ValueError(f"a box height must be >= 0, got {height!r}")


def pixel_bounds(box: Box, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Integer x1, y1, x2, y2 of the pixels a box touches, clipped to the frame; None if it misses the frame."""
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def detail_sigma(box: Box) -> float:
    return max(MIN_DETAIL_SIGMA, DETAIL_FRACTION * (box[3] - box[1]))


def detail(grey: Detail, sigma: float) -> Detail:
    """The detail of a grey image at scale `sigma`: the image minus its Gaussian blur."""
    fine: Detail = grey - cv2.GaussianBlur(grey, (0, 0), sigma)
    return fine


def grey(frame: npt.NDArray[np.uint8]) -> Detail:
    """Mean of the colour channels, as float32."""
    values: Detail = frame.astype(np.float32).mean(axis=2)
    return values


def detail_kept(original: Detail, published: Detail, box: Box) -> float | None:
    """Share of the original's detail in `box` still present in the published frame (both grey images); None for a
    flat box, which has nothing to hide."""
    height, width = original.shape
    inner = pixel_bounds(box, width, height)
    if inner is None:
        return None
    sigma = detail_sigma(box)
    # Filter a margin around the box too, so its border pixels see real neighbours.
    margin = math.ceil(3 * sigma)
    x1, y1 = max(0, inner[0] - margin), max(0, inner[1] - margin)
    x2, y2 = min(width, inner[2] + margin), min(height, inner[3] + margin)
    window = (slice(inner[1] - y1, inner[3] - y1), slice(inner[0] - x1, inner[2] - x1))
    before = detail(original[y1:y2, x1:x2], sigma)[window].astype(np.float64)
    after = detail(published[y1:y2, x1:x2], sigma)[window].astype(np.float64)
    energy = float((before * before).sum())
    if energy < MIN_DETAIL_ENERGY * before.size:
        return None
    return float((before * after).sum()) / energy


def is_anonymized(kept: float | None, threshold: float = ANONYMIZED_BELOW) -> bool | None:
    """Hidden when less than `threshold` of the detail is left; None when the box had no detail to judge."""
    return None if kept is None else kept < threshold


def coverage(box: Box, mask: Mask) -> float:
    """Share of the box's pixels inside `mask` (0 for a box outside the frame)."""
    bounds = pixel_bounds(box, mask.shape[1], mask.shape[0])
    if bounds is None:
        return 0.0
    x1, y1, x2, y2 = bounds
    return float(mask[y1:y2, x1:x2].mean())


def grown(box: Box, fraction: float) -> Box:
    """The box grown by `fraction` of its width (height) on the left and right (top and bottom)."""
    dx, dy = (box[2] - box[0]) * fraction, (box[3] - box[1]) * fraction
    return box[0] - dx, box[1] - dy, box[2] + dx, box[3] + dy


def box_mask(boxes: Iterable[Box], height: int, width: int) -> Mask:
    """Union of the boxes' pixels."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        bounds = pixel_bounds(box, width, height)
        if bounds is not None:
            x1, y1, x2, y2 = bounds
            mask[y1:y2, x1:x2] = True
    return mask


@dataclass(frozen=True)
class BlurredArea:
    """Blurred pixels where nothing is labelled, as counts so frames can be summed."""

    blurred_outside: int
    outside: int
    blurred_away: int
    away: int
    blurred: int
    pixels: int


def blurred_area(blurred: Mask, labelled: Sequence[Box], margin: float) -> BlurredArea:
    """Count blurred pixels outside the labelled boxes, and away from them (boxes grown by `margin` of their size
    on each side: what a detector's padding around a true object may blur)."""
    height, width = blurred.shape
    inside = box_mask(labelled, height, width)
    near = box_mask((grown(b, margin) for b in labelled), height, width)
    return BlurredArea(
        blurred_outside=int((blurred & ~inside).sum()),
        outside=int((~inside).sum()),
        blurred_away=int((blurred & ~near).sum()),
        away=int((~near).sum()),
        blurred=int(blurred.sum()),
        pixels=int(blurred.size),
    )


def covered_share(label: Box, detection: Box) -> float:
    """Share of the labelled box's area inside the detection box."""
    iw = min(label[2], detection[2]) - max(label[0], detection[0])
    ih = min(label[3], detection[3]) - max(label[1], detection[1])
    area = (label[2] - label[0]) * (label[3] - label[1])
    return 0.0 if iw <= 0 or ih <= 0 or area <= 0 else iw * ih / area


def is_on(label: Box, detection: Box, min_share: float = 0.5) -> bool:
    """A detection is on a labelled object when it covers at least `min_share` of the object's box, or when the
    object covers at least that share of it (one detection for several objects, or a part of a large one)."""
    return covered_share(label, detection) >= min_share or covered_share(detection, label) >= min_share


def detection_verdict(detection: Box, objects: Sequence[Box], difficult: Sequence[Box], ignore: Sequence[Box]) -> str:
    """'object' on a labelled object of its kind, 'difficult' on a difficult one, 'ignored' in an ignored area,
    else 'false'."""
    if any(is_on(box, detection) for box in objects):
        return "object"
    if any(is_on(box, detection) for box in difficult):
        return "difficult"
    if any(covered_share(detection, area) >= 0.5 for area in ignore):
        return "ignored"
    return "false"


@dataclass(frozen=True)
class Flicker:
    """An object hidden in frame `frame` and visible in the next frame."""

    track: str
    frame: int


def flicker_events(states: Mapping[int, Mapping[str, bool]]) -> list[Flicker]:
    """`states[frame][track]` is True when the object was anonymized in that frame. An event is a track hidden
    in frame t and visible (False) in frame t + 1; frames not in `states` break the sequence."""
    events = []
    for frame in sorted(states):
        following = states.get(frame + 1)
        if following is None:
            continue
        for track, hidden in states[frame].items():
            if hidden and following.get(track) is False:
                events.append(Flicker(track, frame))
    return events


@dataclass(frozen=True)
class Recall:
    labelled: int
    anonymized: int

    @property
    def recall(self) -> float | None:
        return None if self.labelled == 0 else self.anonymized / self.labelled


def recall_by_bin(objects: Iterable[tuple[float, bool]]) -> dict[str, Recall]:
    """(height, anonymized) pairs -> recall per height bin (every bin present, in order)."""
    counts = {name: [0, 0] for name, _, _ in HEIGHT_BINS}
    for height, hidden in objects:
        entry = counts[height_bin(height)]
        entry[0] += 1
        entry[1] += int(hidden)
    return {name: Recall(labelled, hidden) for name, (labelled, hidden) in counts.items()}
