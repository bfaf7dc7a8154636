"""`run_monitor` and the report's topic loader against a real Kafka broker, fed hand-built metrics records
(frame records of every outcome, an aggregate record) and dead letters: the JSON snapshot's figures (equal
to `stats.figures`), the time window, exit codes 0 / 1 / 2 and consumer lag."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.structs import OffsetAndMetadata

from tests.support.brokers import TopicFactory
from veilstream.monitoring.monitor import run_monitor
from veilstream.monitoring.report import load_kafka
from veilstream.monitoring.snapshot import Thresholds
from veilstream.schemas import AggregateRecord, DecisionRecord, FrameRecord
from veilstream.stats import figures

pytestmark = pytest.mark.kafka


def decision(label: str) -> list[DecisionRecord]:
    return [DecisionRecord(classifier="lite0", index=0, label=label, confidence=0.9)]


def frame(
    camera: str,
    time: datetime,
    *,
    naive: bool = False,
    final: bool = False,
    iterations: int = 0,
    latency: float = 50,
    outcome: Literal["published", "masked", "dropped"] = "published",
) -> FrameRecord:
    """A frame record; a masked or dropped one failed before correction, so it carries no decisions."""
    origin: dict[str, Any] = {
        "worker": "w1",
        "time": time,
        "camera_id": camera,
        "source_topic": "frames",
        "source_partition": 0,
        "source_offset": 0,
        "latency_ms": latency,
    }
    if outcome != "published":
        return FrameRecord(**origin, outcome=outcome, reason="truncated", flagged=True)
    return FrameRecord(
        **origin,
        outcome="published",
        flagged=final,
        faces=1,
        corrected=True,
        original=decision("bus"),
        naive=decision("truck" if naive else "bus"),
        final=decision("truck" if final else "bus"),
        naive_changed=naive,
        consistent=not final,
        stop_reason="consistent",
        iterations=iterations,
        max_pixel_change=2,
        published_bytes=4096,
        stage_ms={"detect": 5.0},
    )


def aggregate(frames: list[FrameRecord], time: datetime) -> AggregateRecord:
    """The worker's window record of these frames, made as the worker makes it."""
    window = figures(frames, 10.0).model_dump()
    return AggregateRecord(**window, worker="w1", window_start=time - timedelta(seconds=10), window_end=time)


@pytest.fixture
def producer(kafka_bootstrap: str) -> Iterator[Any]:
    client = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    yield client
    client.close()


def publish(producer: Any, topic: str, values: Sequence[bytes], headers: list[tuple[str, bytes]] | None = None) -> None:
    for value in values:
        producer.send(topic, value=value, headers=headers or [])
    producer.flush(timeout=30)


def dead_letter(producer: Any, topic: str, reason: str, camera: str | None) -> None:
    headers = [("dlq-reason", reason.encode()), ("dlq-detail", b"test"), ("source-topic", b"frames")]
    if camera is not None:
        headers.append(("camera-id", camera.encode()))
    publish(producer, topic, [b"\xff\xd8 original frame bytes"], headers)


def snapshot_json(bootstrap: str, metrics: str, dlq: str | None, **options: Any) -> tuple[int, dict[str, Any]]:
    """Exit code and parsed JSON of one `--once --json` run."""
    out, err = io.StringIO(), io.StringIO()
    code = run_monitor(bootstrap, metrics, dlq, once=True, as_json=True, out=out, err=err, timeout_s=60, **options)
    assert out.getvalue(), err.getvalue()
    data: dict[str, Any] = json.loads(out.getvalue())
    return code, data


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def recent(now: datetime) -> list[FrameRecord]:
    """The frame records of the last minute: 4 published and corrected, a dropped and a masked one."""
    return [
        frame("cam-a", now - timedelta(seconds=40), latency=10),
        frame("cam-a", now - timedelta(seconds=35), latency=15, outcome="dropped"),
        frame("cam-a", now - timedelta(seconds=30), naive=True, iterations=3, latency=20),
        frame("cam-b", now - timedelta(seconds=20), naive=True, iterations=5, latency=30),
        frame("cam-b", now - timedelta(seconds=15), latency=35, outcome="masked"),
        frame("cam-b", now - timedelta(seconds=10), latency=40),
    ]


@pytest.fixture
def topics(
    kafka_bootstrap: str, topic_factory: TopicFactory, producer: Any, now: datetime, recent: list[FrameRecord]
) -> tuple[str, str]:
    """A metrics topic (2 partitions) with the recent frames, one 2-hour-old frame, an aggregate and a junk
    message, and a dead-letter topic with 3 dead letters."""
    metrics = topic_factory("metrics", partitions=2)
    dlq = topic_factory("dlq")
    # produced now, so its Kafka timestamp is recent; its own time puts it outside a 5-minute window
    frames = [*recent, frame("cam-old", now - timedelta(hours=2), latency=1000)]
    publish(producer, metrics, [f.model_dump_json().encode() for f in frames])
    publish(producer, metrics, [aggregate(recent, now).model_dump_json().encode(), b"not a metrics record"])
    dead_letter(producer, dlq, "truncated", "cam-a")
    dead_letter(producer, dlq, "truncated", None)
    dead_letter(producer, dlq, "too_large", "cam-b")
    return metrics, dlq


def test_once_json_snapshot_of_the_window(
    kafka_bootstrap: str, topics: tuple[str, str], recent: list[FrameRecord]
) -> None:
    metrics, dlq = topics
    code, data = snapshot_json(kafka_bootstrap, metrics, dlq, window_s=300)
    assert code == 0
    assert data["violations"] == [] and data["ok"] is True
    overall = data["overall"]
    # exactly the one aggregate of the records in the window, over the 300 s window
    expected = figures(recent, data["window_seconds"]).model_dump(mode="json")
    assert {name: overall[name] for name in expected} == expected
    assert overall["frames"] == 6  # the 2-hour-old frame is outside the window
    assert (overall["published"], overall["masked"], overall["dropped"], overall["corrected"]) == (4, 1, 1, 4)
    assert overall["naive_changed"] == 2 and overall["naive_changed_rate"] == pytest.approx(0.5)
    assert overall["final_changed"] == 0 and overall["final_changed_rate"] == 0.0
    assert overall["mean_iterations"] == pytest.approx(4.0)  # [3, 5]
    assert overall["p50_latency_ms"] == pytest.approx(25.0)  # [10, 15, 20, 30, 35, 40]: rank 2.5
    assert overall["p95_latency_ms"] == pytest.approx(38.75)  # rank 4.75
    assert overall["frames_per_second"] == pytest.approx(6 / 300, rel=1e-3)  # over the 300 s window
    assert overall["dead_letters"] == 1  # the dropped frame record
    assert overall["dead_letter_messages"] == 3
    assert overall["dead_letters_by_reason"] == {"too_large": 1, "truncated": 2}
    assert sorted(data["cameras"]) == ["cam-a", "cam-b"]
    assert data["cameras"]["cam-a"]["dead_letters_by_reason"] == {"truncated": 1}
    assert data["cameras"]["cam-b"]["dead_letters_by_reason"] == {"too_large": 1}
    assert data["window_seconds"] == pytest.approx(300.0)
    assert data["invalid_records"] == 1  # the aggregate is skipped silently, the junk is counted
    assert data["workers"] == ["w1"]
    assert data["lag"] is None


def test_from_beginning_and_thresholds(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    metrics, dlq = topics
    # a group given to the monitor is a label only: nothing is committed under it
    code, data = snapshot_json(kafka_bootstrap, metrics, dlq, from_beginning=True, group="monitor-label")
    assert code == 0
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert admin.list_group_offsets({"monitor-label": None}).get("monitor-label", {}) == {}
    finally:
        admin.close()
    assert data["overall"]["frames"] == 7
    assert "cam-old" in data["cameras"]
    assert data["window_seconds"] == pytest.approx(2 * 3600 - 10, abs=1)  # from the oldest to the newest frame
    code, data = snapshot_json(
        kafka_bootstrap, metrics, dlq, from_beginning=True, thresholds=Thresholds(max_dead_letters=2)
    )
    assert code == 1
    assert data["violations"] == ["dead letters: 3 > 2 (too_large: 1, truncated: 2)"]


def test_final_decision_change_exits_1(kafka_bootstrap: str, topics: tuple[str, str], producer: Any) -> None:
    metrics, dlq = topics
    changed = frame("cam-b", datetime.now(UTC) - timedelta(seconds=5), naive=True, final=True, iterations=100)
    publish(producer, metrics, [changed.model_dump_json().encode()])
    code, data = snapshot_json(kafka_bootstrap, metrics, dlq)
    assert code == 1
    assert data["ok"] is False
    assert data["violations"] == ["final decision changes: 1 > 0 (cam-b: 1)"]
    assert data["overall"]["final_changed"] == 1 and data["cameras"]["cam-b"]["final_changed"] == 1
    out = io.StringIO()
    assert run_monitor(kafka_bootstrap, metrics, dlq, once=True, out=out) == 1  # text output, same verdict
    assert "VIOLATION: final decision changes: 1 > 0 (cam-b: 1)" in out.getvalue()


def test_group_lag(kafka_bootstrap: str, topics: tuple[str, str], topic_factory: TopicFactory, producer: Any) -> None:
    metrics, dlq = topics
    frames_topic = topic_factory("frames", partitions=2)
    for partition in (0, 1):
        for _ in range(5):
            producer.send(frames_topic, value=b"jpeg", partition=partition)
    producer.flush(timeout=30)
    worker = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id="workers-lag", enable_auto_commit=False)
    try:
        worker.commit({TopicPartition(frames_topic, 0): OffsetAndMetadata(3, "", -1)})  # partition 1: nothing
    finally:
        worker.close()
    options: dict[str, Any] = {"group_lag": "workers-lag", "lag_topics": [frames_topic]}
    code, data = snapshot_json(kafka_bootstrap, metrics, dlq, thresholds=Thresholds(max_lag=7), **options)
    assert code == 0
    assert data["lag"]["total"] == 7  # 5 - 3, and 5 - 0 where nothing is committed
    assert [(p["partition"], p["committed"], p["end"], p["lag"]) for p in data["lag"]["partitions"]] == [
        (0, 3, 5, 2),
        (1, None, 5, 5),
    ]
    code, data = snapshot_json(kafka_bootstrap, metrics, dlq, thresholds=Thresholds(max_lag=6), **options)
    assert code == 1
    assert data["violations"] == ["consumer lag of group workers-lag: 7 > 6"]
    # without lag topics, the topics the group committed offsets for
    code, data = snapshot_json(kafka_bootstrap, metrics, dlq, group_lag="workers-lag")
    assert [(p["partition"], p["lag"]) for p in data["lag"]["partitions"]] == [(0, 2)]
    out, err = io.StringIO(), io.StringIO()
    code = run_monitor(
        kafka_bootstrap, metrics, dlq, once=True, group_lag="workers-lag", lag_topics=["no-such"], out=out, err=err
    )
    assert code == 2 and "lag topic 'no-such' does not exist" in err.getvalue()


def test_kafka_problems_exit_2(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    metrics, _ = topics
    err = io.StringIO()
    assert run_monitor(kafka_bootstrap, "no-such-topic", None, once=True, out=io.StringIO(), err=err) == 2
    assert "metrics topic 'no-such-topic' does not exist" in err.getvalue()
    err = io.StringIO()
    code = run_monitor("127.0.0.1:1", metrics, None, once=True, connect_timeout_s=1, out=io.StringIO(), err=err)
    assert code == 2
    # a missing dead-letter topic is only a warning: no dead letters were written
    out, err = io.StringIO(), io.StringIO()
    assert run_monitor(kafka_bootstrap, metrics, "no-such-dlq", once=True, as_json=True, out=out, err=err) == 0
    assert "dead-letter topic 'no-such-dlq' not found" in err.getvalue()
    assert json.loads(out.getvalue())["overall"]["dead_letter_messages"] == 0


def test_live_dashboard(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    metrics, dlq = topics
    out = io.StringIO()
    code = run_monitor(kafka_bootstrap, metrics, dlq, refresh_s=0.5, duration_s=10, display="plain", out=out)
    assert code == 0
    last = out.getvalue().strip().split("\n\n")[-3:]
    assert "[live]" in last[0]
    assert [line.split()[1] for line in last[1].splitlines() if line.startswith("ALL")] == ["6"]
    assert last[2] == "thresholds: ok"


def test_report_loader_reads_a_time_range(kafka_bootstrap: str, topics: tuple[str, str], now: datetime) -> None:
    """`now` is the records' clock: a second reading of the time, after a slow setup, moved the range's edges."""
    metrics, _ = topics
    records = load_kafka(kafka_bootstrap, metrics, since=now - timedelta(minutes=10), until=now)
    frames = [r for r in records if isinstance(r, FrameRecord)]
    assert sorted(f.camera_id for f in frames) == ["cam-a"] * 3 + ["cam-b"] * 3
    assert sorted(f.outcome for f in frames) == ["dropped", "masked"] + ["published"] * 4
    assert sum(isinstance(r, AggregateRecord) for r in records) == 1
    everything = load_kafka(kafka_bootstrap, metrics)
    assert len(everything) == 8  # 7 frames and the aggregate; the junk message is skipped
    early = load_kafka(kafka_bootstrap, metrics, until=now - timedelta(seconds=25))
    assert sorted(r.camera_id for r in early if isinstance(r, FrameRecord)) == ["cam-a"] * 3 + ["cam-old"]
