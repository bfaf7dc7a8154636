"""The two records every part of veilstream writes and reads: one per frame, one per aggregate.

The same field names travel on the metrics topic (told apart by `type`), in `frames.jsonl` and `summary.json`
of `anonymize` and `eval`, and feed the monitor, the report and the demo. `Figures` is the one aggregate shape;
`veilstream.stats.figures` is the one function that computes it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RECORD_VERSION = "2"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecisionRecord(_Record):
    classifier: str
    index: int
    label: str
    confidence: float


class DetectionRecord(_Record):
    kind: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float


class FrameRecord(_Record):
    """What happened to one frame. Decision fields are empty/None when no classifier ran (correction off,
    or the frame failed before correction)."""

    type: Literal["frame"] = "frame"
    schema_version: str = RECORD_VERSION
    worker: str = Field(description="the process that handled the frame (host name, or the command)")
    time: datetime = Field(description="when the outcome was recorded")
    camera_id: str = Field(description="camera id; for files, the input's name")
    sequence: int | None = Field(None, description="frame number within the camera or video")
    capture_time: datetime | None = None
    source: str | None = Field(None, description="input file (anonymize, eval)")
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    setting: str | None = Field(None, description="the eval setting (alpha, stop) this record was made with")
    outcome: Literal["published", "masked", "dropped"]
    reason: str | None = Field(None, description="why a masked or dropped frame failed (stable code)")
    detail: str | None = None
    flagged: bool = Field(description="masked, dropped, decision not kept, or an anonymized object found again")
    faces: int = 0
    plates: int = 0
    detections: list[DetectionRecord] = Field(default_factory=list)
    residual_faces: int = 0
    residual_plates: int = 0
    remembered: int = Field(0, description="of the detections, boxes kept from the camera's earlier frames")
    leak_checked: bool = Field(False, description="the independent leak check looked at this frame")
    leaks: int = Field(0, description="faces the independent leak check found anywhere in the published frame")
    leak_detections: list[DetectionRecord] = Field(default_factory=list, description="where it found them")
    corrected: bool = Field(False, description="the correction stage ran on this frame")
    original: list[DecisionRecord] = Field(default_factory=list)
    naive: list[DecisionRecord] = Field(default_factory=list)
    final: list[DecisionRecord] = Field(default_factory=list, description="decisions on the published bytes")
    naive_changed: bool | None = None
    consistent: bool | None = None
    budget_exhausted: bool = False
    stop_reason: str | None = None
    iterations: int = 0
    max_pixel_change: int = 0
    published_bytes: int | None = None
    latency_ms: float | None = Field(
        description="worker: from receiving the frame's batch to handing its output to the producer; "
        "files: the frame's own time in the pipeline stages, None for an input that never reached a stage"
    )
    stage_ms: dict[str, float] = Field(default_factory=dict, description="this frame's time in each stage")
    ground_truth: str | None = None


class Figures(_Record):
    """The aggregate of a set of frame records (see `veilstream.stats.figures`).

    Iteration figures are over frames that needed at least one correction step (the paper's convention);
    rates are over the corrected frames; None where there is nothing to measure.
    """

    frames: int = Field(description="frame outcomes: published + masked + dropped")
    published: int
    masked: int
    dropped: int
    dead_letters: int = Field(description="frames sent to the dead letters: dropped ones and undecodable inputs")
    flagged: int
    faces: int
    plates: int
    residual_detections: int
    remembered: int = Field(0, description="boxes blurred from a camera's earlier frames (the detectors missed them)")
    leak_checked: int = Field(0, description="frames the independent leak check looked at")
    leaks: int = Field(0, description="faces it found in the published frames: possible leaks")
    leak_frames: int = Field(0, description="frames with at least one possible leak")
    corrected: int = Field(description="frames the correction stage ran on")
    naive_changed: int
    final_changed: int
    naive_changed_rate: float | None
    final_changed_rate: float | None
    budget_exhausted: int
    changed_without_region: int = Field(description="decision changed by encoding alone; nothing to correct")
    frames_stepped: int
    mean_iterations: float | None
    p95_iterations: float | None
    max_iterations: int
    mean_iterations_all: float | None
    mean_latency_ms: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    frames_per_second: float | None
    labelled_frames: int = Field(description="frames that carried a ground-truth class")
    accuracy_original: float | None = None
    accuracy_published: float | None = None


class AggregateRecord(Figures):
    """A periodic summary of the frames one worker handled in a window."""

    type: Literal["aggregate"] = "aggregate"
    schema_version: str = RECORD_VERSION
    worker: str
    window_start: datetime
    window_end: datetime
