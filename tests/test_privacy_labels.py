"""The labelled privacy set: the file in the repository validates and names the media we fetch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from veilstream.evaluation.labels import LabelSet, load_labels, media_problems

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "datasets" / "privacy" / "labels.json"


def test_the_labels_file_validates_and_covers_what_the_issue_asks() -> None:
    labels = load_labels(LABELS)
    names = {m.name for m in labels.media}
    assert {
        "vtest.avi",
        "bus.jpg",
        "zidane.jpg",
        "grace_hopper.jpg",
        "astronaut.png",
        "licenseplate_motion.jpg",
    } <= names
    video = [f.frame for f in labels.frames if f.media == "vtest.avi" and f.frame is not None]
    assert len(video) >= 60 and max(video) - min(video) > 700  # spread over the video
    assert any(run.last - run.first + 1 >= 30 for run in labels.runs)
    faces = [o for _, o in labels.objects() if o.kind == "face" and not o.difficult]
    plates = [o for _, o in labels.objects() if o.kind == "plate" and not o.difficult]
    assert len(faces) >= 200 and len(plates) >= 1
    run = labels.runs[0]
    tracked = [o for f, o in labels.objects() if f.frame in run.indices() and o.kind == "face" and not o.difficult]
    assert tracked and all(o.track for o in tracked)  # flicker needs identities along the run


def test_every_labelled_media_file_is_fetched_with_its_checksum(media: Path) -> None:
    assert media_problems(load_labels(LABELS), media) == []
    script = (ROOT / "scripts" / "fetch-media.sh").read_text()
    for file in load_labels(LABELS).media:
        assert file.name in script, f"{file.name} is labelled but scripts/fetch-media.sh does not fetch it"


def test_the_media_check_reports_missing_and_changed_files(tmp_path: Path) -> None:
    labels = load_labels(LABELS)
    (tmp_path / "bus.jpg").write_bytes(b"not the labelled bus")
    problems = media_problems(labels, tmp_path)
    assert "bus.jpg: checksum differs from the labelled file" in problems
    assert any(p.startswith("vtest.avi: missing") for p in problems)


def minimal() -> dict[str, Any]:
    return {
        "version": 1,
        "media": [
            {"name": "a.avi", "sha256": "0" * 64, "width": 100, "height": 80, "frames": 10, "source": "test"},
            {"name": "b.jpg", "sha256": "1" * 64, "width": 50, "height": 50, "frames": None, "source": "test"},
        ],
        "runs": [{"media": "a.avi", "first": 1, "last": 2}],
        "frames": [
            {"media": "a.avi", "frame": 1, "objects": [{"kind": "face", "box": [1, 1, 9, 9], "height": 8}]},
            {"media": "a.avi", "frame": 2, "objects": []},
            {"media": "b.jpg", "frame": None, "objects": [{"kind": "plate", "box": [0, 0, 50, 10], "height": 10}]},
        ],
    }


def test_a_minimal_set_validates() -> None:
    labels = LabelSet.model_validate(minimal())
    assert [f.key for f in labels.by_media()["a.avi"]] == [("a.avi", 1), ("a.avi", 2)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["frames"][0]["objects"][0].update(box=[1, 1, 101, 9]), "leaves the 100x80 frame"),
        (lambda d: d["frames"][0]["objects"][0].update(height=5), "does not match the box"),
        (lambda d: d["frames"][0]["objects"][0].update(box=[5, 1, 5, 9], height=8), "0 <= x1 < x2"),
        (lambda d: d["frames"][0].update(frame=10), "has 10 frames"),
        (lambda d: d["frames"][2].update(frame=0), "an image none"),
        (lambda d: d["frames"].append({"media": "a.avi", "frame": 1}), "labelled twice"),
        (lambda d: d["frames"].append({"media": "c.png"}), "unknown media"),
        (lambda d: d["runs"][0].update(last=3), "lacks labelled frames"),
        (lambda d: d["frames"][0]["objects"][0].update(kind="person"), "kind"),
    ],
)
def test_broken_labels_are_refused(change: Any, message: str) -> None:
    data = minimal()
    change(data)
    with pytest.raises(ValidationError, match=message):
        LabelSet.model_validate_json(json.dumps(data))
