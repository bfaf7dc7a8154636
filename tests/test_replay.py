from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from veilstream.commands.replay import ManifestError, Pacer, ReplayItem, interleave, read_manifest, replay
from veilstream.publishing.encoding import encode_frame

from .conftest import noise_frames


def _images(folder: Path, count: int) -> list[str]:
    names = []
    for i, frame in enumerate(noise_frames(count)):
        name = f"f{i}.jpg"
        (folder / name).write_bytes(encode_frame(frame, "jpeg"))
        names.append(name)
    return names


def test_csv_manifest_rows_and_bad_lines(tmp_path: Path) -> None:
    names = _images(tmp_path, 3)
    (tmp_path / "m.csv").write_text(
        "path,camera_id,capture_time,ground_truth\n"
        f"{names[0]},gate-1,2026-01-01T10:00:00Z,car\n"
        f"missing.jpg,gate-1,2026-01-01T10:00:01Z,car\n"
        f"{names[1]},,2026-01-01T10:00:02Z,van\n"
        f"{names[1]},gate-2,yesterday,van\n"
        f"{names[2]},gate-1,2026-01-01T10:00:04Z,\n"
    )
    errors: list[ManifestError] = []
    items = read_manifest(tmp_path / "m.csv", errors)
    assert [(e.line, e.message.split()[0]) for e in errors] == [(3, "no"), (4, "needs"), (5, "bad")]
    assert [(i.camera_id, i.sequence, i.offset_s, i.ground_truth) for i in items] == [
        ("gate-1", 0, 0.0, "car"),
        ("gate-1", 1, 4.0, None),
    ]
    headers = dict(items[0].headers(items[0].load()))
    assert headers["ground-truth"] == b"car"
    assert headers["content-type"] == b"image/jpeg"
    assert headers["capture-time"].startswith(b"2026-01-01T10:00:00")


def test_jsonl_manifest_reports_line_numbers(tmp_path: Path) -> None:
    names = _images(tmp_path, 2)
    (tmp_path / "m.jsonl").write_text(
        f'{{"path": "{names[0]}", "camera_id": "a", "ground_truth": "bus"}}\n'
        "not json\n"
        "\n"
        "[1, 2]\n"
        f'{{"path": "{names[1]}", "camera_id": "a"}}\n'
    )
    errors: list[ManifestError] = []
    items = read_manifest(tmp_path / "m.jsonl", errors)
    assert [e.line for e in errors] == [2, 4]
    assert [i.sequence for i in items] == [0, 1]


def _item(camera: str, sequence: int, offset: float) -> ReplayItem:
    return ReplayItem(camera, sequence, offset, datetime.now(UTC), lambda: b"x")


def test_interleave_merges_cameras_by_time_and_keeps_order() -> None:
    a = [_item("a", i, i * 0.1) for i in range(4)]
    b = [_item("b", i, 0.05 + i * 0.2) for i in range(2)]
    merged = [(i.camera_id, i.sequence) for i in interleave([a, b])]
    assert merged == [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1), ("a", 3)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("mode", "fps", "expected"), [("recorded", None, 0.9), ("fixed", 5.0, 1.8), ("max", None, 0.0)]
)
def test_pacer_schedules(mode: str, fps: float | None, expected: float) -> None:
    clock = FakeClock()
    pacer = Pacer(mode, fps, clock=clock)  # type: ignore[arg-type]
    for i in range(10):
        pacer.wait(_item("a", i, i * 0.1), sleep=clock.sleep)
    assert clock.now == pytest.approx(expected)


def test_replay_resumes_limits_and_loops() -> None:
    sent: list[tuple[str, int]] = []

    def items() -> list[ReplayItem]:
        return [_item("a", i, 0.0) for i in range(5)]

    stats = replay(lambda: iter(items()), lambda item, _: sent.append((item.camera_id, item.sequence)), Pacer("max"), 2)
    assert stats.sent == 3
    assert stats.skipped == 2
    assert [s for _, s in sent] == [2, 3, 4]
    sent.clear()
    stats = replay(lambda: iter(items()), lambda item, _: sent.append(("a", item.sequence)), Pacer("max"), 0, 12, True)
    assert stats.sent == 12
    assert [s for _, s in sent] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
