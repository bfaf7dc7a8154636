"""Frames from files as source items: images, folders of images, and videos (every Nth frame)."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from veilstream.decoding.images import DecodeLimits, Frame, open_image
from veilstream.errors import FrameError

if TYPE_CHECKING:
    from veilstream.runner import Origin, SourceItem

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mkv", ".mov", ".m4v"})
MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A path that is not read as an input, and why: `unsupported_type`, `directory` (a folder named like an
    image or video; its files are read), `broken_link`, `symlink_loop`, `already_read` (a second link to a
    folder), `not_a_file` (a device, socket or pipe), `unreadable` or `unreadable_folder` (no permission)."""

    input: str
    reason: str
    detail: str


@dataclass
class InputScan:
    """The files to read, in order, and every path passed over with its reason."""

    files: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, path: Path, reason: str, detail: str) -> None:
        self.skipped.append(Skipped(str(path), reason, detail))
        log.warning("skipped %s: %s: %s", path, reason, detail)


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


def scan_inputs(paths: Sequence[Path]) -> InputScan:
    """Files as given, folders walked (sorted, recursive, following links to folders once) to their image and
    video files. A path named on the command line that does not exist stays a file (its read fails as
    `not_found`); everything else that is not read is in `skipped`, with its reason."""
    scan = InputScan()
    walked: set[Path] = set()
    for path in paths:
        if not path.exists() and not path.is_symlink():
            scan.files.append(path)
        else:
            _scan(path, scan, walked, ())
    return scan


def _scan(path: Path, scan: InputScan, walked: set[Path], ancestors: tuple[Path, ...]) -> None:
    try:
        mode = path.stat().st_mode  # follows links
    except OSError as error:
        if error.errno == errno.ELOOP:
            scan.skip(path, "symlink_loop", "the link leads back to itself")
        elif path.is_symlink():
            scan.skip(path, "broken_link", f"the link points to {os.readlink(path)}, which does not exist")
        else:
            scan.skip(path, "unreadable", str(error))
        return
    suffix = path.suffix.lower()
    if stat.S_ISDIR(mode):
        real = path.resolve()
        if real in ancestors:
            scan.skip(path, "symlink_loop", f"a link to {real}, a folder it is inside of")
            return
        if real in walked:
            scan.skip(path, "already_read", f"a link to {real}, whose files are read once")
            return
        if suffix in MEDIA_SUFFIXES:
            scan.skip(path, "directory", f"a folder named like a {suffix} file; the files inside it are read")
        walked.add(real)
        try:
            children = sorted(path.iterdir())
        except OSError as error:
            scan.skip(path, "unreadable_folder", str(error))
            return
        for child in children:
            _scan(child, scan, walked, (*ancestors, real))
    elif not stat.S_ISREG(mode):
        scan.skip(path, "not_a_file", "a device, socket or pipe")
    elif suffix in MEDIA_SUFFIXES:
        scan.files.append(path)
    else:
        kinds = " ".join(sorted(MEDIA_SUFFIXES))
        scan.skip(path, "unsupported_type", f"{suffix or 'no suffix'}: not an image or video suffix ({kinds})")


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
        raise FrameError(
            "unreadable_video", "the input does not open as a video (corrupt, truncated or an unknown codec)"
        )
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
            raise FrameError("empty_video", "the input video has no readable frame")
    finally:
        capture.release()


def file_items(
    inputs: Sequence[Path] | InputScan,
    video_step: int = 1,
    limits: DecodeLimits | None = None,
    video_limit: int | None = None,
) -> Iterator[SourceItem]:
    """A source item per image frame and per video frame, in input order. The camera id is the input's file
    name, `source` its path and `sequence` the frame number within a video or a multi-frame image (GIF, TIFF
    pages, ...; None for a single image). An input that cannot be read becomes one item with its error, so it
    gets a record like every other input, and the rest go on. Paths are scanned with `scan_inputs` unless a scan
    is given (whose `skipped` the caller reports)."""
    # Imported here: the runner pulls in torch, which `replay` (videos and folders only) does without.
    from veilstream.runner import Origin, SourceItem

    scan = inputs if isinstance(inputs, InputScan) else scan_inputs(inputs)
    for path in scan.files:
        origin = Origin(camera_id=path.name, source=str(path))
        if not path.exists():
            yield SourceItem(origin, error=FrameError("not_found", "no such file or folder"))
            continue
        try:
            if is_video(path):
                for frame in iter_video(path, video_step, video_limit):
                    yield SourceItem(replace(origin, sequence=frame.index), frame.frame)
            else:
                yield from _image_items(path.read_bytes(), origin, limits)
        except FrameError as error:
            yield SourceItem(origin, error=error)
        except OSError as error:
            yield SourceItem(origin, error=FrameError("unreadable", f"the input cannot be read: {error}"))


def _image_items(data: bytes, origin: Origin, limits: DecodeLimits | None) -> Iterator[SourceItem]:
    """Every frame of an image file; a frame that fails ends the file with an item carrying its error."""
    from veilstream.runner import SourceItem

    image = open_image(data, limits)
    several = image.header.frames > 1
    done = 0
    try:
        for frame in image.frames():
            yield SourceItem(replace(origin, sequence=done if several else None), frame)
            done += 1
    except FrameError as error:
        yield SourceItem(replace(origin, sequence=done if several else None), error=error)
