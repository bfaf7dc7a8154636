"""Frames from files as source items: images, folders of images, and videos (every Nth frame)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from veilstream.decoding.images import DecodeLimits, Frame, decode_frame
from veilstream.errors import FrameError

if TYPE_CHECKING:
    from veilstream.runner import SourceItem

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".m4v"})


@dataclass(frozen=True)
class SourceFrame:
    """A decoded video frame and where it came from (`index` is the frame number within the video)."""

    source: str
    index: int
    frame: Frame


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    width: int
    height: int
    frames: int


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


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


def file_items(
    paths: Sequence[Path],
    video_step: int = 1,
    limits: DecodeLimits | None = None,
    video_limit: int | None = None,
) -> Iterator[SourceItem]:
    """A source item per image and per video frame, in input order. The camera id is the input's file name,
    `source` its path and `sequence` the frame number within a video (None for an image). An input that cannot
    be read becomes one item with its error, so it gets a record like every other input, and the rest go on."""
    # Imported here: the runner pulls in torch, which `replay` (videos and folders only) does without.
    from veilstream.runner import Origin, SourceItem

    for path in expand_inputs(paths):
        origin = Origin(camera_id=path.name, source=str(path))
        if not path.exists():
            yield SourceItem(origin, error=FrameError("not_found", "no such file or folder"))
            continue
        try:
            if is_video(path):
                for frame in iter_video(path, video_step, video_limit):
                    yield SourceItem(replace(origin, sequence=frame.index), frame.frame)
            else:
                yield SourceItem(origin, decode_frame(path.read_bytes(), limits))
        except FrameError as error:
            yield SourceItem(origin, error=error)
        except OSError as error:
            yield SourceItem(origin, error=FrameError("unreadable", str(error)))
