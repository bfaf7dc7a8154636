"""The labelled privacy set (datasets/privacy/labels.json): faces and plates on frames of the sample media.

Boxes are x1, y1, x2, y2 in pixels of the decoded frame (origin top-left, x2 and y2 exclusive). A `difficult`
object (a head whose face cannot be told, a plate too small to read) is neither required nor counted as a false
blur; `ignore` areas of a frame (a defocused crowd) are not judged at all. Objects of one video that share a
`track` are the same person or plate in different frames (flicker is counted along tracks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from veilstream.detectors.base import Kind

Box = tuple[float, float, float, float]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_box(box: Box) -> None:
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        raise ValueError(f"a box needs 0 <= x1 < x2 and 0 <= y1 < y2, got {box}")


class LabelledObject(_Frozen):
    kind: Kind
    box: Box
    height: float = Field(description="box height in pixels (y2 - y1), kept for readers of the file")
    difficult: bool = False
    track: str | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LabelledObject:
        _check_box(self.box)
        if abs(self.height - (self.box[3] - self.box[1])) > 0.51:
            raise ValueError(f"height {self.height} does not match the box {self.box}")
        return self


class LabelledFrame(_Frozen):
    media: str
    frame: int | None = Field(default=None, ge=0, description="frame index in a video; None for a still image")
    objects: tuple[LabelledObject, ...] = ()
    ignore: tuple[Box, ...] = ()

    @property
    def key(self) -> tuple[str, int | None]:
        return self.media, self.frame


class MediaFile(_Frozen):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    frames: int | None = Field(default=None, gt=0, description="frame count of a video; None for an image")
    source: str


class Run(_Frozen):
    """Consecutive frames of one video, every one labelled: where flicker is measured."""

    media: str
    first: int = Field(ge=0)
    last: int = Field(ge=0)

    def indices(self) -> range:
        return range(self.first, self.last + 1)


class LabelSet(_Frozen):
    version: Literal[1] = 1
    description: str = ""
    media: tuple[MediaFile, ...]
    runs: tuple[Run, ...] = ()
    frames: tuple[LabelledFrame, ...]

    @model_validator(mode="after")
    def _references(self) -> LabelSet:
        media = {m.name: m for m in self.media}
        if len(media) != len(self.media):
            raise ValueError("a media file is listed twice")
        seen: set[tuple[str, int | None]] = set()
        for frame in self.frames:
            file = media.get(frame.media)
            if file is None:
                raise ValueError(f"frame of unknown media {frame.media!r}")
            if (frame.frame is None) != (file.frames is None):
                raise ValueError(f"{frame.media}: a video frame needs its index, an image none")
            if file.frames is not None and frame.frame is not None and frame.frame >= file.frames:
                raise ValueError(f"{frame.media} has {file.frames} frames, not frame {frame.frame}")
            if frame.key in seen:
                raise ValueError(f"{frame.media} frame {frame.frame} is labelled twice")
            seen.add(frame.key)
            for box in (*(o.box for o in frame.objects), *frame.ignore):
                _check_box(box)
                if box[2] > file.width + 0.01 or box[3] > file.height + 0.01:
                    raise ValueError(f"{frame.media}: box {box} leaves the {file.width}x{file.height} frame")
        for run in self.runs:
            if run.last <= run.first:
                raise ValueError(f"run {run.media} {run.first}..{run.last} is empty")
            missing = [i for i in run.indices() if (run.media, i) not in seen]
            if missing:
                raise ValueError(f"run {run.media} {run.first}..{run.last} lacks labelled frames {missing[:5]}")
        return self

    def by_media(self) -> dict[str, list[LabelledFrame]]:
        """Labelled frames per media file, in frame order."""
        grouped: dict[str, list[LabelledFrame]] = {}
        for frame in self.frames:
            grouped.setdefault(frame.media, []).append(frame)
        for frames in grouped.values():
            frames.sort(key=lambda f: -1 if f.frame is None else f.frame)
        return grouped

    def objects(self) -> Iterator[tuple[LabelledFrame, LabelledObject]]:
        for frame in self.frames:
            for item in frame.objects:
                yield frame, item


def load_labels(path: Path) -> LabelSet:
    return LabelSet.model_validate_json(path.read_text())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def media_problems(labels: LabelSet, folder: Path) -> list[str]:
    """What is wrong with the media folder for these labels (missing files, other checksums); empty if fine."""
    problems = []
    for file in labels.media:
        path = folder / file.name
        if not path.is_file():
            problems.append(f"{file.name}: missing in {folder}")
        elif sha256(path) != file.sha256:
            problems.append(f"{file.name}: checksum differs from the labelled file")
    return problems
