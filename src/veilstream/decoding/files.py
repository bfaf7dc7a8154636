"""Frames from files: images, folders of images, and videos (every Nth frame)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from veilstream.decoding.images import DecodeLimits, Frame, decode_frame
from veilstream.errors import FrameError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".m4v"})


@dataclass(frozen=True)
class SourceFrame:
    """A decoded frame and where it came from (`index` is the frame number within a video, else 0)."""

    source: str
    index: int
    frame: Frame


@dataclass(frozen=True)
class InputFailure:
    """An input that yielded no frame, with a stable reason code."""

    source: str
    reason: str
    detail: str


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    width: int
    height: int
    frames: int


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded (sorted, recursive) to their image and video files."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
            )
        else:
            files.append(path)
    return files


def video_info(path: Path) -> VideoInfo:
    capture = cv2.VideoCapture(str(path))
    try:
        return VideoInfo(
            fps=float(capture.get(cv2.CAP_PROP_FPS)) or 25.0,
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            frames=int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
        )
    finally:
        capture.release()


def iter_video(path: Path, step: int = 1, limit: int | None = None) -> Iterator[SourceFrame]:
    """Every `step`-th frame of a video, RGB; raises FrameError if nothing can be read."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise FrameError("unreadable_video", f"{path} does not open as a video")
    try:
        index = emitted = 0
        while limit is None or emitted < limit:
            if not capture.grab():
                break
            if index % step == 0:
                ok, bgr = capture.retrieve()
                if not ok:
                    break
                yield SourceFrame(str(path), index, np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                emitted += 1
            index += 1
        if index == 0:
            raise FrameError("empty_video", f"{path} has no readable frame")
    finally:
        capture.release()


def iter_frames(
    paths: Sequence[Path],
    video_step: int = 1,
    limits: DecodeLimits | None = None,
    video_limit: int | None = None,
) -> Iterator[SourceFrame | InputFailure]:
    """Frames of every input in order; an input that cannot be read yields one InputFailure and the rest go on."""
    for path in expand_inputs(paths):
        name = str(path)
        if not path.exists():
            yield InputFailure(name, "not_found", "no such file or folder")
            continue
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                yield from iter_video(path, video_step, video_limit)
            else:
                yield SourceFrame(name, 0, decode_frame(path.read_bytes(), limits))
        except FrameError as error:
            yield InputFailure(name, error.reason, error.detail)
        except OSError as error:
            yield InputFailure(name, "unreadable", str(error))
