"""The demo's pieces, and the demo itself on a short input (embedded tansu broker, real worker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veilstream.commands.cli import main
from veilstream.commands.demo import format_summary, summarize


def test_summary_figures_come_from_the_records() -> None:
    frames = [
        {
            "type": "frame",
            "faces": 2,
            "plates": 0,
            "residual_faces": 0,
            "residual_plates": 0,
            "naive_changed": True,
            "consistent": True,
            "budget_exhausted": False,
            "iterations": 2,
            "latency_ms": 100.0,
        },
        {
            "type": "frame",
            "faces": 1,
            "plates": 1,
            "residual_faces": 1,
            "residual_plates": 0,
            "naive_changed": True,
            "consistent": False,
            "budget_exhausted": True,
            "iterations": 100,
            "latency_ms": 300.0,
        },
        {
            "type": "frame",
            "faces": 0,
            "plates": 0,
            "residual_faces": 0,
            "residual_plates": 0,
            "naive_changed": False,
            "consistent": True,
            "budget_exhausted": False,
            "iterations": 0,
            "latency_ms": 200.0,
        },
        {"type": "aggregate", "frames": 3},
    ]
    summary = summarize([object()] * 3, frames, [object()], seconds=2.0)
    assert summary["faces"] == 3
    assert summary["plates"] == 1
    assert summary["residual_detections"] == 1
    assert summary["naive_decision_changes"] == 2
    assert summary["final_decision_changes"] == 1
    assert summary["budget_exhausted"] == 1
    assert summary["mean_iterations"] == pytest.approx(51.0)
    assert summary["p50_latency_ms"] == pytest.approx(200.0)
    assert summary["dead_letters"] == 1
    assert summary["frames_per_second"] == pytest.approx(1.5)
    assert "final_decision_changes" in format_summary(summary)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_short_input(media: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--frames", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_published"] + summary["dead_letters"] == 8
    assert summary["frames_published"] >= 1
    assert summary["faces"] > 0
    for name in ("anonymized.mp4", "contact_sheet.png", "metrics.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
