"""`veilstream replay`: publish recorded traffic (videos, image folders, labelled manifests) as frame messages.

Messages follow the input contract (schemas.InputFrameHeaders): key = camera id, value = the encoded image,
headers camera-id, sequence, capture-time, content-type and, when known, ground-truth.
"""

from __future__ import annotations

import csv
import heapq
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from veilstream.decoding.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES, iter_video, video_info
from veilstream.decoding.formats import CONTENT_TYPES, sniff_codec
from veilstream.errors import ConfigError
from veilstream.publishing.encoding import encode_frame

RateMode = Literal["recorded", "max", "fixed"]
MANIFEST_SUFFIXES = frozenset({".csv", ".jsonl"})


@dataclass(frozen=True)
class ReplayItem:
    """One frame to publish. `offset_s` is its time since the start of its source (for rate control)."""

    camera_id: str
    sequence: int
    offset_s: float
    capture_time: datetime | None
    load: Callable[[], bytes] = field(compare=False, repr=False)
    ground_truth: str | None = None

    def headers(self, data: bytes) -> list[tuple[str, bytes]]:
        codec = sniff_codec(data)
        headers = [("camera-id", self.camera_id.encode()), ("sequence", str(self.sequence).encode())]
        if codec is not None:
            headers.append(("content-type", CONTENT_TYPES[codec].encode()))
        if self.capture_time is not None:
            headers.append(("capture-time", self.capture_time.isoformat().encode()))
        if self.ground_truth is not None:
            headers.append(("ground-truth", self.ground_truth.encode()))
        return headers


@dataclass(frozen=True)
class ManifestError:
    path: str
    line: int
    message: str


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def read_manifest(path: Path, errors: list[ManifestError]) -> list[ReplayItem]:
    """Rows of a CSV (header: path,camera_id[,capture_time][,ground_truth]) or JSONL manifest.

    Frame paths are relative to the manifest. Bad rows are appended to `errors` with their line numbers.
    """
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(index + 2, dict(row)) for index, row in enumerate(reader)]
    else:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                errors.append(ManifestError(str(path), number, f"not JSON: {error.msg}"))
                continue
            if not isinstance(value, dict):
                errors.append(ManifestError(str(path), number, "expected a JSON object"))
                continue
            rows.append((number, value))
    items: list[ReplayItem] = []
    sequences: dict[str, int] = {}
    first_time: datetime | None = None
    for number, row in rows:
        frame = str(row.get("path") or "").strip()
        camera = str(row.get("camera_id") or "").strip()
        if not frame or not camera:
            errors.append(ManifestError(str(path), number, "needs 'path' and 'camera_id'"))
            continue
        file = (path.parent / frame).resolve()
        if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
            errors.append(ManifestError(str(path), number, f"no image file at {frame}"))
            continue
        capture: datetime | None = None
        if row.get("capture_time"):
            try:
                capture = _parse_time(str(row["capture_time"]))
            except ValueError:
                errors.append(ManifestError(str(path), number, f"bad capture_time {row['capture_time']!r}"))
                continue
        first_time = capture if first_time is None and capture is not None else first_time
        sequence = sequences.get(camera, 0)
        sequences[camera] = sequence + 1
        truth = str(row["ground_truth"]).strip() if row.get("ground_truth") else None
        offset = (capture - first_time).total_seconds() if capture is not None and first_time is not None else 0.0
        items.append(ReplayItem(camera, sequence, offset, capture, file.read_bytes, truth))
    return items


def video_items(path: Path, camera: str, start: datetime, quality: int = 90) -> Iterator[ReplayItem]:
    """Every frame of a video as JPEG, timed by the video's frame rate."""
    fps = video_info(path).fps
    for frame in iter_video(path):
        offset = frame.index / fps
        data = encode_frame(frame.frame, "jpeg", quality)
        yield ReplayItem(camera, frame.index, offset, start + timedelta(seconds=offset), _constant(data))


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def folder_items(path: Path, camera: str, start: datetime, fps: float) -> Iterator[ReplayItem]:
    """Images of a folder in name order, `fps` apart."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for index, file in enumerate(files):
        offset = index / fps
        yield ReplayItem(camera, index, offset, start + timedelta(seconds=offset), file.read_bytes)


def source_items(
    source: Path, camera: str | None, start: datetime, folder_fps: float, errors: list[ManifestError]
) -> Iterator[ReplayItem]:
    name = camera or source.stem
    if source.is_dir():
        return folder_items(source, name, start, folder_fps)
    suffix = source.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return video_items(source, name, start)
    if suffix in MANIFEST_SUFFIXES:
        return iter(read_manifest(source, errors))
    if suffix in IMAGE_SUFFIXES:
        return iter([ReplayItem(name, 0, 0.0, start, source.read_bytes)])
    raise ConfigError(f"{source}: not a video, image folder, image or manifest (.csv/.jsonl)")


def interleave(streams: Sequence[Iterable[ReplayItem]]) -> Iterator[ReplayItem]:
    """Merge several sources (cameras) by their time offsets, keeping each source's order."""
    iterators = [iter(s) for s in streams]
    heap: list[tuple[float, int, int, ReplayItem]] = []
    counter = 0
    for index, iterator in enumerate(iterators):
        item = next(iterator, None)
        if item is not None:
            heap.append((item.offset_s, index, counter, item))
            counter += 1
    heapq.heapify(heap)
    while heap:
        _, index, _, item = heapq.heappop(heap)
        yield item
        following = next(iterators[index], None)
        if following is not None:
            heapq.heappush(heap, (following.offset_s, index, counter, following))
            counter += 1


class Pacer:
    """When each message may be sent: as recorded (item offsets), at a fixed rate, or as fast as possible."""

    def __init__(self, mode: RateMode, fps: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if mode == "fixed" and (fps is None or fps <= 0):
            raise ConfigError("a fixed rate needs a positive fps")
        self.mode = mode
        self.fps = fps
        self.clock = clock
        self.start: float | None = None
        self.sent = 0
        self.loop_offset = 0.0

    def due(self, item: ReplayItem) -> float:
        """Seconds from the start at which `item` is due."""
        if self.mode == "max":
            return 0.0
        if self.mode == "fixed":
            assert self.fps is not None
            return self.sent / self.fps
        return self.loop_offset + item.offset_s

    def wait(self, item: ReplayItem, sleep: Callable[[float], None] = time.sleep) -> None:
        now = self.clock()
        if self.start is None:
            self.start = now
        delay = self.start + self.due(item) - now
        if delay > 0:
            sleep(delay)
        self.sent += 1


@dataclass
class ReplayStats:
    sent: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[ManifestError] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def replay(
    items_factory: Callable[[], Iterator[ReplayItem]],
    send: Callable[[ReplayItem, bytes], None],
    pacer: Pacer,
    start_at: int = 0,
    limit: int | None = None,
    loop: bool = False,
    on_sent: Callable[[int], None] | None = None,
) -> ReplayStats:
    """Send items in order, paced, skipping the first `start_at` (resumption); `loop` restarts the sources."""
    stats = ReplayStats()
    started = time.monotonic()
    position = 0
    while True:
        last_offset = 0.0
        any_item = False
        for item in items_factory():
            any_item = True
            last_offset = max(last_offset, item.offset_s)
            if position < start_at:
                position += 1
                stats.skipped += 1
                continue
            if limit is not None and stats.sent >= limit:
                stats.seconds = time.monotonic() - started
                return stats
            pacer.wait(item)
            data = item.load()
            send(item, data)
            stats.sent += 1
            stats.bytes += len(data)
            position += 1
            if on_sent is not None:
                on_sent(position)
        if not loop or not any_item:
            break
        # The next round is timed after the last frame of this one (one frame period later).
        pacer.loop_offset += last_offset + (1 / pacer.fps if pacer.fps else 0.1)
    stats.seconds = time.monotonic() - started
    return stats
