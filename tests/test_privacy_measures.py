"""The privacy measurements: what counts as hidden, leaked, blurred for nothing, and flicker."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from veilstream.detectors.base import Detection
from veilstream.evaluation.labels import LabelledFrame, LabelledObject, LabelSet, MediaFile, Run
from veilstream.evaluation.leaks import leak_findings
from veilstream.evaluation.measures import (
    ANONYMIZED_BELOW,
    blurred_area,
    box_mask,
    coverage,
    detail_kept,
    detection_verdict,
    flicker_events,
    grey,
    height_bin,
    is_anonymized,
    recall_by_bin,
)
from veilstream.evaluation.report import format_table, summarize
from veilstream.evaluation.results import measure_frame


def textured(height: int = 120, width: int = 160, seed: int = 0) -> npt.NDArray[np.uint8]:
    """A frame full of detail at every scale (what a face has and a blur removes)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    coarse = cv2.resize(base, (width, height), interpolation=cv2.INTER_NEAREST)
    fine = rng.integers(-40, 40, (height, width, 3))
    return np.clip(coarse.astype(int) + fine, 0, 255).astype(np.uint8)


def blurred_in(frame: npt.NDArray[np.uint8], box: tuple[int, int, int, int], sigma: float) -> npt.NDArray[np.uint8]:
    x1, y1, x2, y2 = box
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.GaussianBlur(frame, (0, 0), sigma)[y1:y2, x1:x2]
    return out


def face(box: tuple[float, float, float, float], **extra: object) -> LabelledObject:
    return LabelledObject.model_validate({"kind": "face", "box": box, "height": box[3] - box[1], **extra})


@pytest.mark.parametrize(
    ("height", "name"), [(0, "<10"), (9.99, "<10"), (10, "10-16"), (16, "16-32"), (63.9, "32-64"), (64, ">=64")]
)
def test_height_bins_have_closed_lower_bounds(height: float, name: str) -> None:
    assert height_bin(height) == name


def test_a_negative_height_is_refused() -> None:
    with pytest.raises(ValueError, match="height"):
        height_bin(-1)


def test_detail_kept_tells_untouched_from_blurred_and_half_blurred() -> None:
    frame = textured()
    box = (40, 30, 100, 90)
    original = grey(frame)
    ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    untouched = detail_kept(original, grey(np.asarray(cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED), np.uint8)), box)
    blurred = detail_kept(original, grey(blurred_in(frame, box, 12)), box)
    half = detail_kept(original, grey(blurred_in(frame, (40, 30, 70, 90), 12)), box)
    assert untouched is not None and untouched > 0.8
    assert blurred is not None and abs(blurred) < 0.1
    assert half is not None and 0.3 < half < 0.7
    assert is_anonymized(blurred) is True
    assert is_anonymized(untouched) is False
    assert is_anonymized(half) is False  # half a face is a leak


def test_detail_scales_with_the_box_so_a_weak_blur_does_not_hide_a_large_face() -> None:
    frame = np.asarray(cv2.resize(textured(60, 80, seed=3), (640, 480), interpolation=cv2.INTER_CUBIC), np.uint8)
    box = (100, 80, 400, 400)
    kept = detail_kept(grey(frame), grey(blurred_in(frame, box, 2.0)), box)
    assert kept is not None and kept > ANONYMIZED_BELOW


def test_a_flat_box_has_no_detail_to_judge() -> None:
    frame = np.full((50, 50, 3), 120, np.uint8)
    assert detail_kept(grey(frame), grey(frame), (10, 10, 30, 30)) is None
    assert is_anonymized(None) is None


def test_coverage_and_blurred_area_count_pixels() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[:, :10] = True  # the left half is blurred
    assert coverage((5, 0, 15, 10), mask) == pytest.approx(0.5)
    assert coverage((30, 0, 40, 10), mask) == 0.0
    area = blurred_area(mask, [(0, 0, 4, 10)], margin=0.5)
    assert (area.blurred, area.pixels) == (100, 200)
    assert (area.blurred_outside, area.outside) == (60, 160)
    # Grown by half its width on each side the label reaches x = 6: 40 blurred pixels left away from it.
    assert (area.blurred_away, area.away) == (40, 140)
    assert box_mask([(0.5, 0.5, 1.2, 1.2)], 3, 3).sum() == 4


def test_detection_verdicts() -> None:
    objects, difficult, ignore = [(10, 10, 20, 20)], [(50, 50, 60, 60)], [(100, 0, 200, 50)]
    assert detection_verdict((5, 5, 25, 25), objects, difficult, ignore) == "object"
    assert detection_verdict((12, 12, 18, 18), objects, difficult, ignore) == "object"  # part of a large face
    assert detection_verdict((48, 48, 58, 58), objects, difficult, ignore) == "difficult"
    assert detection_verdict((120, 10, 140, 30), objects, difficult, ignore) == "ignored"
    assert detection_verdict((70, 70, 80, 80), objects, difficult, ignore) == "false"
    assert detection_verdict((18, 18, 40, 40), objects, difficult, ignore) == "false"  # a corner is not a hit


def test_flicker_is_hidden_then_visible_in_the_next_frame_only() -> None:
    states = {
        1: {"a": True, "b": False},
        2: {"a": False, "b": True},  # a flickers at 1 -> 2; b appears hidden: fine
        3: {"a": True, "b": True},
        5: {"a": False, "b": False},  # frame 4 is missing: 3 -> 5 is not consecutive
        6: {"b": True},
        7: {"a": False},  # b is not labelled in frame 7 (turned away, left the picture): not a flicker
    }
    assert [(e.track, e.frame) for e in flicker_events(states)] == [("a", 1)]


def test_recall_by_bin() -> None:
    bins = recall_by_bin([(8, True), (9, False), (12, True), (100, True)])
    assert (bins["<10"].labelled, bins["<10"].anonymized, bins["<10"].recall) == (2, 1, 0.5)
    assert bins["10-16"].recall == 1.0
    assert bins["16-32"].recall is None
    assert list(bins) == ["<10", "10-16", "16-32", "32-64", ">=64"]


def labelled_frame(frame: int | None = None) -> LabelledFrame:
    return LabelledFrame(
        media="clip.avi" if frame is not None else "still.jpg",
        frame=frame,
        objects=(
            face((20, 20, 60, 60), track="p1"),
            face((100, 20, 140, 60), track="p2"),
            face((70, 80, 80, 90), difficult=True),
        ),
    )


def test_measure_frame_hidden_and_leaked() -> None:
    original = textured()
    published = blurred_in(original, (10, 10, 70, 70), 15)  # p1 blurred, p2 left as it is
    blurred = box_mask([(10, 10, 70, 70)], *original.shape[:2])
    detections = [Detection(10, 10, 70, 70, 0.9, "face"), Detection(0, 100, 10, 110, 0.5, "face")]
    result = measure_frame(labelled_frame(), original, published, blurred, detections, "published")
    hidden = {o.label.track: o.anonymized for o in result.objects}
    assert hidden == {"p1": True, "p2": False, None: False}
    assert result.leaks == 1  # the difficult head is never a leak
    assert [d.verdict for d in result.detections] == ["object", "false"]
    assert result.area is not None and result.area.blurred == 3600


def test_a_dropped_frame_leaks_nothing_and_a_masked_one_hides_everything() -> None:
    original = textured()
    dropped = measure_frame(labelled_frame(), original, None, None, [], "dropped")
    assert all(o.anonymized for o in dropped.objects) and dropped.area is None
    grey_frame = np.full_like(original, 128)
    everything = np.ones(original.shape[:2], dtype=bool)
    masked = measure_frame(labelled_frame(), original, grey_frame, everything, [], "masked")
    assert all(o.anonymized for o in masked.objects)
    with pytest.raises(ValueError, match="dropped"):
        measure_frame(labelled_frame(), original, grey_frame, everything, [], "dropped")


def test_leak_findings_against_the_labels() -> None:
    blurred = box_mask([(10, 10, 70, 70)], 120, 160)
    found = [
        Detection(20, 20, 60, 60, 0.99, "face"),  # inside our blur: not a leak
        Detection(101, 21, 139, 59, 0.98, "face"),  # the labelled face we left visible
        Detection(68, 78, 82, 92, 0.95, "face"),  # the difficult head
        Detection(140, 90, 155, 110, 0.93, "face"),  # nothing labelled there
    ]
    statuses = [f["status"] for f in leak_findings(found, blurred, labelled_frame())]
    assert statuses == ["labelled", "difficult", "unlabelled"]


def test_summary_figures_and_table() -> None:
    frames = {i: labelled_frame(i) for i in (1, 2, 3)}
    labels = LabelSet(
        media=(MediaFile(name="clip.avi", sha256="0" * 64, width=160, height=120, frames=10, source="test"),),
        runs=(Run(media="clip.avi", first=1, last=3),),
        frames=tuple(frames.values()),
    )
    original = textured()
    p1 = (10, 10, 70, 70)
    both = box_mask([p1, (90, 10, 150, 70)], 120, 160)
    # Frame 1 hides both faces, frame 2 only p1 (p2 flickers), frame 3 both again.
    results = [
        measure_frame(frames[1], original, blurred_in(blurred_in(original, p1, 15), (90, 10, 150, 70), 15), both,
                      [], "published"),
        measure_frame(frames[2], original, blurred_in(original, p1, 15), box_mask([p1], 120, 160), [], "published"),
        measure_frame(frames[3], original, np.full_like(original, 128), np.ones((120, 160), bool), [], "masked"),
    ]  # fmt: skip
    summary = summarize(results, labels, {"threshold": ANONYMIZED_BELOW}, None)
    assert (summary["faces"]["labelled"], summary["faces"]["anonymized"]) == (6, 5)
    assert summary["faces"]["by_height"][">=64"]["labelled"] == 0
    assert summary["faces"]["by_height"]["32-64"] == {"labelled": 6, "anonymized": 5, "recall": 0.8333}
    assert summary["leaks"]["objects"] == 1 and summary["leaks"]["list"][0]["frame"] == 2
    assert summary["flicker"]["events"] == 1
    assert summary["flicker"]["runs"][0]["list"] == [{"track": "p2", "hidden_in": 1, "visible_in": 2}]
    assert (summary["masked"], summary["published"]) == (1, 2)
    table = format_table(summary)
    assert "32-64 px" in table and "83.3%" in table and "flicker (hidden in t, visible in t+1): 1" in table
