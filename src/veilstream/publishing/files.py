"""File sinks for `anonymize` (and the frame log `eval` shares): anonymized images and videos in a folder,
`frames.jsonl` with one `FrameRecord` per line, and `summary.json` from `stats.figures`.

Fail-closed like every sink: what is written is the outcome's bytes (published, or the grey frame of a masked
one); a dropped image writes nothing and a dropped video frame becomes grey. Raw pixels are never written.

summary.json accounts for every input path: a row per input read (its figures), `errors` for each failed frame
with the `side` at fault (`input`: unreadable, corrupt or refused; `pipeline`: a stage failed; `output`: the file
could not be written), and `skipped` for each path not read as an input, with its reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from veilstream.decoding.files import Skipped, is_video, video_info
from veilstream.decoding.images import Frame, decode_frame
from veilstream.errors import FrameError, StageError
from veilstream.outcome import Dropped, Published
from veilstream.runner import Processed
from veilstream.schemas.records import FrameRecord
from veilstream.stats import figures, json_safe, latencies_ms

GREY = 128


class FrameLog:
    """`frames.jsonl`: one FrameRecord per line (the metrics topic's schema), appended at each flush."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def write(self, records: Iterable[FrameRecord]) -> None:
        with self.path.open("a") as handle:
            handle.writelines(record.model_dump_json() + "\n" for record in records)


def input_name(record: FrameRecord) -> str:
    """The input a record belongs to: its file (anonymize, eval) or its camera."""
    return record.source or record.camera_id


def error_entries(records: Iterable[FrameRecord]) -> list[dict[str, Any]]:
    """The failed frames (masked or dropped, undecodable inputs included), as summary.json lists them."""
    return [
        {"input": input_name(r), "sequence": r.sequence, "reason": r.reason, "detail": r.detail}
        for r in records
        if r.reason is not None
    ]


def fault_side(error: FrameError) -> str:
    """Who is at fault for a failed frame: a stage of the pipeline, or the input (everything the source refused:
    unreadable, corrupt, truncated, outside the limits). Output failures are the sinks' own entries."""
    return "pipeline" if isinstance(error, StageError) else "input"


def output_error(source: str, sequence: int | None, reason: str, detail: str) -> dict[str, Any]:
    return {"input": source, "sequence": sequence, "side": "output", "reason": reason, "detail": detail}


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(json_safe(value), indent=2))


class VideoSink:
    """Each video input as an .mp4 of its size and frame rate, built from the published bytes. A masked frame
    is its grey frame; a dropped frame becomes grey too, so the video keeps its timing. Images are left to the
    FolderSink. Call `close` at the end: a video file is complete only once its writer is released."""

    def __init__(self, out: Path, suffix: str = ".mp4") -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.suffix = suffix
        self.pending: list[Processed] = []
        self.writers: dict[str, cv2.VideoWriter] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.outputs: dict[str, str] = {}
        self.errors: list[dict[str, Any]] = []
        self._failed: set[str] = set()

    def add(self, item: Processed) -> None:
        if item.origin.source is not None and is_video(Path(item.origin.source)):
            self.pending.append(item)

    def flush(self) -> None:
        for item in self.pending:
            self._write(item)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        for source in list(self.writers):
            self._release(source)

    def _write(self, item: Processed) -> None:
        source = item.origin.source
        assert source is not None  # `add` keeps only file inputs
        if source in self._failed:
            return
        writer = self.writers.get(source)
        if isinstance(item.outcome, Dropped):
            if item.frame is None and writer is None:
                return  # an unreadable video: nothing to write, its record has the error
            size = item.frame.shape if item.frame is not None else self.shapes[source]
            pixels: Frame = np.full(size, GREY, dtype=np.uint8)
        else:
            pixels = decode_frame(item.outcome.data)
        if writer is None:
            writer = self._open(source, pixels)
            if writer is None:
                return
        writer.write(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))

    def _open(self, source: str, first: Frame) -> cv2.VideoWriter | None:
        for other in list(self.writers):  # inputs come one after another: the previous video is complete
            self._release(other)
        target = self.out / (Path(source).stem + self.suffix)
        size = (first.shape[1], first.shape[0])
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter.fourcc(*"mp4v"), video_info(Path(source)).fps, size)
        if not writer.isOpened():
            self._failed.add(source)
            self.errors.append(output_error(source, None, "unwritable_video", f"cannot open {target} for writing"))
            return None
        self.writers[source] = writer
        self.shapes[source] = first.shape
        self.outputs[source] = str(target)
        return writer

    def _release(self, source: str) -> None:
        self.writers.pop(source).release()


class FolderSink:
    """Anonymized images (`stem + extension`; `stem-0000 + extension`, ... for the frames of a multi-frame image),
    `frames.jsonl`, and on `close` `summary.json`: per input and in total, the figures of `stats.figures`, the
    failed frames and the `skipped` paths. Video frames go to `videos`, whose outputs and errors the summary
    includes. Two inputs never share an output file: a name already taken gets `~2`, `~3`, ... before its suffix.

    Per input, `seconds` is the frames' own time in the pipeline stages (inputs share batches, so there is no
    wall time per input); the totals' `seconds` is the wall time from the sink's start to `close`.
    """

    def __init__(
        self, out: Path, extension: str, videos: VideoSink | None = None, skipped: Sequence[Skipped] = ()
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.extension = extension
        self.videos = videos
        self.skipped = list(skipped)
        self.log = FrameLog(out / "frames.jsonl")
        self.pending: list[Processed] = []
        self.records: dict[str, list[FrameRecord]] = {}
        self.outputs: dict[str, str] = {}
        self.errors: list[dict[str, Any]] = []
        self._stems: dict[str, str] = {}  # output stem -> the input that owns it
        self.started = time.perf_counter()

    def add(self, item: Processed) -> None:
        self.pending.append(item)

    def flush(self) -> None:
        for item in self.pending:
            source = item.origin.source
            if not isinstance(item.outcome, Published):
                self.errors.append(
                    {
                        "input": input_name(item.record),
                        "sequence": item.origin.sequence,
                        "side": fault_side(item.outcome.error),
                        "reason": item.outcome.error.reason,
                        "detail": item.outcome.error.detail,
                    }
                )
            if source is not None and not is_video(Path(source)) and not isinstance(item.outcome, Dropped):
                self._write(source, item.origin.sequence, item.outcome.data)
        self.log.write(item.record for item in self.pending)
        for item in self.pending:
            self.records.setdefault(input_name(item.record), []).append(item.record)
        self.pending.clear()

    def _write(self, source: str, sequence: int | None, data: bytes) -> None:
        stem = self._stem(source)
        target = self.out / (stem + ("" if sequence is None else f"-{sequence:04d}") + self.extension)
        try:
            target.write_bytes(data)
        except OSError as error:
            self.errors.append(output_error(source, sequence, "unwritable_output", f"cannot write {target}: {error}"))
            return
        self.outputs.setdefault(source, str(target))  # a multi-frame image: its first frame's file

    def _stem(self, source: str) -> str:
        stem = Path(source).stem
        candidate, number = stem, 1
        while self._stems.setdefault(candidate, source) != source:
            number += 1
            candidate = f"{stem}~{number}"
        return candidate

    def close(self) -> dict[str, Any]:
        """Flush, finish the videos and write summary.json; returns what it wrote."""
        self.flush()
        outputs = dict(self.outputs)
        errors = list(self.errors)
        if self.videos is not None:
            self.videos.close()
            outputs |= self.videos.outputs
            errors.extend(self.videos.errors)
        summary = summarize_inputs(self.records, outputs, errors, time.perf_counter() - self.started)
        summary["skipped"] = [{"input": s.input, "reason": s.reason, "detail": s.detail} for s in self.skipped]
        write_json(self.out / "summary.json", summary)
        return summary


def summarize_inputs(
    records: dict[str, list[FrameRecord]],
    outputs: dict[str, str],
    errors: Sequence[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """summary.json of a folder: `inputs` (one row per input), `totals` and `errors` (every failed frame)."""
    rows = []
    for source, own in records.items():
        busy = sum(latencies_ms(own)) / 1000
        rows.append({"source": source, "output": outputs.get(source), "seconds": busy, **_figures(own, busy)})
    every = [r for own in records.values() for r in own]
    return {
        "inputs": rows,
        "totals": {**_figures(every, seconds), "seconds": seconds},
        "errors": list(errors),
    }


def _figures(records: Sequence[FrameRecord], seconds: float) -> dict[str, Any]:
    return figures(records, seconds).model_dump()
