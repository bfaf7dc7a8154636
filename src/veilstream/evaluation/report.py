"""The privacy report: summary.json figures, the printed table, a plot and contact sheets of examples."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from veilstream.evaluation.labels import LabelSet
from veilstream.evaluation.measures import HEIGHT_BINS, Recall, flicker_events, is_on, recall_by_bin
from veilstream.evaluation.results import FrameResult, ObjectResult, Pixels

SHEET_TILE = 96


@dataclass(frozen=True)
class Example:
    """A labelled object (or a leak-check finding) as the original and the published crop, for contact sheets."""

    title: str
    value: float | None
    status: str
    original: Pixels
    published: Pixels


def _ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 4)


def _recall(entry: Recall) -> dict[str, Any]:
    return {
        "labelled": entry.labelled,
        "anonymized": entry.anonymized,
        "recall": _ratio(entry.anonymized, entry.labelled),
    }


def _required(results: Sequence[FrameResult], kind: str) -> list[ObjectResult]:
    return [o for r in results for o in r.objects if o.label.kind == kind and not o.label.difficult]


def _flicker(results: Sequence[FrameResult], labels: LabelSet) -> dict[str, Any]:
    runs = []
    for run in labels.runs:
        states: dict[int, dict[str, bool]] = {}
        for result in results:
            if result.media == run.media and result.frame is not None and result.frame in run.indices():
                states[result.frame] = {
                    o.label.track: o.anonymized for o in result.objects if o.label.track and not o.label.difficult
                }
        events = flicker_events(states)
        runs.append(
            {
                "media": run.media,
                "first": run.first,
                "last": run.last,
                "events": len(events),
                "tracks": len({e.track for e in events}),
                "list": [{"track": e.track, "hidden_in": e.frame, "visible_in": e.frame + 1} for e in events],
            }
        )
    return {"events": sum(r["events"] for r in runs), "runs": runs}


def _detections(results: Sequence[FrameResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("face", "plate"):
        verdicts = Counter(d.verdict for r in results for d in r.detections if d.kind == kind)
        boxes = sum(verdicts.values())
        by_media: dict[str, Any] = {}
        for media in sorted({r.media for r in results}):
            mine = Counter(d.verdict for r in results if r.media == media for d in r.detections if d.kind == kind)
            total = sum(mine.values())
            by_media[media] = {
                "boxes": total,
                "false": mine["false"],
                "precision": _ratio(total - mine["false"], total),
            }
        out[kind] = {"boxes": boxes, **dict(verdicts), "precision": _ratio(boxes - verdicts["false"], boxes)}
        out[kind]["by_media"] = by_media
    return out


def _leak_check(results: Sequence[FrameResult], detector: str | None) -> dict[str, Any] | None:
    if detector is None:
        return None
    findings = [f for r in results for f in r.leak_check]
    statuses = Counter(str(f["status"]) for f in findings)
    leaked = sum(r.leaks for r in results)
    seen = sum(
        1
        for r in results
        for o in r.objects
        if o.leaked and any(f["status"] == "labelled" and _same_box(f, o) for f in r.leak_check)
    )
    return {
        "detector": detector,
        "outside_blur": len(findings),
        **dict(statuses),
        "labelled_leaks_seen": seen,
        "labelled_leaks": leaked,
        # The findings that are not a labelled leak: each needs a look (leak_check_NN.png).
        "list": [
            {"media": r.media, "frame": r.frame, **f}
            for r in results
            for f in r.leak_check
            if f["status"] != "labelled"
        ],
    }


def _same_box(finding: Mapping[str, object], result: ObjectResult) -> bool:
    box = finding["box"]
    assert isinstance(box, list)
    return is_on(result.label.box, (box[0], box[1], box[2], box[3]))


def summarize(
    results: Sequence[FrameResult], labels: LabelSet, parameters: Mapping[str, Any], leak_detector: str | None
) -> dict[str, Any]:
    """Every figure of the report, as summary.json holds it."""
    faces, plates = _required(results, "face"), _required(results, "plate")
    bins = recall_by_bin((o.label.height, o.anonymized) for o in faces)
    large = [o for o in faces if o.label.height >= 10]
    areas = [r.area for r in results if r.area is not None]
    leaks = [o for r in results for o in r.objects if o.leaked]
    outcomes = Counter(r.outcome for r in results)
    return {
        "frames": len(results),
        "published": outcomes["published"],
        "masked": outcomes["masked"],
        "dropped": outcomes["dropped"],
        "faces": {
            **_recall(Recall(len(faces), sum(o.anonymized for o in faces))),
            "at_least_10px": _recall(Recall(len(large), sum(o.anonymized for o in large))),
            "by_height": {name: _recall(entry) for name, entry in bins.items()},
        },
        "plates": _recall(Recall(len(plates), sum(o.anonymized for o in plates))),
        "leaks": {
            "objects": len(leaks),
            "frames_with_a_leak": sum(1 for r in results if r.leaks),
            "list": [
                {
                    "media": o.media,
                    "frame": o.frame,
                    "kind": o.label.kind,
                    "box": list(o.label.box),
                    "height": o.label.height,
                    "detail_kept": None if o.detail_kept is None else round(o.detail_kept, 3),
                    "coverage": round(o.coverage, 3),
                }
                for o in leaks
            ],
        },
        "blurred_share": {
            "outside_labels": _ratio(sum(a.blurred_outside for a in areas), sum(a.outside for a in areas)),
            "away_from_labels": _ratio(sum(a.blurred_away for a in areas), sum(a.away for a in areas)),
            "of_the_picture": _ratio(sum(a.blurred for a in areas), sum(a.pixels for a in areas)),
        },
        "flicker": _flicker(results, labels),
        "detections": _detections(results),
        "leak_check": _leak_check(results, leak_detector),
        "parameters": dict(parameters),
    }


def object_lines(results: Sequence[FrameResult]) -> list[str]:
    """One JSON line per labelled object with its measures (objects.jsonl), for comparing runs."""
    lines = []
    for result in results:
        for found in result.objects:
            entry = {
                "media": found.media,
                "frame": found.frame,
                **found.label.model_dump(exclude_none=True),
                "outcome": found.outcome,
                "detail_kept": None if found.detail_kept is None else round(found.detail_kept, 4),
                "coverage": round(found.coverage, 4),
                "anonymized": found.anonymized,
            }
            lines.append(json.dumps(entry))
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(summary: Mapping[str, Any]) -> str:
    """The headline figures as aligned text."""
    lines = [f"{'faces by height':<18} {'labelled':>8} {'hidden':>7} {'recall':>7}"]
    for name, entry in summary["faces"]["by_height"].items():
        lines.append(
            f"{name + ' px':<18} {entry['labelled']:>8} {entry['anonymized']:>7} {_percent(entry['recall']):>7}"
        )
    for title, entry in (
        ("faces >= 10 px", summary["faces"]["at_least_10px"]),
        ("all faces", summary["faces"]),
        ("plates", summary["plates"]),
    ):
        lines.append(f"{title:<18} {entry['labelled']:>8} {entry['anonymized']:>7} {_percent(entry['recall']):>7}")
    leaks, share, flicker = summary["leaks"], summary["blurred_share"], summary["flicker"]
    plates = summary["detections"]["plate"]
    lines += [
        f"visible leaks: {leaks['objects']} objects in {leaks['frames_with_a_leak']} of {summary['frames']} frames",
        f"blurred where nothing is labelled: {_percent(share['outside_labels'])} "
        f"(away from labelled objects: {_percent(share['away_from_labels'])}; "
        f"of the whole picture: {_percent(share['of_the_picture'])})",
        f"flicker (hidden in t, visible in t+1): {flicker['events']}",
        f"plate boxes: {plates['boxes']}, not on a plate: {plates.get('false', 0)} "
        f"(precision {_percent(plates['precision'])})",
    ]
    check = summary["leak_check"]
    if check is not None:
        lines.append(
            f"{check['detector']} outside our blur: {check['outside_blur']} faces "
            f"({check.get('labelled', 0)} labelled, "
            f"{check.get('difficult', 0)} difficult, {check.get('unlabelled', 0)} unlabelled); "
            f"labelled leaks it saw: {check['labelled_leaks_seen']} of {check['labelled_leaks']}"
        )
    return "\n".join(lines)


def write_plot(summary: Mapping[str, Any], results: Sequence[FrameResult], path: Path) -> None:
    """Recall by face height, and leaks and blurred share per labelled frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = summary["faces"]["by_height"]
    names = [name for name, _, _ in HEIGHT_BINS]
    values = [100 * (bins[n]["recall"] or 0.0) for n in names]
    bars = left.bar(names, values, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        entry = bins[name]
        left.annotate(
            f"{entry['anonymized']}/{entry['labelled']}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.axhline(98, color="tab:red", linestyle="--", linewidth=1, label="target 98% (>= 10 px)")
    left.set(ylim=(0, 110), xlabel="labelled face height (px)", ylabel="faces anonymized (%)", title="Face recall")
    left.legend(fontsize=8, loc="lower right")
    positions = range(len(results))
    right.bar(positions, [r.leaks for r in results], color="tab:red", label="visible labelled objects")
    right.set(xlabel="labelled frame (vtest.avi in order, then the images)", ylabel="leaks", title="Per frame")
    share = right.twinx()
    outside = [None if r.area is None else 100 * r.area.blurred_outside / max(1, r.area.outside) for r in results]
    share.plot(
        positions,
        [np.nan if v is None else v for v in outside],
        color="tab:gray",
        linewidth=1,
        label="blurred where nothing is labelled (%)",
    )
    share.set_ylabel("blurred, unlabelled (%)")
    right.legend(fontsize=8, loc="upper left")
    share.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _tile(example: Example) -> Pixels:
    pair = []
    for crop in (example.original, example.published):
        scale = SHEET_TILE / max(crop.shape[:2])
        big = cv2.resize(
            crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA
        )
        cell = np.zeros((SHEET_TILE, SHEET_TILE, 3), np.uint8)
        cell[: big.shape[0], : big.shape[1]] = big
        pair.append(cell)
    tile = np.zeros((SHEET_TILE + 28, 2 * SHEET_TILE + 2, 3), np.uint8)
    tile[:SHEET_TILE, :SHEET_TILE] = pair[0]
    tile[:SHEET_TILE, SHEET_TILE + 2 :] = pair[1]
    value = "-" if example.value is None else f"{example.value:.2f}"
    cv2.putText(tile, example.title[:30], (2, SHEET_TILE + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1)
    cv2.putText(
        tile, f"{example.status} {value}", (2, SHEET_TILE + 24), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1
    )
    return tile


def write_sheets(examples: Sequence[Example], folder: Path, name: str, columns: int = 6, rows: int = 8) -> list[str]:
    """PNG grids of original | published crops (RGB in), `columns` x `rows` per page: NAME_00.png, ...; the
    file names written (none when there is no example)."""
    if not examples:
        return []
    tiles = [_tile(e) for e in examples]
    per_page = columns * rows
    written = []
    for start in range(0, len(tiles), per_page):
        page = tiles[start : start + per_page]
        page += [np.zeros_like(page[0])] * (-len(page) % columns)
        lines = [
            np.hstack([np.pad(t, ((2, 2), (2, 2), (0, 0))) for t in page[i : i + columns]])
            for i in range(0, len(page), columns)
        ]
        file = f"{name}_{start // per_page:02d}.png"
        cv2.imwrite(str(folder / file), cv2.cvtColor(np.vstack(lines), cv2.COLOR_RGB2BGR))
        written.append(file)
    return written
