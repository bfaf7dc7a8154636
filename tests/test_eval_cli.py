"""`veilstream eval` end to end on real media (the paper's experiment, published-bytes check)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from veilstream.commands.cli import main
from veilstream.schemas.records import FrameRecord

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_eval_reproduces_the_experiment_and_reports_bad_inputs(media: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("bus.jpg", "zidane.jpg", "grace_hopper.jpg", "licenseplate_motion.jpg", "vtest.avi"):
        shutil.copy(media / name, inputs / name)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inputs / "empty.png").write_bytes(b"")
    report = tmp_path / "report"
    code = main(
        [
            "--config",
            str(ROOT / "config" / "paper.yaml"),
            "eval",
            str(inputs),
            "--report",
            str(report),
            "--video-step",
            "40",
            "--stop",
            "float,published",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    # Four images and vtest.avi's 795 frames every 40th are corrected; the two unreadable inputs are dropped.
    assert summary["corrected"] == 4 + 20
    assert (summary["frames"], summary["dropped"]) == (4 + 20 + 2, 2)
    assert {e["input"].split("/")[-1] for e in summary["errors"]} == {"broken.jpg", "empty.png"}
    by_stop = {run["stop"]: run for run in summary["sweep"]}
    assert by_stop["published"]["naive_changed"] > 0
    assert by_stop["published"]["final_changed"] == 0
    assert by_stop["published"]["mean_iterations"] >= 1
    # Stopping on the float decision leaves published failures that the published check avoids.
    assert by_stop["float"]["final_changed"] > 0
    lines = (report / "frames.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 26
    records = [FrameRecord.model_validate_json(line) for line in lines]
    assert {r.setting for r in records} == {"alpha=0.1 stop=float", "alpha=0.1 stop=published"}
    record = json.loads(lines[0])
    assert {"original", "naive", "final", "iterations", "latency_ms", "max_pixel_change", "consistent"} <= set(record)
    # ms per frame is each frame's own time: its stages add up to it.
    corrected = [r for r in records if r.corrected]
    assert all(r.latency_ms == pytest.approx(sum(r.stage_ms.values())) for r in corrected)
    assert (report / "iterations.png").stat().st_size > 0
    assert (report / "decision_changes.png").stat().st_size > 0


def test_eval_fails_when_no_frame_is_readable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"nope")
    assert main(["eval", str(junk), "--report", str(tmp_path / "r"), "--no-progress"]) == 1
