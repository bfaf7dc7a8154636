"""`veilstream privacy`: the default pipeline on the labelled privacy set, measured on the published frames.

Labelled frames (in video order) -> the shared runner and pipeline -> a sink that decodes every published frame and
measures it against its labels -> summary.json, privacy.png, contact sheets and the printed table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from veilstream.anonymizers.regions import Region, RegionShape, region_mask
from veilstream.decoding.files import iter_video
from veilstream.decoding.images import DecodeLimits, decode_frame
from veilstream.detectors.base import Detector
from veilstream.errors import FrameError
from veilstream.evaluation.labels import Box, LabelledFrame, LabelSet
from veilstream.evaluation.leaks import leak_findings
from veilstream.evaluation.measures import ANONYMIZED_BELOW, Mask, grown, pixel_bounds
from veilstream.evaluation.report import Example, format_table, object_lines, summarize, write_plot, write_sheets
from veilstream.evaluation.results import FrameResult, Pixels, measure_frame
from veilstream.outcome import Masked, Published
from veilstream.pipeline import Pipeline
from veilstream.publishing.files import write_json
from veilstream.runner import Origin, Processed, Runner, SourceItem

__all__ = ["PrivacySink", "format_table", "labelled_items", "run_privacy"]

# Examples this close to the threshold go on threshold.png, to check the measure by eye.
NEAR_THRESHOLD = 0.15


def labelled_items(labels: LabelSet, media: Path, limits: DecodeLimits | None = None) -> Iterator[SourceItem]:
    """A source item for every labelled frame: images as files, videos read in order up to their last label."""
    for name, frames in labels.by_media().items():
        path = media / name
        origin = Origin(camera_id=name, source=str(path))
        try:
            if frames[0].frame is None:
                yield SourceItem(origin, decode_frame(path.read_bytes(), limits))
                continue
            wanted = {f.frame for f in frames}
            last = max(i for i in wanted if i is not None)
            for frame in iter_video(path, limit=last + 1):
                if frame.index in wanted:
                    yield SourceItem(replace(origin, sequence=frame.index), frame.frame)
        except FrameError as error:
            yield SourceItem(origin, error=error)
        except OSError as error:
            yield SourceItem(origin, error=FrameError("unreadable", str(error)))


def _crop(pixels: Pixels, box: Box) -> Pixels:
    around = grown(box, 1.0)
    bounds = pixel_bounds(around, pixels.shape[1], pixels.shape[0])
    assert bounds is not None  # a labelled box lies inside its frame
    x1, y1, x2, y2 = bounds
    return np.ascontiguousarray(pixels[y1:y2, x1:x2])


class PrivacySink:
    """Measures every processed frame against its labels as it arrives; keeps the results and a few crops."""

    def __init__(
        self,
        labels: LabelSet,
        shape: RegionShape = "box",
        threshold: float = ANONYMIZED_BELOW,
        leak_detector: Detector | None = None,
    ) -> None:
        self.labels = labels
        self.frames: dict[tuple[str, int | None], LabelledFrame] = {f.key: f for f in labels.frames}
        self.shape = shape
        self.threshold = threshold
        self.leak_detector = leak_detector
        self.results: list[FrameResult] = []
        self.examples: dict[str, list[Example]] = {"leaks": [], "threshold": [], "leak_check": []}

    def add(self, item: Processed) -> None:
        labelled = self.frames.get((item.origin.camera_id, item.origin.sequence))
        if labelled is None:
            raise ValueError(f"no labels for {item.origin.camera_id} frame {item.origin.sequence}")
        outcome = item.outcome
        if item.frame is None:  # the labelled file did not decode: nothing was published
            self.results.append(measure_frame(labelled, None, None, None, [], "dropped"))
            return
        published: Pixels | None = None
        blurred: Mask | None = None
        if isinstance(outcome, Published | Masked):
            published = decode_frame(outcome.data)
            blurred = self._blurred(outcome, published.shape[0], published.shape[1])
        result = measure_frame(
            labelled, item.frame, published, blurred, outcome.detections, outcome.kind, self.threshold
        )
        if self.leak_detector is not None and published is not None and blurred is not None:
            found = self.leak_detector.detect([published])[0]
            result = replace(result, leak_check=tuple(leak_findings(found, blurred, labelled)))
        self.results.append(result)
        if published is not None:
            self._keep_examples(result, item.frame, published)

    def _blurred(self, outcome: Published | Masked, height: int, width: int) -> Mask:
        if isinstance(outcome, Masked):
            return np.ones((height, width), dtype=bool)
        regions = [Region(d.x1, d.y1, d.x2, d.y2, self.shape) for d in outcome.detections]
        mask: Mask = region_mask(regions, height, width, torch.device("cpu")).numpy()
        return mask

    def _keep_examples(self, result: FrameResult, original: Pixels, published: Pixels) -> None:
        where = result.media.split(".")[0] + ("" if result.frame is None else f"#{result.frame}")
        for found in result.objects:
            if found.label.difficult:
                continue
            title = f"{where} {found.label.kind} h{found.label.height:g}"
            status = "hidden" if found.anonymized else "VISIBLE"
            example = Example(
                title, found.detail_kept, status, _crop(original, found.label.box), _crop(published, found.label.box)
            )
            if found.leaked:
                self.examples["leaks"].append(example)
            if found.detail_kept is not None and abs(found.detail_kept - self.threshold) <= NEAR_THRESHOLD:
                self.examples["threshold"].append(example)
        for finding in result.leak_check:
            box = finding["box"]
            assert isinstance(box, list)
            corners: Box = (box[0], box[1], box[2], box[3])
            self.examples["leak_check"].append(
                Example(
                    where,
                    float(str(finding["score"])),
                    str(finding["status"]),
                    _crop(original, corners),
                    _crop(published, corners),
                )
            )

    def flush(self) -> None:
        """Results are kept in memory until the report is written."""


def run_privacy(
    labels: LabelSet,
    media: Path,
    pipeline: Pipeline,
    report: Path,
    batch_size: int,
    shape: RegionShape = "box",
    threshold: float = ANONYMIZED_BELOW,
    leak_detector: Detector | None = None,
    parameters: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pipeline over every labelled frame; write summary.json, privacy.png and the sheets into `report`."""
    sink = PrivacySink(labels, shape, threshold, leak_detector)
    runner = Runner(pipeline, [sink], batch_size, worker="privacy")
    runner.run(
        tqdm(
            labelled_items(labels, media), desc="privacy", unit="frame", disable=not progress, total=len(labels.frames)
        )
    )
    report.mkdir(parents=True, exist_ok=True)
    detector_name = None if leak_detector is None else type(leak_detector).__name__
    summary = summarize(sink.results, labels, {**(parameters or {}), "threshold": threshold}, detector_name)
    write_json(report / "summary.json", summary)
    write_plot(summary, sink.results, report / "privacy.png")
    examples = sink.examples
    examples["threshold"].sort(key=lambda e: e.value or 0.0)
    summary["sheets"] = [file for name, found in examples.items() for file in write_sheets(found, report, name)]
    (report / "objects.jsonl").write_text("".join(line + "\n" for line in object_lines(sink.results)))
    write_json(report / "summary.json", summary)
    return summary
