"""The file sinks (folder, video) and eval's report sink, alone and behind the runner with a scripted pipeline."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from veilstream.anonymizers.filters import SolidMask
from veilstream.commands.anonymize import run_anonymize
from veilstream.commands.eval_report import EvalSetting, format_table
from veilstream.commands.evaluate import run_eval
from veilstream.config import VeilstreamConfig
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.decoding.images import Frame, decode_frame
from veilstream.detectors.base import Detection
from veilstream.detectors.finders import DetectorRegionFinder
from veilstream.errors import StageError
from veilstream.outcome import Dropped, FrameOutcome, Masked, Published
from veilstream.pipeline import FailurePolicy, OnFailure, Pipeline
from veilstream.publishing.encoding import Encoder
from veilstream.publishing.files import FolderSink, VideoSink
from veilstream.publishing.records import frame_record
from veilstream.runner import Origin, Processed
from veilstream.schemas.records import FrameRecord
from veilstream.stats import figures

from .conftest import noise_frames, tiny_classifier

ENCODER = Encoder("png")  # lossless: what was written can be compared pixel for pixel
BOX = Detection(10, 10, 50, 40, 0.9, "face")


def _is_grey(pixels: Frame, tolerance: int = 6) -> bool:
    return int(np.abs(pixels.astype(np.int16) - 128).max()) <= tolerance


def _processed(origin: Origin, frame: Frame | None, outcome: FrameOutcome) -> Processed:
    return Processed(origin, frame, outcome, frame_record(origin, outcome, "test"))


def _write_video(path: Path, frames: Sequence[Frame], fps: float = 5.0) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def _read_video(path: Path) -> tuple[list[Frame], float]:
    capture = cv2.VideoCapture(str(path))
    frames: list[Frame] = []
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8))
        return frames, float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()


def _records(path: Path) -> list[FrameRecord]:
    return [FrameRecord.model_validate_json(line) for line in path.read_text().splitlines()]


def test_folder_sink_writes_what_it_was_given_and_never_raw_pixels(tmp_path: Path) -> None:
    raw, anonymized = noise_frames(2, seed=3)
    published = Published(data=ENCODER.encode(anonymized))
    masked = Masked(data=ENCODER.grey(raw), error=StageError("detect_failed", "boom"))
    dropped = Dropped(error=StageError("correct_failed", "boom"))
    items = [
        _processed(Origin("a.jpg", source="in/a.jpg"), raw, published),
        _processed(Origin("b.jpg", source="in/b.jpg"), raw, masked),
        _processed(Origin("c.jpg", source="in/c.jpg"), raw, dropped),
    ]
    out = tmp_path / "out"
    sink = FolderSink(out, ENCODER.extension)
    for item in items:
        sink.add(item)
    assert not (out / "a.png").exists(), "nothing is written before flush"
    sink.flush()

    assert (out / "a.png").read_bytes() == published.data
    assert (out / "b.png").read_bytes() == masked.data
    assert _is_grey(decode_frame((out / "b.png").read_bytes()))
    assert not (out / "c.png").exists(), "a dropped image writes nothing"
    assert _records(out / "frames.jsonl") == [item.record for item in items]

    summary = sink.close()
    assert summary == json.loads((out / "summary.json").read_text())
    records = [item.record for item in items]
    assert summary["totals"] == {
        **figures(records, summary["totals"]["seconds"]).model_dump(),
        "seconds": pytest.approx(summary["totals"]["seconds"]),
    }
    rows = {row["source"]: row for row in summary["inputs"]}
    assert rows["in/a.jpg"]["output"] == str(out / "a.png")
    assert rows["in/c.jpg"]["output"] is None
    assert rows["in/c.jpg"]["dropped"] == 1
    assert [(e["input"], e["reason"]) for e in summary["errors"]] == [
        ("in/b.jpg", "detect_failed"),
        ("in/c.jpg", "correct_failed"),
    ]


def test_video_sink_keeps_timing_with_grey_frames_and_never_raw_pixels(tmp_path: Path) -> None:
    raw = noise_frames(4, seed=5)
    video = tmp_path / "clip.avi"
    _write_video(video, raw, fps=5.0)
    anonymized = raw[0].copy()
    anonymized[10:40, 10:50] = 0
    outcomes: list[FrameOutcome] = [
        Published(data=ENCODER.encode(anonymized)),
        Masked(data=ENCODER.grey(raw[1]), error=StageError("detect_failed", "boom")),
        Dropped(error=StageError("correct_failed", "boom")),
        Published(data=ENCODER.encode(anonymized)),
    ]
    sink = VideoSink(tmp_path)
    image = _processed(Origin("a.jpg", source=str(tmp_path / "a.jpg")), raw[0], outcomes[0])
    sink.add(image)
    for index, (frame, outcome) in enumerate(zip(raw, outcomes, strict=True)):
        sink.add(_processed(Origin("clip.avi", sequence=index, source=str(video)), frame, outcome))
    sink.flush()
    sink.close()

    assert not (tmp_path / "a.mp4").exists(), "images are the folder sink's"
    written, fps = _read_video(tmp_path / "clip.mp4")
    assert sink.outputs == {str(video): str(tmp_path / "clip.mp4")}
    assert len(written) == 4
    assert fps == pytest.approx(5.0)
    assert written[0].shape == raw[0].shape
    assert written[0][15:35, 15:45].mean() < 20, "the published pixels, anonymized"
    assert _is_grey(written[1], tolerance=12) and _is_grey(written[2], tolerance=12)
    for index in (1, 2):
        assert np.abs(written[index].astype(int) - raw[index].astype(int)).mean() > 20


class ScriptedDetector:
    """One face box per frame; fails on black frames (a 'poisoned' input); optionally slow."""

    def __init__(self, seconds_per_call: float = 0.0) -> None:
        self.seconds_per_call = seconds_per_call

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        time.sleep(self.seconds_per_call)
        if any(int(f.max()) < 10 for f in frames):
            raise RuntimeError("detector crashed")
        return [[BOX] for _ in frames]


def _pipeline(on_failure: OnFailure = "drop", detect_s: float = 0.0, correct: bool = False) -> Pipeline:
    corrector = None
    if correct:
        settings = CorrectionSettings(max_iterations=5, time_budget_ms=None, max_change=96)
        corrector = AdaptiveCorrector(Ensemble([tiny_classifier()]), settings, encoder=Encoder())
    detector = ScriptedDetector(detect_s)
    return Pipeline(
        DetectorRegionFinder(detector), SolidMask(value=0), ENCODER, corrector, FailurePolicy(on_failure, "off")
    )


def _inputs(folder: Path) -> None:
    folder.mkdir()
    good, other = noise_frames(2, seed=7)
    (folder / "a.png").write_bytes(ENCODER.encode(good))
    (folder / "b.png").write_bytes(ENCODER.encode(np.zeros_like(good)))  # poisoned: the detector fails on it
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff junk")
    _write_video(folder / "clip.avi", [good, np.zeros_like(good), other])


@pytest.mark.parametrize("on_failure", ["drop", "mask_frame"])
def test_anonymize_runs_every_input_through_the_runner_into_the_folder(tmp_path: Path, on_failure: OnFailure) -> None:
    _inputs(tmp_path / "in")
    out = tmp_path / "out"
    config = VeilstreamConfig.model_validate({"pipeline": {"batch_size": 2, "on_failure": on_failure}})
    summary = run_anonymize([tmp_path / "in"], _pipeline(on_failure), config, out, progress=False)

    records = _records(out / "frames.jsonl")
    assert [(r.camera_id, r.sequence) for r in records] == [
        ("a.png", None),
        ("b.png", None),
        ("broken.jpg", None),
        ("clip.avi", 0),
        ("clip.avi", 1),
        ("clip.avi", 2),
    ], "one record per input and per video frame, the undecodable input too"
    failed = "masked" if on_failure == "mask_frame" else "dropped"
    assert [r.outcome for r in records] == ["published", failed, "dropped", "published", failed, "published"]
    assert all(r.worker == "anonymize" for r in records)

    assert decode_frame((out / "a.png").read_bytes())[15:35, 15:45].max() == 0, "the face box is masked"
    if on_failure == "mask_frame":
        assert _is_grey(decode_frame((out / "b.png").read_bytes()))
    else:
        assert not (out / "b.png").exists()
    written, _ = _read_video(out / "clip.mp4")
    assert len(written) == 3
    assert _is_grey(written[1], tolerance=12), "a failed video frame is grey in either policy, never the raw one"

    seconds = summary["totals"]["seconds"]
    assert summary["totals"] == {**figures(records, seconds).model_dump(), "seconds": seconds}
    for row in summary["inputs"]:
        own = [r for r in records if r.source == row["source"]]
        assert {k: row[k] for k in ("frames", "published", "masked", "dropped", "faces")} == {
            k: getattr(figures(own), k) for k in ("frames", "published", "masked", "dropped", "faces")
        }
    reasons = {(Path(e["input"]).name, e["sequence"], e["reason"]) for e in summary["errors"]}
    assert ("b.png", None, "detect_failed") in reasons
    assert ("clip.avi", 1, "detect_failed") in reasons
    assert any(name == "broken.jpg" for name, _, _ in reasons)


def test_eval_ms_per_frame_is_each_frames_own_time_not_its_batchs(tmp_path: Path) -> None:
    """Detection takes 0.4 s per batch of 4: each frame's share is 0.1 s. The defect reported the batch's
    elapsed time for every frame, which this fails on."""
    folder = tmp_path / "in"
    folder.mkdir()
    for index, frame in enumerate(noise_frames(4, seed=11)):
        (folder / f"{index}.png").write_bytes(ENCODER.encode(frame))
    (folder / "junk.jpg").write_bytes(b"nope")
    config = VeilstreamConfig.model_validate({"pipeline": {"batch_size": 5}})
    settings = [EvalSetting(0.1, "published"), EvalSetting(0.5, "float")]
    start = time.perf_counter()
    summary = run_eval(
        [folder], _pipeline(detect_s=0.4, correct=True), config, settings, tmp_path / "r", progress=False
    )
    wall_ms = (time.perf_counter() - start) * 1000

    records = _records(tmp_path / "r" / "frames.jsonl")
    assert len(records) == 2 * 5
    for setting in settings:
        own = [r for r in records if r.setting == setting.name and r.outcome != "dropped"]
        assert len(own) == 4
        latencies = [r.latency_ms or 0.0 for r in own]
        # Each frame's own time (at least its 100 ms stage), not the time since its batch started: the four
        # add up to at most the run's wall time (a batch-elapsed figure would count the first frames again).
        assert all(latency >= 100 for latency in latencies), latencies
        assert sum(latencies) <= wall_ms, "per-frame times add up to at most the run's"
        assert all(r.latency_ms == pytest.approx(sum(r.stage_ms.values())) for r in own)
    first = [r for r in records if r.setting == settings[0].name]
    assert summary["mean_latency_ms"] == pytest.approx(figures(first).mean_latency_ms)
    assert summary["setting"] == settings[0].name
    assert [row["setting"] for row in summary["sweep"]] == [s.name for s in settings]
    assert summary["corrected"] == 4
    assert [e["reason"] for e in summary["errors"]] == ["unknown_format"]
    table = format_table(summary["sweep"]).splitlines()
    assert table[0].split()[-1] == "ms/frame"
    assert table[1].split()[-1] == f"{summary['sweep'][0]['mean_latency_ms']:.0f}"
    for name in ("summary.json", "iterations.png", "decision_changes.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
