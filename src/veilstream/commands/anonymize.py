"""`veilstream anonymize`: images, folders and videos through the shared pipeline, written to a folder."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from veilstream.decoding.images import DecodeLimits, decode_frame
from veilstream.config import VeilstreamConfig
from veilstream.errors import FrameError
from veilstream.pipeline import FrameOutcome, Pipeline
from veilstream.decoding.files import VIDEO_SUFFIXES, SourceFrame, expand_inputs, iter_video, video_info
from veilstream.stats import json_safe

_EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}


@dataclass
class InputSummary:
    """Per-input figures in summary.json."""

    source: str
    output: str | None = None
    frames: int = 0
    dropped: int = 0
    faces: int = 0
    plates: int = 0
    residual_faces: int = 0
    residual_plates: int = 0
    flagged_frames: int = 0
    naive_changed: int = 0
    corrected_changed: int = 0
    budget_exhausted: int = 0
    changed_without_region: int = 0  # encoding alone changed the decision; nothing anonymized to correct
    iterations: int = 0
    seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def add(self, outcome: FrameOutcome) -> dict[str, Any]:
        """Count one frame; return its frames.jsonl record."""
        self.frames += 1
        record: dict[str, Any] = {}
        if outcome.found is not None:
            self.faces += outcome.found.faces
            self.plates += outcome.found.plates
            record["detections"] = [asdict(d) for d in outcome.found.detections]
        residual_faces = sum(1 for d in outcome.residual if d.kind == "face")
        residual_plates = len(outcome.residual) - residual_faces
        self.residual_faces += residual_faces
        self.residual_plates += residual_plates
        record |= {
            "residual_faces": residual_faces,
            "residual_plates": residual_plates,
            "timings_ms": outcome.timings_ms,
        }
        if outcome.error is not None:
            self.dropped += outcome.published is None
            self.errors.append({"reason": outcome.error.reason, "detail": outcome.error.detail})
            return record | {"error": outcome.error.reason, "detail": outcome.error.detail, "flagged": True}
        result = outcome.correction
        assert result is not None
        self.naive_changed += result.naive_changed
        self.corrected_changed += not result.consistent
        self.budget_exhausted += result.budget_exhausted
        self.changed_without_region += result.stop_reason == "no_region" and not result.consistent
        self.iterations += result.iterations
        flagged = bool(outcome.residual) or not result.consistent
        self.flagged_frames += flagged
        return record | {
            "original": [asdict(d) for d in result.original],
            "naive": [asdict(d) for d in result.naive],
            "final": [asdict(d) for d in result.final],
            "consistent": result.consistent,
            "stop_reason": result.stop_reason,
            "iterations": result.iterations,
            "max_pixel_change": result.max_pixel_change,
            "flagged": flagged,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fps": self.fps}


def _batches(frames: Iterator[SourceFrame], size: int) -> Iterator[list[SourceFrame]]:
    while batch := list(islice(frames, size)):
        yield batch


class Anonymizer:
    """Runs the pipeline over files and writes anonymized outputs, frames.jsonl and summary.json."""

    def __init__(self, pipeline: Pipeline, config: VeilstreamConfig, out: Path, progress: bool = True) -> None:
        self.pipeline = pipeline
        self.config = config
        self.out = out
        self.progress = progress
        self.limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)

    def run(self, inputs: Sequence[Path], video_limit: int | None = None) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        summaries: list[InputSummary] = []
        with (self.out / "frames.jsonl").open("w") as log, tqdm(unit="frame", disable=not self.progress) as bar:
            for path in expand_inputs(inputs):
                summary = InputSummary(str(path))
                start = time.perf_counter()
                try:
                    if path.suffix.lower() in VIDEO_SUFFIXES:
                        self._video(path, summary, log, bar, video_limit)
                    else:
                        self._image(path, summary, log, bar)
                except FrameError as error:
                    summary.errors.append({"reason": error.reason, "detail": error.detail})
                except OSError as error:
                    summary.errors.append({"reason": "unreadable", "detail": str(error)})
                summary.seconds = time.perf_counter() - start
                summaries.append(summary)
        totals = {
            key: sum(getattr(s, key) for s in summaries)
            for key in (
                "frames",
                "dropped",
                "faces",
                "plates",
                "residual_faces",
                "residual_plates",
                "flagged_frames",
                "naive_changed",
                "corrected_changed",
                "budget_exhausted",
                "changed_without_region",
            )
        }
        report = {"inputs": [s.as_dict() for s in summaries], "totals": totals}
        (self.out / "summary.json").write_text(json.dumps(json_safe(report), indent=2))
        return report

    def _log(self, log: Any, source: SourceFrame, summary: InputSummary, outcome: FrameOutcome) -> None:
        record = {"source": source.source, "index": source.index, **summary.add(outcome)}
        log.write(json.dumps(record) + "\n")

    def _image(self, path: Path, summary: InputSummary, log: Any, bar: Any) -> None:
        source = SourceFrame(str(path), 0, decode_frame(path.read_bytes(), self.limits))
        (outcome,) = self.pipeline.process([source.frame])
        self._log(log, source, summary, outcome)
        bar.update(1)
        if outcome.published is not None:
            target = self.out / (path.stem + _EXTENSIONS[self.config.publish.codec])
            target.write_bytes(outcome.published)
            summary.output = str(target)

    def _video(self, path: Path, summary: InputSummary, log: Any, bar: Any, limit: int | None) -> None:
        info = video_info(path)
        target = self.out / (path.stem + ".mp4")
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter.fourcc(*"mp4v"), info.fps, (info.width, info.height))
        if not writer.isOpened():
            raise FrameError("unwritable_video", f"cannot open {target} for writing")
        try:
            for batch in _batches(iter_video(path, 1, limit), self.config.pipeline.batch_size):
                for source, outcome in zip(batch, self.pipeline.process([s.frame for s in batch]), strict=True):
                    self._log(log, source, summary, outcome)
                    # A dropped frame becomes grey in the video, keeping its timing; never the raw frame.
                    pixels = decode_frame(outcome.published) if outcome.published else np.full_like(source.frame, 128)
                    writer.write(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
                bar.update(len(batch))
        finally:
            writer.release()
        summary.output = str(target)
