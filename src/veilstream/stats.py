"""Figures users see, computed in one place from per-frame records (tested in tests/test_stats.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


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


def summarize_frames(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Consistency figures over frame records carrying `naive_changed`, `corrected_changed`, `budget_exhausted`,
    `iterations` and `ms`.

    `mean_iterations` / `p95_iterations` are over the frames that needed at least one correction step (the
    paper's convention); `mean_iterations_all` is over every frame.
    """
    frames = len(records)
    stepped = [float(r["iterations"]) for r in records if r["iterations"] > 0]
    naive_changed = sum(1 for r in records if r["naive_changed"])
    corrected_changed = sum(1 for r in records if r["corrected_changed"])
    return {
        "frames": frames,
        "naive_changed": naive_changed,
        "naive_changed_rate": rate(naive_changed, frames),
        "corrected_changed": corrected_changed,
        "corrected_changed_rate": rate(corrected_changed, frames),
        "budget_exhausted": sum(1 for r in records if r["budget_exhausted"]),
        "changed_without_region": sum(
            1 for r in records if r["corrected_changed"] and r.get("stop_reason") == "no_region"
        ),
        "frames_corrected": len(stepped),
        "mean_iterations": mean(stepped),
        "p95_iterations": percentile(stepped, 95),
        "max_iterations": max(stepped, default=0.0),
        "mean_iterations_all": mean([float(r["iterations"]) for r in records]),
        "mean_ms_per_frame": mean([float(r["ms"]) for r in records]),
        "p95_ms_per_frame": percentile([float(r["ms"]) for r in records], 95),
    }


def json_safe(value: Any) -> Any:
    """NaN becomes None so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
