"""`veilstream privacy` on a few labelled frames: the default pipeline measured on its published frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veilstream.commands.cli import main
from veilstream.evaluation.labels import load_labels
from veilstream.evaluation.measures import ANONYMIZED_BELOW

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "datasets" / "privacy" / "labels.json"


def subset(tmp_path: Path, keep: set[tuple[str, int | None]], run: tuple[int, int]) -> Path:
    data = json.loads(LABELS.read_text())
    data["frames"] = [f for f in data["frames"] if (f["media"], f["frame"]) in keep]
    used = {f["media"] for f in data["frames"]}
    data["media"] = [m for m in data["media"] if m["name"] in used]
    data["runs"] = [{"media": "vtest.avi", "first": run[0], "last": run[1]}]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_media_is_reported_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["privacy", str(LABELS), "--media", str(tmp_path), "--report", str(tmp_path / "report")])
    assert code == 2
    assert "vtest.avi: missing" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_privacy_report_on_a_few_labelled_frames(
    media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = {("vtest.avi", 700), ("vtest.avi", 701), ("vtest.avi", 702), ("zidane.jpg", None),
            ("grace_hopper.jpg", None), ("licenseplate_motion.jpg", None)}  # fmt: skip
    labels_path = subset(tmp_path, keep, (700, 702))
    labels = load_labels(labels_path)
    report = tmp_path / "report"
    code = main(["privacy", str(labels_path), "--media", str(media), "--report", str(report), "--no-progress"])
    assert code == 0
    assert "faces by height" in capsys.readouterr().out
    summary = json.loads((report / "summary.json").read_text())
    faces = [o for _, o in labels.objects() if o.kind == "face" and not o.difficult]
    assert summary["frames"] == 6 and summary["published"] == 6
    assert summary["faces"]["labelled"] == len(faces)
    # The default finds every large face and the motion-blurred plate; what it misses are the tiny faces.
    assert summary["faces"]["by_height"][">=64"] == {"labelled": 3, "anonymized": 3, "recall": 1.0}
    assert summary["plates"] == {"labelled": 1, "anonymized": 1, "recall": 1.0}
    leaks = summary["leaks"]["list"]
    assert all(leak["height"] < 16 and leak["detail_kept"] >= ANONYMIZED_BELOW for leak in leaks)
    assert summary["leaks"]["objects"] == len(leaks) == summary["faces"]["labelled"] - summary["faces"]["anonymized"]
    assert summary["flicker"]["runs"][0]["first"] == 700 and summary["flicker"]["events"] >= 0
    # vtest.avi's plates are too small to read: every plate box there is on something else or a difficult plate.
    assert summary["detections"]["plate"]["by_media"]["licenseplate_motion.jpg"]["false"] == 0
    lines = (report / "objects.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(f.objects) for f in labels.frames)
    assert (report / "privacy.png").stat().st_size > 0
    assert set(summary["sheets"]) <= {p.name for p in report.iterdir()}


def test_the_sink_measures_published_masked_and_dropped_frames() -> None:
    import cv2
    import numpy as np

    from veilstream.commands.privacy import PrivacySink
    from veilstream.detectors.base import Detection
    from veilstream.errors import StageError
    from veilstream.evaluation.labels import LabelSet
    from veilstream.outcome import Dropped, Masked, Published
    from veilstream.publishing.encoding import Encoder
    from veilstream.publishing.records import frame_record
    from veilstream.runner import Origin, Processed

    labels = LabelSet.model_validate(
        {
            "media": [{"name": "a.png", "sha256": "0" * 64, "width": 160, "height": 120, "source": "test"}],
            "frames": [
                {
                    "media": "a.png",
                    "objects": [
                        {"kind": "face", "box": [20, 20, 60, 60], "height": 40},
                        {"kind": "face", "box": [100, 20, 140, 60], "height": 40},
                    ],
                }
            ],
        }
    )
    rng = np.random.default_rng(0)
    frame = np.clip(rng.normal(128, 60, (120, 160, 3)), 0, 255).astype(np.uint8)
    hidden = frame.copy()
    hidden[10:70, 10:70] = cv2.GaussianBlur(frame, (0, 0), 15)[10:70, 10:70]
    encoder = Encoder("png", 90)
    origin = Origin(camera_id="a.png")
    sink = PrivacySink(labels)
    outcomes: list[Published | Masked | Dropped] = [
        Published((Detection(10, 10, 70, 70, 0.9, "face"),), data=encoder.encode(hidden)),
        Masked(data=encoder.grey(frame), error=StageError("detect_failed", "test")),
        Dropped(error=StageError("detect_failed", "test")),
    ]
    for outcome in outcomes:
        sink.add(Processed(origin, frame, outcome, frame_record(origin, outcome, "test")))
    undecodable = Dropped(error=StageError("corrupt_data", "test"))
    sink.add(Processed(origin, None, undecodable, frame_record(origin, undecodable, "test")))
    published, masked, dropped, never_decoded = sink.results
    assert [o.anonymized for o in published.objects] == [True, False]
    assert published.area is not None and published.area.blurred == 60 * 60
    assert [d.verdict for d in published.detections] == ["object"]
    assert all(o.anonymized for o in masked.objects) and masked.area is not None
    assert masked.area.blurred == masked.area.pixels
    assert all(o.anonymized for o in dropped.objects) and dropped.area is None
    assert all(o.anonymized for o in never_decoded.objects) and never_decoded.outcome == "dropped"
    assert len(sink.examples["leaks"]) == 1  # the visible face of the published frame
