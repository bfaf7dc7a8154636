"""The broker harness against real brokers: large messages, keys and headers with kafka-python and
confluent-kafka, consumer-group commit and resume, durability over a broker restart, tansu, the CLI."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from tests.support.brokers import (
    KAFKA_VERSION,
    MAX_MESSAGE_BYTES,
    ApacheKafkaBroker,
    TansuBroker,
    TopicFactory,
    fetch_kafka,
    wait_for_broker,
)

pytestmark = pytest.mark.kafka

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Where ``python -m tests.support.brokers`` runs."""
FIVE_MB = 5 * 1024 * 1024
GROUP_TIMEOUTS: dict[str, int] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
HEADERS: list[tuple[str, bytes]] = [("content-type", b"image/jpeg"), ("frame-id", b"cam-7:000042"), ("empty", b"")]


@dataclass(frozen=True)
class Rec:
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


# ---------------------------------------------------------------------------------------------- clients


def kp_producer(bootstrap: str, **extra: Any) -> Any:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        max_request_size=MAX_MESSAGE_BYTES,
        request_timeout_ms=30000,
        **extra,
    )


def kp_consumer(bootstrap: str, *topics: str, **extra: Any) -> Any:
    return KafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=2 * MAX_MESSAGE_BYTES,
        max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
        **extra,
    )


def kp_poll(consumer: Any, count: int, timeout: float = 30.0) -> list[Rec]:
    """Poll until ``count`` records arrived (at most ``timeout`` seconds); returns exactly those."""
    records: list[Rec] = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500, max_records=count - len(records)).values():
            records += [Rec(r.offset, r.key, r.value, [(k, bytes(v)) for k, v in r.headers]) for r in batch]
    assert len(records) == count, f"got {len(records)} of {count} records within {timeout}s"
    return records


def kp_produce(bootstrap: str, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    producer = kp_producer(bootstrap)
    try:
        producer.send(topic, value=value, key=key, headers=headers).get(timeout=30)
    finally:
        producer.close(timeout=10)


def kp_consume_one(bootstrap: str, topic: str) -> Rec:
    consumer = kp_consumer(bootstrap)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        return kp_poll(consumer, 1)[0]
    finally:
        consumer.close()


def ck_produce(bootstrap: str, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    from confluent_kafka import Producer

    errors: list[Any] = []
    producer = Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": MAX_MESSAGE_BYTES, "acks": "all"},
    )

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)

    ck_headers: list[tuple[str, str | bytes | None]] = list(headers)
    producer.produce(topic, value=value, key=key, headers=ck_headers, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "confluent-kafka producer did not deliver within 30s"
    assert not errors, errors


def ck_consume_one(bootstrap: str, topic: str) -> Rec:
    from confluent_kafka import OFFSET_BEGINNING, Consumer
    from confluent_kafka import TopicPartition as CkTopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"vs-ck-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 2 * MAX_MESSAGE_BYTES,
            "max.partition.fetch.bytes": MAX_MESSAGE_BYTES,
            "receive.message.max.bytes": 2 * MAX_MESSAGE_BYTES + 1024 * 1024,
        }
    )
    try:
        consumer.assign([CkTopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            offset, value, headers = msg.offset(), msg.value(), msg.headers()
            assert offset is not None
            assert value is not None
            assert not isinstance(headers, dict)
            return Rec(offset, msg.key(), value, [(k, _as_bytes(v)) for k, v in headers or []])
        pytest.fail("confluent-kafka consumer got no record within 30s")
    finally:
        consumer.close()


def _as_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


PRODUCERS = {"kafka-python": kp_produce, "confluent-kafka": ck_produce}
CONSUMERS = {"kafka-python": kp_consume_one, "confluent-kafka": ck_consume_one}


# ---------------------------------------------------------------------------------------------- Apache Kafka


@pytest.mark.timeout(240)  # the first test may also download the jars and start the session broker
@pytest.mark.parametrize("consumer_client", list(CONSUMERS))
@pytest.mark.parametrize("producer_client", list(PRODUCERS))
def test_five_mb_message_with_key_and_headers_round_trips(
    kafka_bootstrap: str, topic_factory: TopicFactory, producer_client: str, consumer_client: str
) -> None:
    topic = topic_factory("big")
    payload = os.urandom(FIVE_MB)
    key = b"camera-7\x00\xff"

    PRODUCERS[producer_client](kafka_bootstrap, topic, key, payload, HEADERS)
    record = CONSUMERS[consumer_client](kafka_bootstrap, topic)

    assert record.offset == 0
    assert record.key == key
    assert record.headers == HEADERS
    assert len(record.value) == FIVE_MB
    assert record.value == payload


@pytest.mark.timeout(120)
def test_consumer_group_commits_and_resumes(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory("group")
    tp = TopicPartition(topic, 0)
    producer = kp_producer(kafka_bootstrap)
    try:
        for i in range(10):
            producer.send(topic, key=f"k{i}".encode(), value=f"m{i}".encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    group = f"vs-group-{uuid.uuid4().hex[:8]}"

    first = kp_consumer(kafka_bootstrap, topic, group_id=group, **GROUP_TIMEOUTS)
    try:
        got = kp_poll(first, 4)
        assert [r.value for r in got] == [b"m0", b"m1", b"m2", b"m3"]
        first.commit({tp: OffsetAndMetadata(got[-1].offset + 1, "", -1)})
        assert first.committed(tp) == 4
    finally:
        first.close()

    second = kp_consumer(kafka_bootstrap, topic, group_id=group, **GROUP_TIMEOUTS)
    try:
        rest = kp_poll(second, 6)
        assert [r.value for r in rest] == [f"m{i}".encode() for i in range(4, 10)]
        assert [r.key for r in rest] == [f"k{i}".encode() for i in range(4, 10)]
        second.commit()  # the consumed positions
    finally:
        second.close()

    probe = kp_consumer(kafka_bootstrap, group_id=group)
    try:
        assert probe.committed(tp) == 10
        assert probe.end_offsets([tp]) == {tp: 10}
    finally:
        probe.close()


@pytest.mark.timeout(240)
def test_broker_restart_keeps_data_and_offsets_while_clients_run(
    kafka_broker: ApacheKafkaBroker, topic_factory: TopicFactory
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = topic_factory("restart")
    tp = TopicPartition(topic, 0)
    group = f"vs-restart-{uuid.uuid4().hex[:8]}"

    producer = kp_producer(bootstrap, retries=1000, retry_backoff_ms=200, delivery_timeout_ms=90000)
    live = kp_consumer(bootstrap)  # keeps running across the restart
    try:
        for i in range(5):
            producer.send(topic, key=b"k", value=f"before-{i}".encode(), headers=[("n", str(i).encode())])
        producer.flush(timeout=30)
        live.assign([tp])
        live.seek_to_beginning()
        assert [r.value for r in kp_poll(live, 5)] == [f"before-{i}".encode() for i in range(5)]

        committer = kp_consumer(bootstrap, group_id=group)
        try:
            committer.commit({tp: OffsetAndMetadata(3, "", -1)})
        finally:
            committer.close()

        port, data_dir, pid = kafka_broker.port, kafka_broker.data_dir, kafka_broker.pid
        kafka_broker.restart()
        assert (kafka_broker.port, kafka_broker.data_dir) == (port, data_dir)
        assert kafka_broker.pid != pid

        for i in range(5):  # the same producer object, after the restart
            producer.send(topic, key=b"k", value=f"after-{i}".encode()).get(timeout=90)
        assert [r.value for r in kp_poll(live, 5, timeout=60)] == [f"after-{i}".encode() for i in range(5)]
    finally:
        producer.close(timeout=10)
        live.close()

    resumed = kp_consumer(bootstrap, topic, group_id=group, **GROUP_TIMEOUTS)
    try:
        assert resumed.committed(tp) == 3
        values = [r.value for r in kp_poll(resumed, 7)]
    finally:
        resumed.close()
    assert values == [b"before-3", b"before-4"] + [f"after-{i}".encode() for i in range(5)]

    everything = kp_consumer(bootstrap)
    try:
        everything.assign([tp])
        everything.seek_to_beginning()
        records = kp_poll(everything, 10)
    finally:
        everything.close()
    assert [r.offset for r in records] == list(range(10))
    assert records[4].headers == [("n", b"4")]


@pytest.mark.timeout(60)
def test_topics_are_not_auto_created_and_configs_apply(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    from kafka.admin import KafkaAdminClient

    topic = topic_factory("cfg", partitions=3, config={"retention.ms": 3_600_000})
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        (described,) = admin.describe_topics([topic])
        assert len(described["partitions"]) == 3
        assert f"nope-{uuid.uuid4().hex}" not in admin.list_topics()
    finally:
        admin.close()


# ---------------------------------------------------------------------------------------------- tansu


@pytest.fixture
def tansu() -> Iterator[TansuBroker]:
    with TansuBroker() as broker:
        yield broker


@pytest.mark.timeout(60)
def test_tansu_produce_consume(tansu: TansuBroker) -> None:
    assert tansu.last_start_seconds is not None
    assert tansu.last_start_seconds < 10
    topic = f"tansu-{uuid.uuid4().hex[:8]}"
    tansu.create_topics(topic, partitions=1)
    payload = os.urandom(FIVE_MB)
    kp_produce(tansu.bootstrap, topic, b"key", payload, HEADERS)
    record = kp_consume_one(tansu.bootstrap, topic)
    assert (record.key, record.headers, record.value == payload) == (b"key", HEADERS, True)


# ---------------------------------------------------------------------------------------------- command line


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return proc.stdout.readline().strip()


@pytest.mark.timeout(60)
def test_cli_start_prints_bootstrap_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.brokers", "start", "--kind", "tansu", "--data-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, 30)
        assert line.startswith("bootstrap=127.0.0.1:"), line
        bootstrap = line.removeprefix("bootstrap=")
        wait_for_broker(bootstrap, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        _, err = proc.communicate(timeout=5)
        assert "RuntimeWarning" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert (tmp_path / "tansu.log").is_file()


@pytest.mark.timeout(300)
def test_cli_fetch_prints_complete_libs_folder() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.brokers", "fetch"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    libs = Path(result.stdout.strip())
    assert libs == fetch_kafka()  # no download the second time
    assert (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage tool reads "-t -abc…" as a missing value; a draw whose base64 starts with "-" is redrawn."""
    from tests.support import brokers

    draws = iter([uuid.UUID(bytes=bytes([0xF8]) + bytes(15)), uuid.UUID(bytes=bytes([0x10]) + bytes(15))])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    cluster_id = brokers._random_cluster_id()
    assert not cluster_id.startswith("-")
    assert cluster_id.startswith("E")
