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


def test_transfer_sink_counts_each_checked_models_changes_on_the_published_bytes() -> None:
    """Independent check: the sink's counts equal the checked models' decisions computed directly."""
    import torch

    from veilstream.commands.eval_transfer import TransferSink
    from veilstream.correction.classifier import Ensemble
    from veilstream.decoding.images import Frame, decode_frame
    from veilstream.errors import StageError
    from veilstream.outcome import Dropped, Published
    from veilstream.publishing.encoding import Encoder
    from veilstream.publishing.records import frame_record
    from veilstream.runner import Origin, Processed

    from .conftest import noise_frames, tiny_classifier

    checkers = Ensemble([tiny_classifier("a", seed=1), tiny_classifier("b", seed=2)])
    originals = noise_frames(12, seed=4)
    # The "published" frames: other frames at low quality, so some decisions change and some do not.
    published = [Encoder(quality=10).encode(f) for f in noise_frames(12, seed=4)[6:] + noise_frames(6, seed=9)]
    sink = TransferSink(checkers, ["naive", "s"])
    for k, (frame, data) in enumerate(zip(originals, published, strict=True)):
        origin = Origin(camera_id="c", sequence=k)
        outcome = Published(data=data)
        sink.add(Processed(origin, frame, outcome, frame_record(origin, outcome, "w", None, "s")))
    dropped = Dropped(error=StageError("correct_failed", "test"))
    origin = Origin(camera_id="c", sequence=99)
    sink.add(Processed(origin, originals[0], dropped, frame_record(origin, dropped, "w", None, "s")))
    sink.flush()

    def decide(frames: list[Frame]) -> torch.Tensor:
        return checkers.decide([torch.from_numpy(f).permute(2, 0, 1).float() for f in frames])[0]

    expected = (decide(originals) != decide([decode_frame(d) for d in published])).sum(dim=1)
    assert expected.sum() > 0, "the test needs some changed decisions"
    assert sink.frames == {"naive": 0, "s": 12}  # the dropped frame is not counted
    assert sink.changed["s"] == {"a": int(expected[0]), "b": int(expected[1])}


def test_check_with_names_must_exist_and_leave_one_to_correct() -> None:
    from veilstream.commands.eval_transfer import split_check_with
    from veilstream.config import load_config
    from veilstream.errors import ConfigError

    config = load_config(ROOT / "config" / "ensemble.yaml", environ={})
    corrected, checked = split_check_with(config, ["efficientnet-lite2"])
    assert [c.name for c in corrected.classifiers] == ["efficientnet-lite0", "efficientnet-lite1"]
    assert [c.name for c in checked] == ["efficientnet-lite2"]
    paper = load_config(ROOT / "config" / "paper.yaml", environ={})
    _, (built,) = split_check_with(paper, ["efficientnet-lite1"])  # a built-in not in the config
    # It decides like the configured classifier: paper.yaml's top-1 classes, not the default vehicle groups.
    assert (built.source, built.input_size, built.grouping) == ("efficientnet-lite1", (240, 240), None)
    with pytest.raises(ConfigError, match="'resnet'"):
        split_check_with(config, ["resnet"])
    with pytest.raises(ConfigError, match="at least one must be corrected"):
        split_check_with(paper, ["efficientnet-lite0"])


@pytest.mark.slow
def test_eval_check_with_reports_transfer_per_model(media: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("bus.jpg", "zidane.jpg", "licenseplate_motion.jpg"):
        shutil.copy(media / name, inputs / name)
    report = tmp_path / "report"
    args = ["--config", str(ROOT / "config" / "paper.yaml"), "eval", str(inputs), "--report", str(report)]
    code = main([*args, "--check-with", "efficientnet-lite1", "--no-progress"])
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    rows = {row["classifier"]: row for row in summary["models"]}
    assert set(rows) == {"efficientnet-lite0", "efficientnet-lite1"}
    assert rows["efficientnet-lite0"]["corrected"] and not rows["efficientnet-lite1"]["corrected"]
    assert rows["efficientnet-lite0"]["final_changed"] == summary["final_changed"] == 0
    assert rows["efficientnet-lite1"]["frames"] == 3
    assert summary["sweep"][0]["checked_final_changed"] == {
        "efficientnet-lite1": rows["efficientnet-lite1"]["final_changed"]
    }
    assert summary["parameters"]["checked_with"] == ["efficientnet-lite1"]
    assert summary["parameters"]["classifiers"] == ["efficientnet-lite0"]
    # The frame records hold the corrected members only: the checked model is never corrected against.
    records = [json.loads(line) for line in (report / "frames.jsonl").read_text().splitlines()]
    assert {d["classifier"] for r in records for d in r["final"]} == {"efficientnet-lite0"}
