"""The frame record of an outcome: the one place that turns a `FrameOutcome` into a `FrameRecord`."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from veilstream.correction.classifier import Decision
from veilstream.detectors.base import Detection
from veilstream.outcome import FrameOutcome, Published
from veilstream.schemas.records import DecisionRecord, DetectionRecord, FrameRecord

if TYPE_CHECKING:
    from veilstream.runner import Origin


def _decisions(decisions: tuple[Decision, ...]) -> list[DecisionRecord]:
    return [DecisionRecord(**asdict(d)) for d in decisions]


def _boxes(detections: tuple[Detection, ...]) -> list[DetectionRecord]:
    return [DetectionRecord(kind=d.kind, x1=d.x1, y1=d.y1, x2=d.x2, y2=d.y2, score=d.score) for d in detections]


def frame_record(
    origin: Origin,
    outcome: FrameOutcome,
    worker: str,
    latency_ms: float | None = None,
    setting: str | None = None,
) -> FrameRecord:
    """`latency_ms` None means the frame's own time in the stages (files have no queue to wait in); an input that
    reached no stage then has no latency at all."""
    stage_ms = dict(outcome.timings_ms)
    kafka = origin.kafka
    fields: dict[str, object] = {
        "worker": worker,
        "time": datetime.now(UTC),
        "camera_id": origin.camera_id,
        "sequence": origin.sequence,
        "capture_time": origin.capture_time,
        "source": origin.source,
        "source_topic": kafka.topic if kafka else None,
        "source_partition": kafka.partition if kafka else None,
        "source_offset": kafka.offset if kafka else None,
        "setting": setting,
        "outcome": outcome.kind,
        "flagged": outcome.flagged,
        "faces": outcome.faces,
        "plates": outcome.plates,
        "detections": _boxes(outcome.detections),
        "residual_faces": outcome.residual_faces,
        "residual_plates": outcome.residual_plates,
        "remembered": len(outcome.remembered),
        "leak_checked": outcome.leak_checked,
        "leaks": len(outcome.leaks),
        "leak_detections": _boxes(outcome.leaks),
        "latency_ms": (sum(stage_ms.values()) if stage_ms else None) if latency_ms is None else latency_ms,
        "stage_ms": stage_ms,
        "ground_truth": origin.ground_truth,
    }
    if not isinstance(outcome, Published):
        fields |= {"reason": outcome.error.reason, "detail": outcome.error.detail[:1000]}
    if outcome.kind != "dropped":
        fields["published_bytes"] = len(outcome.data)  # type: ignore[union-attr]
    result = outcome.correction
    if result is not None:
        fields |= {
            "corrected": True,
            "original": _decisions(result.original),
            "naive": _decisions(result.naive),
            "final": _decisions(result.final),
            "naive_changed": result.naive_changed,
            "consistent": result.consistent,
            "budget_exhausted": result.budget_exhausted,
            "stop_reason": result.stop_reason,
            "iterations": result.iterations,
            "max_pixel_change": result.max_pixel_change,
        }
    return FrameRecord.model_validate(fields)
