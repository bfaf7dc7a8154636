"""Objects kept across frames: a face found in frame t stays hidden while the detector misses it in the next frames.

Per camera, every box found in the last `frames` frames (and `seconds` of capture time) is remembered with its
motion. In a frame where no detection covers a remembered box, the box is blurred where its motion predicts it,
grown a little per frame for the uncertainty. Detections are always used as they are: unlike a tracker (ByteTrack
returns a new track only once it is matched again, and no lost tracks), nothing is ever held back.

Frames of one camera must arrive in order. A gap in the sequence numbers (or, without them, more than `seconds`
of capture time), a frame out of order and a frame without a key all start the camera afresh: what cannot be
predicted is not blurred from memory. The state is per camera and can be dropped per camera or per Kafka
partition (when the partition is revoked, its cameras go to another worker). At most `max_cameras` cameras are
kept: past that the camera seen longest ago is dropped (its next frame starts afresh, as after a gap), so a flood
of camera ids cannot grow the memory without limit.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from veilstream.detectors.base import Detection

# A detection continues a remembered box when their IoU reaches this (boxes are padded: a walking face's boxes in
# consecutive frames overlap by 0.5 or more).
MATCH_IOU = 0.1
# A remembered box covered at least this much by a detection of its kind is not added again.
COVERED = 0.7
# Motion is smoothed over frames (share of the newest step) and capped per frame at this share of the box size.
SMOOTHING = 0.5
MAX_STEP = 0.5
# Cameras with state: far more than one worker serves (each camera's frames are a few kB of state, so the bound is
# tens of MB at most), few enough that ids made up per message cannot exhaust memory.
MAX_CAMERAS = 4096


@dataclass(frozen=True)
class FrameKey:
    """Which camera a frame is from and where it stands in that camera's stream."""

    camera_id: str
    sequence: int | None = None
    capture_time: datetime | None = None
    partition: tuple[str, int] | None = None
    """(topic, partition) the camera's frames come from, where they come from Kafka."""


@dataclass
class _Track:
    box: Detection
    vx: float = 0.0
    vy: float = 0.0
    missed: int = 0
    seen_at: datetime | None = None

    def predicted(self, growth: float) -> Detection:
        """Where the box is expected in the next frame (`missed` + 1 frames after it was last seen)."""
        steps = self.missed + 1
        moved = Detection(
            self.box.x1 + self.vx * steps,
            self.box.y1 + self.vy * steps,
            self.box.x2 + self.vx * steps,
            self.box.y2 + self.vy * steps,
            self.box.score,
            self.box.kind,
        )
        return moved.padded(growth * steps)

    def follow(self, detection: Detection, capture_time: datetime | None) -> None:
        """The detection is this object again: take its box and update the motion."""
        steps = self.missed + 1
        dx = ((detection.x1 + detection.x2) - (self.box.x1 + self.box.x2)) / 2 / steps
        dy = ((detection.y1 + detection.y2) - (self.box.y1 + self.box.y2)) / 2 / steps
        self.vx = _capped((1 - SMOOTHING) * self.vx + SMOOTHING * dx, MAX_STEP * detection.width)
        self.vy = _capped((1 - SMOOTHING) * self.vy + SMOOTHING * dy, MAX_STEP * detection.height)
        self.box, self.missed, self.seen_at = detection, 0, capture_time


def _capped(value: float, limit: float) -> float:
    return max(-limit, min(limit, value))


@dataclass
class _Camera:
    tracks: list[_Track] = field(default_factory=list)
    sequence: int | None = None
    capture_time: datetime | None = None
    partition: tuple[str, int] | None = None


class DetectionMemory:
    """The boxes of recent frames, per camera. `frames`: how many frames a box is kept after it was last found
    (0 = no memory); `seconds`: the same in capture time (None = frames only); `growth`: share of a box's size
    added on each side per frame it is predicted (motion is not exact); `max_cameras`: cameras kept, the one seen
    longest ago is dropped first."""

    def __init__(
        self, frames: int = 5, seconds: float | None = 1.0, growth: float = 0.1, max_cameras: int = MAX_CAMERAS
    ) -> None:
        if frames < 0:
            raise ValueError(f"memory frames must be >= 0, got {frames!r}")
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"memory seconds must be > 0 or None, got {seconds!r}")
        if not (math.isfinite(growth) and 0 <= growth <= 1):
            raise ValueError(f"memory growth must be in [0, 1], got {growth!r}")
        if max_cameras < 1:
            raise ValueError(f"memory max_cameras must be >= 1, got {max_cameras!r}")
        self.frames = frames
        self.seconds = seconds
        self.growth = growth
        self.max_cameras = max_cameras
        self._cameras: OrderedDict[str, _Camera] = OrderedDict()  # the camera seen longest ago first

    @property
    def cameras(self) -> frozenset[str]:
        """The cameras with state."""
        return frozenset(self._cameras)

    def remember(
        self, key: FrameKey | None, detections: Sequence[Detection], width: int, height: int
    ) -> list[Detection]:
        """Record this frame's detections; return the remembered boxes (predicted, clipped to the `width` x
        `height` frame) that none of them covers. Frames of a camera must be given in order."""
        if key is None or self.frames == 0:
            return []
        camera = self._cameras.get(key.camera_id)
        if camera is None or not self._continues(camera, key):
            camera = self._cameras[key.camera_id] = _Camera()
        self._cameras.move_to_end(key.camera_id)
        while len(self._cameras) > self.max_cameras:
            self._cameras.popitem(last=False)
        camera.sequence, camera.capture_time, camera.partition = key.sequence, key.capture_time, key.partition
        remembered: list[Detection] = []
        unmatched = list(detections)
        kept: list[_Track] = []
        for track in camera.tracks:
            if not self._fresh(track, key.capture_time):
                continue
            guess = track.predicted(self.growth)
            match = max(
                (d for d in unmatched if d.kind == guess.kind and d.iou(guess) >= MATCH_IOU),
                key=guess.iou,
                default=None,
            )
            if match is not None:
                unmatched.remove(match)
                track.follow(match, key.capture_time)
                kept.append(track)
                continue
            track.missed += 1
            shown = guess.clipped(width, height)
            if shown is None:  # predicted out of the picture: gone
                continue
            kept.append(track)
            if not any(d.kind == shown.kind and _share_inside(shown, d) >= COVERED for d in detections):
                remembered.append(shown)
        kept.extend(_Track(d, seen_at=key.capture_time) for d in unmatched)
        camera.tracks = kept
        return remembered

    def _continues(self, camera: _Camera, key: FrameKey) -> bool:
        """This frame directly follows the camera's last one (else what was remembered cannot be placed)."""
        if key.sequence is not None and camera.sequence is not None:
            return key.sequence == camera.sequence + 1
        if key.capture_time is not None and camera.capture_time is not None:
            elapsed = (key.capture_time - camera.capture_time).total_seconds()
            return elapsed > 0 and (self.seconds is None or elapsed <= self.seconds)
        return False

    def _fresh(self, track: _Track, now: datetime | None) -> bool:
        """Still within the memory: seen at most `frames` frames and `seconds` ago (before this frame)."""
        if track.missed + 1 > self.frames:
            return False
        if self.seconds is not None and now is not None and track.seen_at is not None:
            return (now - track.seen_at).total_seconds() <= self.seconds
        return True

    def forget(self, cameras: Collection[str]) -> None:
        """Drop the state of these cameras."""
        for camera in cameras:
            self._cameras.pop(camera, None)

    def forget_partitions(self, partitions: Collection[tuple[str, int]]) -> None:
        """Drop the cameras whose frames came from these (topic, partition) pairs (revoked from this worker)."""
        gone = set(partitions)
        self.forget([name for name, camera in self._cameras.items() if camera.partition in gone])

    def clear(self) -> None:
        self._cameras.clear()


def _share_inside(box: Detection, other: Detection) -> float:
    """The share of `box`'s area inside `other`."""
    iw = min(box.x2, other.x2) - max(box.x1, other.x1)
    ih = min(box.y2, other.y2) - max(box.y1, other.y1)
    return 0.0 if iw <= 0 or ih <= 0 else iw * ih / box.area
