"""`veilstream anonymize` on the real sample media with the real detectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest

from veilstream.commands.cli import main
from veilstream.schemas.records import FrameRecord
from veilstream.stats import figures


@pytest.mark.slow
def test_anonymize_finds_and_hides_faces_and_plates(media: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("bus.jpg", "zidane.jpg", "grace_hopper.jpg", "licenseplate_motion.jpg", "vtest.avi"):
        shutil.copy(media / name, inputs / name)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff junk")
    out = tmp_path / "out"
    assert main(["anonymize", str(inputs), "--out", str(out), "--max-video-frames", "12", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {Path(r["source"]).name: r for r in summary["inputs"]}
    assert rows["bus.jpg"]["faces"] >= 2
    assert rows["zidane.jpg"]["faces"] == 2
    assert rows["grace_hopper.jpg"]["faces"] >= 1
    assert rows["licenseplate_motion.jpg"]["plates"] >= 1
    assert (rows["broken.jpg"]["published"], rows["broken.jpg"]["dropped"]) == (0, 1)
    assert any(Path(e["input"]).name == "broken.jpg" and e["reason"] for e in summary["errors"]), (
        "a bad input gets a clear error and the run goes on"
    )
    video = rows["vtest.avi"]
    assert video["frames"] == 12
    assert video["faces"] > 0
    # Detectors run again on the published output find none of the anonymized objects.
    assert summary["totals"]["residual_detections"] == 0
    # Every published decision change is accounted for: a spent budget, or encoding alone with nothing to correct.
    totals = summary["totals"]
    assert totals["final_changed"] <= totals["budget_exhausted"] + totals["changed_without_region"]
    for name in ("bus.jpg", "zidane.jpg", "grace_hopper.jpg", "licenseplate_motion.jpg"):
        assert (out / name).stat().st_size > 0
    capture = cv2.VideoCapture(str(out / "vtest.mp4"))
    try:
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
        assert (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (768, 576)
        assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0, abs=0.1)
    finally:
        capture.release()
    records = [FrameRecord.model_validate_json(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert len(records) == 5 + 12, "one record per image (the broken one too) and per video frame"
    decoded = [r for r in records if r.reason is None]
    assert len(decoded) == 4 + 12
    assert all({"detect", "anonymize", "correct"} <= set(r.stage_ms) for r in decoded)
    assert [r.sequence for r in records if r.camera_id == "vtest.avi"] == list(range(12))
    assert {k: v for k, v in totals.items() if k not in ("seconds", "frames_per_second")} == {
        k: v for k, v in figures(records).model_dump().items() if k != "frames_per_second"
    }
