"""The table of malformed and unusual inputs (tests/support/input_cases.py) through `anonymize`, in process, with
real decoding and a real (cheap) face detector: each input gets its documented outcome in summary.json, nothing
is left out, and every published frame is upright with its face masked (never the raw pixels)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from veilstream.commands.anonymize import run_anonymize
from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import Frame, decode_frame
from veilstream.factory import build_pipeline
from veilstream.schemas.records import FrameRecord

from .support.input_cases import Case, Failed, Published, Skipped, base_frame, cases, published_problem

# Correction off and one small face detector keep the run short; decoding is the real one. The mask anonymizer
# makes "anonymized" checkable on the published pixels.
CONFIG = VeilstreamConfig.model_validate(
    {
        "correction": {"enabled": False},
        "anonymizer": {"kind": "mask", "value": 128},
        "detectors": {"backends": [{"type": "centerface"}]},
        "pipeline": {"batch_size": 8},
    }
)


@pytest.fixture(scope="module")
def base(media: Path) -> Frame:
    return base_frame(media)


@pytest.fixture(scope="module")
def table(base: Frame) -> list[Case]:
    return cases(base)


@pytest.fixture(scope="module")
def run(table: list[Case], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One anonymize run over a folder holding the whole table."""
    inputs = tmp_path_factory.mktemp("inputs")
    out = tmp_path_factory.mktemp("out")
    for case in table:
        case.make(inputs)
        if case.blocked_output:
            (out / (Path(case.name).stem + ".jpg")).mkdir()
    summary = run_anonymize([inputs], build_pipeline(CONFIG), CONFIG, out, progress=False)
    records = [FrameRecord.model_validate_json(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert summary == json.loads((out / "summary.json").read_text())
    return {"inputs": inputs, "out": out, "summary": summary, "records": records}


def test_the_table_is_large_and_covers_the_issue(table: list[Case]) -> None:
    assert len(table) >= 30
    names = {case.name for case in table}
    for needed in ("truncated.jpg", "truncated.png", "truncated.webp", "truncated.bmp", "truncated.tif"):
        assert needed in names
    assert {f"exif-{o}.jpg" for o in range(1, 9)} <= names
    kinds = {type(case.cli) for case in table}
    assert kinds == {Published, Failed, Skipped}


def test_every_input_gets_its_documented_outcome(table: list[Case], run: dict[str, Any], base: Frame) -> None:
    problems = [f"{case.name}: {problem}" for case in table for problem in _cli_problems(case, run, base)]
    assert not problems, "\n".join(problems)


def test_nothing_is_left_out_of_the_summary(run: dict[str, Any]) -> None:
    """Every path under the input folder is a row (read) or in `skipped`; nothing else is in the summary."""
    inputs: Path = run["inputs"]
    summary = run["summary"]
    accounted = {row["source"] for row in summary["inputs"]} | {entry["input"] for entry in summary["skipped"]}
    assert accounted == {str(path) for path in _every_path(inputs)}


def test_errors_name_the_side_at_fault(run: dict[str, Any]) -> None:
    sides = {(Path(e["input"]).name, e["reason"]): e["side"] for e in run["summary"]["errors"]}
    assert sides[("corrupt.mp4", "unreadable_video")] == "input", "a broken input is not an unwritable output"
    assert sides[("truncated.jpg", "truncated")] == "input"
    assert sides[("blocked-output.png", "unwritable_output")] == "output"
    assert not any(Path(e["input"]).name == "corrupt.mp4" and e["side"] == "output" for e in run["summary"]["errors"])


def _cli_problems(case: Case, run: dict[str, Any], base: Frame) -> Iterator[str]:
    source = str(run["inputs"] / case.name)
    summary = run["summary"]
    rows = {row["source"]: row for row in summary["inputs"]}
    errors = [e for e in summary["errors"] if e["input"] == source]
    skipped = [e for e in summary["skipped"] if e["input"] == source]
    expected = case.cli
    if isinstance(expected, Skipped):
        if [e["reason"] for e in skipped] != [expected.reason]:
            yield f"expected skipped {expected.reason}, got {skipped or rows.get(source)}"
        return
    row = rows.get(source)
    if row is None:
        yield "no row in summary.json"
        return
    published = expected.frames if isinstance(expected, Published) else expected.published_before
    dropped = 0 if isinstance(expected, Published) else 1
    counts = (row["published"], row["masked"], row["dropped"])
    if counts != (published, 0, dropped):
        yield f"published, masked, dropped: {counts}, expected {(published, 0, dropped)}"
    input_errors = [(e["side"], e["reason"]) for e in errors if e["side"] != "output"]
    if isinstance(expected, Failed) and input_errors != [("input", expected.reason)]:
        yield f"expected the input error {expected.reason}, got {input_errors}"
    if isinstance(expected, Published) and input_errors:
        yield f"unexpected errors {input_errors}"
    if case.blocked_output:
        if [(e["side"], e["reason"]) for e in errors if e["side"] == "output"] != [("output", "unwritable_output")]:
            yield f"expected an output error, got {errors}"
        return
    yield from _published_problems(case, run, source, base)


def _published_problems(case: Case, run: dict[str, Any], source: str, base: Frame) -> Iterator[str]:
    """Check every published frame of an input against the upright input picture."""
    records = [r for r in run["records"] if r.source == source and r.outcome == "published"]
    output = next(row["output"] for row in run["summary"]["inputs"] if row["source"] == source)
    frames = _published_frames(Path(output), records) if output else []
    if len(frames) != len(records):
        yield f"{len(records)} frames published, {len(frames)} found in {output}"
        return
    for record, pixels in zip(records, frames, strict=True):
        boxes = [(d.x1, d.y1, d.x2, d.y2) for d in record.detections if d.kind == "face"]
        problem = published_problem(pixels, boxes, case.expected(base, record.sequence))
        if problem:
            yield f"frame {record.sequence}: {problem}"


def _published_frames(output: Path, records: list[FrameRecord]) -> list[Frame]:
    """The frames written for an input: a video's frames, an image, or the files of a multi-frame image (the
    summary names the first, STEM-0000.jpg)."""
    if output.suffix == ".mp4":
        capture = cv2.VideoCapture(str(output))
        frames: list[Frame] = []
        while (read := capture.read())[0]:
            frames.append(np.ascontiguousarray(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB), dtype=np.uint8))
        capture.release()
        return frames
    if records and records[0].sequence is not None:
        stem = output.stem.removesuffix("-0000")
        files = [output.with_name(f"{stem}-{r.sequence:04d}{output.suffix}") for r in records]
    else:
        files = [output]
    return [decode_frame(path.read_bytes()) for path in files if path.is_file()]


def _every_path(folder: Path) -> Iterator[Path]:
    """Each entry under `folder` (links not followed), folders named like media included, other folders not."""
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink():
            if path.suffix:
                yield path
            yield from _every_path(path)
        else:
            yield path
