"""The demo's pieces, and the demo itself on a short input (embedded tansu broker, real worker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from veilstream.commands.cli import main
from veilstream.commands.demo import format_summary, frame_records, summarize
from veilstream.schemas.records import FrameRecord
from veilstream.stats import figures


def _frame(**fields: Any) -> dict[str, Any]:
    """A frame record as the worker puts it on the metrics topic (JSON)."""
    values: dict[str, Any] = {
        "worker": "w",
        "time": datetime.now(UTC),
        "camera_id": "vtest",
        "outcome": "published",
        "flagged": False,
        "corrected": True,
    }
    return FrameRecord.model_validate(values | fields).model_dump(mode="json")


def test_summary_figures_come_from_the_records() -> None:
    metrics = [
        _frame(sequence=0, faces=2, naive_changed=True, consistent=True, iterations=2, latency_ms=100.0),
        _frame(
            sequence=1,
            faces=1,
            plates=1,
            residual_faces=1,
            naive_changed=True,
            consistent=False,
            budget_exhausted=True,
            stop_reason="iteration_budget",
            iterations=100,
            latency_ms=300.0,
            flagged=True,
        ),
        _frame(sequence=2, naive_changed=False, consistent=True, iterations=0, latency_ms=200.0),
        {"type": "aggregate", "frames": 3},
    ]
    records = frame_records(metrics)
    assert [r.sequence for r in records] == [0, 1, 2], "aggregates are not frames"
    summary = summarize([object()] * 3, records, [object()], seconds=2.0, replayed=4)
    assert summary == {
        "frames_replayed": 4,
        "outputs_received": 3,
        "dead_letters_received": 1,
        **figures(records, 2.0).model_dump(),
    }
    assert summary["faces"] == 3
    assert summary["plates"] == 1
    assert summary["residual_detections"] == 1
    assert summary["naive_changed"] == 2
    assert summary["final_changed"] == 1
    assert summary["budget_exhausted"] == 1
    assert summary["mean_iterations"] == pytest.approx(51.0)
    assert summary["p50_latency_ms"] == pytest.approx(200.0)
    assert summary["frames_per_second"] == pytest.approx(1.5)
    text = format_summary(summary)
    assert "final_changed" in text and "dead_letters_received" in text


def test_a_frame_record_of_another_shape_is_refused() -> None:
    with pytest.raises(ValidationError):
        frame_records([{"type": "frame", "faces": 1, "latency_ms": 5.0}])


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_short_input(media: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--frames", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_replayed"] == 8
    assert summary["outputs_received"] + summary["dead_letters_received"] == 8
    assert summary["outputs_received"] >= 1
    assert summary["frames"] == 8, "every replayed frame has its record on the metrics topic"
    assert summary["published"] + summary["masked"] == summary["outputs_received"]
    assert summary["faces"] > 0
    for name in ("anonymized.mp4", "contact_sheet.png", "metrics.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    frames = [json.loads(line) for line in lines if json.loads(line)["type"] == "frame"]
    assert all((FrameRecord.model_validate(f).latency_ms or 0) > 0 for f in frames), "the worker measures every frame"
