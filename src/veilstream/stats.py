"""Figures users see, computed in one place from per-frame records (tested in tests/test_stats.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from veilstream.schemas.records import Figures, FrameRecord


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def rate(count: int, total: int) -> float:
    return count / total if total else math.nan


def latencies_ms(records: Sequence[FrameRecord]) -> list[float]:
    """Latencies of the records that have one (a file input that never decoded spent no time anywhere)."""
    return [r.latency_ms for r in records if r.latency_ms is not None]


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else value


def figures(records: Sequence[FrameRecord], seconds: float | None = None) -> Figures:
    """The one aggregate of frame records (for an `AggregateRecord`, add its envelope to `model_dump()`).

    Every input has a record, an undecodable one too (dropped), so `dead_letters` is the dropped count.
    `seconds` is the wall time the records span, for frames per second.
    """
    corrected = [r for r in records if r.corrected]
    stepped = [float(r.iterations) for r in corrected if r.iterations > 0]
    latencies = latencies_ms(records)
    labelled = [r for r in corrected if r.ground_truth is not None and r.original and r.final]
    naive_changed = sum(1 for r in corrected if r.naive_changed)
    final_changed = sum(1 for r in corrected if r.consistent is False)

    def accuracy(pick: str) -> float | None:
        if not labelled:
            return None
        return sum(1 for r in labelled if getattr(r, pick)[0].label == r.ground_truth) / len(labelled)

    dropped = sum(1 for r in records if r.outcome == "dropped")
    return Figures(
        frames=len(records),
        published=sum(1 for r in records if r.outcome == "published"),
        masked=sum(1 for r in records if r.outcome == "masked"),
        dropped=dropped,
        dead_letters=dropped,
        flagged=sum(1 for r in records if r.flagged),
        faces=sum(r.faces for r in records),
        plates=sum(r.plates for r in records),
        residual_detections=sum(r.residual_faces + r.residual_plates for r in records),
        remembered=sum(r.remembered for r in records),
        leak_checked=sum(1 for r in records if r.leak_checked),
        leaks=sum(r.leaks for r in records),
        leak_frames=sum(1 for r in records if r.leaks),
        corrected=len(corrected),
        naive_changed=naive_changed,
        final_changed=final_changed,
        naive_changed_rate=_optional(rate(naive_changed, len(corrected))),
        final_changed_rate=_optional(rate(final_changed, len(corrected))),
        budget_exhausted=sum(1 for r in corrected if r.budget_exhausted),
        changed_without_region=sum(1 for r in corrected if r.consistent is False and r.stop_reason == "no_region"),
        frames_stepped=len(stepped),
        mean_iterations=_optional(mean(stepped)),
        p95_iterations=_optional(percentile(stepped, 95)),
        max_iterations=int(max(stepped, default=0)),
        mean_iterations_all=_optional(mean([float(r.iterations) for r in corrected])),
        mean_latency_ms=_optional(mean(latencies)),
        p50_latency_ms=_optional(percentile(latencies, 50)),
        p95_latency_ms=_optional(percentile(latencies, 95)),
        frames_per_second=len(records) / seconds if seconds and seconds > 0 else None,
        labelled_frames=len(labelled),
        accuracy_original=accuracy("original"),
        accuracy_published=accuracy("final"),
    )


def json_safe(value: Any) -> Any:
    """NaN becomes None so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
