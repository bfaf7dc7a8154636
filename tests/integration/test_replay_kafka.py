"""`veilstream replay` against the real broker: pacing, per-camera order, manifests, resumption, ground truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.brokers import TopicFactory
from veilstream.commands.cli import main
from veilstream.publishing.encoding import encode_frame

from ..conftest import noise_frames
from .worker_harness import Topics, consume_all, headers_of, running_worker, write_config


def _folder(path: Path, count: int, seed: int) -> Path:
    path.mkdir()
    for i, frame in enumerate(noise_frames(count, seed=seed)):
        (path / f"{i:03d}.jpg").write_bytes(encode_frame(frame, "jpeg"))
    return path


def _replay(bootstrap: str, *args: str) -> int:
    return main(["replay", "--bootstrap", bootstrap, "--no-progress", *args])


def test_fixed_rate_is_kept(kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path) -> None:
    topic = topic_factory("rate")
    folder = _folder(tmp_path / "cam", 21, seed=1)
    assert _replay(kafka_bootstrap, str(folder), "--topic", topic, "--rate", "20") == 0
    records = consume_all(kafka_bootstrap, topic, 21)
    assert len(records) == 21
    # From the second record: the first is stamped after the producer's first metadata fetch, which can be late.
    span = (records[-1].timestamp - records[1].timestamp) / 1000
    assert span == pytest.approx(0.95, abs=0.3), "19 intervals at 20 frames/s take 0.95 s"


def test_cameras_keep_their_order_and_recorded_timing(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = topic_factory("order", partitions=3)
    a, b = _folder(tmp_path / "a", 8, seed=2), _folder(tmp_path / "b", 5, seed=3)
    code = _replay(
        kafka_bootstrap,
        str(a),
        str(b),
        "--camera",
        "gate-a",
        "--camera",
        "gate-b",
        "--topic",
        topic,
        "--folder-fps",
        "10",
    )
    assert code == 0
    records = consume_all(kafka_bootstrap, topic, 13)
    per_camera: dict[str, list[int]] = {}
    for record in records:
        headers = headers_of(record)
        assert record.key.decode() == headers["camera-id"]
        per_camera.setdefault(headers["camera-id"], []).append(int(headers["sequence"]))
    assert per_camera == {"gate-a": list(range(8)), "gate-b": list(range(5))}
    # As recorded: 8 frames at 10 frames/s span 0.7 s.
    stamps = sorted(r.timestamp for r in records)
    assert (stamps[-1] - stamps[0]) / 1000 == pytest.approx(0.7, abs=0.3)


def test_resume_from_state_publishes_each_frame_once(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = topic_factory("resume")
    folder = _folder(tmp_path / "cam", 12, seed=4)
    state = tmp_path / "replay.state"
    args = [str(folder), "--topic", topic, "--rate", "max", "--state", str(state)]
    assert _replay(kafka_bootstrap, *args, "--limit", "5") == 0
    assert state.read_text() == "5"
    assert _replay(kafka_bootstrap, *args) == 0
    sequences = [int(headers_of(r)["sequence"]) for r in consume_all(kafka_bootstrap, topic, 12)]
    assert sequences == list(range(12))


@pytest.mark.slow
def test_ground_truth_flows_to_accuracy_metrics(
    kafka_bootstrap: str, topic_factory: TopicFactory, media: Path, tmp_path: Path
) -> None:
    for name in ("bus.jpg", "zidane.jpg", "licenseplate_motion.jpg"):
        shutil.copy(media / name, tmp_path / name)
    manifest = tmp_path / "labelled.csv"
    manifest.write_text(
        "path,camera_id,capture_time,ground_truth\n"
        "bus.jpg,gate-1,2026-03-01T08:00:00Z,bus\n"
        "zidane.jpg,gate-1,2026-03-01T08:00:01Z,car\n"
        "licenseplate_motion.jpg,gate-1,2026-03-01T08:00:02Z,car\n"
        "nothing-here.jpg,gate-1,2026-03-01T08:00:03Z,car\n"
    )
    topics = Topics(topic_factory("in"), topic_factory("out"), topic_factory("metrics"), topic_factory("dlq"))
    assert _replay(kafka_bootstrap, str(manifest), "--topic", topics.input, "--rate", "max") == 0
    inputs = consume_all(kafka_bootstrap, topics.input, 3)
    assert [headers_of(r)["ground-truth"] for r in inputs] == ["bus", "car", "car"]
    config, port = write_config(tmp_path, kafka_bootstrap, topics, aggregate_interval_s=1.0)
    with running_worker(config, port, tmp_path / "worker.log"):
        consume_all(kafka_bootstrap, topics.output, 3)
        records = [json.loads(r.value) for r in consume_all(kafka_bootstrap, topics.metrics, 4, timeout=60)]
    frames = [r for r in records if r["type"] == "frame"]
    aggregates = [r for r in records if r["type"] == "aggregate"]
    assert {f["ground_truth"] for f in frames} == {"bus", "car"}
    assert aggregates, "the worker publishes aggregate records"
    aggregate = aggregates[-1]
    assert aggregate["labelled_frames"] == 3
    hits = sum(f["original"][0]["label"] == f["ground_truth"] for f in frames)
    assert aggregate["accuracy_original"] == pytest.approx(hits / 3)
    published_hits = sum(f["final"][0]["label"] == f["ground_truth"] for f in frames)
    assert aggregate["accuracy_published"] == pytest.approx(published_hits / 3)
