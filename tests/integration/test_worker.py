"""The Kafka worker end to end on a real Apache Kafka broker, run as a real subprocess."""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from confluent_kafka import Producer as ConfluentProducer
from kafka import KafkaConsumer, TopicPartition
from PIL import Image

from tests.support.brokers import ApacheKafkaBroker, TopicFactory
from veilstream.decoding.images import decode_frame
from veilstream.publishing.encoding import encode_frame

from .worker_harness import (
    MAX_BYTES,
    Topics,
    WorkerProcess,
    consume_all,
    frame_message,
    frame_records,
    headers_of,
    metrics_once,
    produce,
    running_worker,
    vtest_jpegs,
    wait_for_outputs,
    write_config,
)

TOPIC_CONFIG = {"max.message.bytes": str(MAX_BYTES)}


@pytest.fixture
def topics(topic_factory: TopicFactory) -> Topics:
    return Topics(
        input=topic_factory("in", partitions=2, config=TOPIC_CONFIG),
        output=topic_factory("out", partitions=2, config=TOPIC_CONFIG),
        metrics=topic_factory("metrics"),
        dlq=topic_factory("dlq", config=TOPIC_CONFIG),
    )


@pytest.fixture(scope="module")
def jpegs(media: Path) -> list[bytes]:
    return vtest_jpegs(media, 24)


def _sources(records: list[object]) -> set[tuple[int, int]]:
    return {(int(h["source-partition"]), int(h["source-offset"])) for h in (headers_of(r) for r in records)}


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_frames_flow_through_the_worker(
    client: str, kafka_bootstrap: str, topics: Topics, jpegs: list[bytes], tmp_path: Path
) -> None:
    messages = [frame_message(f"cam-{i % 2}", i // 2, data) for i, data in enumerate(jpegs[:10])]
    if client == "kafka-python":
        produce(kafka_bootstrap, topics.input, messages)
    else:
        producer = ConfluentProducer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": MAX_BYTES})
        for key, value, headers in messages:
            producer.produce(topics.input, key=key, value=value, headers=list(headers))  # type: ignore[arg-type]
        assert producer.flush(30) == 0
    config, port = write_config(tmp_path, kafka_bootstrap, topics)
    with running_worker(config, port, tmp_path / "worker.log") as worker:
        outputs = consume_all(kafka_bootstrap, topics.output, 10)
        records = frame_records(kafka_bootstrap, topics.metrics, 10)  # aggregates come in between
        assert worker.get("/healthz")[0] == 200
        status, exposition = worker.get("/metrics")
        assert status == 200
        assert "veilstream_frames_in_total" in exposition
        assert "veilstream_stage_seconds_bucket" in exposition
    assert len(outputs) == 10, worker.tail()
    per_camera: dict[str, list[int]] = {}
    for record in outputs:
        meta = headers_of(record)
        assert record.key == meta["camera-id"].encode()
        assert record.value[:3] == b"\xff\xd8\xff"
        assert meta["veilstream-schema"] == "1"
        assert meta["source-topic"] == topics.input
        assert {"original-decision", "final-decision", "consistent", "iterations", "faces", "plates"} <= set(meta)
        assert meta["outcome"] == "published"
        per_camera.setdefault(meta["camera-id"], []).append(int(meta["sequence"]))
    assert all(sequence == sorted(sequence) for sequence in per_camera.values()), per_camera
    assert sorted(len(v) for v in per_camera.values()) == [5, 5]
    assert len(records) >= 10
    assert {r["camera_id"] for r in records} == {"cam-0", "cam-1"}
    assert {(r["source_partition"], r["source_offset"]) for r in records} == _sources(outputs)
    assert all(r["outcome"] == "published" for r in records)
    assert consume_all(kafka_bootstrap, topics.dlq, 1, timeout=3) == []


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return buffer.getvalue()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_inputs_are_dead_lettered_and_the_worker_goes_on(
    kafka_bootstrap: str, topics: Topics, jpegs: list[bytes], tmp_path: Path
) -> None:
    good = jpegs[0]
    bad: dict[str, tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = {
        "empty": (b"cam", b"", [("camera-id", b"cam")]),
        "truncated": (b"cam", good[: len(good) // 2], [("camera-id", b"cam")]),
        "random": (b"cam", bytes(range(256)) * 40, [("camera-id", b"cam")]),
        "tiny": (b"cam", _png(1, 1), [("camera-id", b"cam")]),
        "bomb": (b"cam", _bomb(), [("camera-id", b"cam")]),
        "wrong_type": (b"cam", good, [("camera-id", b"cam"), ("content-type", b"text/plain")]),
        "mismatch": (b"cam", good, [("camera-id", b"cam"), ("content-type", b"image/png")]),
        "no_camera": (None, good, []),
        "oversized": (b"cam", b"\xff\xd8\xff" + b"\x00" * (17 * 1024 * 1024), [("camera-id", b"cam")]),
    }
    expected_reasons = {
        "empty": {"empty"},
        "truncated": {"truncated", "corrupt_data", "corrupt_header"},
        "random": {"unknown_format"},
        "tiny": {"too_small"},
        "bomb": {"too_large", "decompression_bomb"},
        "wrong_type": {"bad_header"},
        "mismatch": {"content_type_mismatch"},
        "no_camera": {"missing_header"},
        "oversized": {"too_large"},
    }
    messages: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [frame_message("cam", 0, good)]
    for key, value, headers in bad.values():
        messages.append((key, value, [*headers, ("test-case", b"x")]))
    messages.append(frame_message("cam", 1, jpegs[1]))
    # One partition keeps the order, so "the worker goes on" is visible: the last good frame comes out.
    single = Topics(topics.input + "-single", topics.output, topics.metrics, topics.dlq)
    from tests.support.brokers import create_topics

    create_topics(kafka_bootstrap, [single.input], partitions=1, config=TOPIC_CONFIG)
    labelled = (
        [messages[0]]
        + [
            (key, value, [*headers[:-1], ("test-case", name.encode())])
            for name, (key, value, headers) in zip(bad, messages[1:-1], strict=True)
        ]
        + [messages[-1]]
    )
    produce(kafka_bootstrap, single.input, labelled)
    config, port = write_config(tmp_path, kafka_bootstrap, single)
    with running_worker(config, port, tmp_path / "worker.log") as worker:
        dead = consume_all(kafka_bootstrap, single.dlq, len(bad))
        outputs = consume_all(kafka_bootstrap, single.output, 2)
        records = frame_records(kafka_bootstrap, single.metrics, len(labelled))
        assert worker.process.poll() is None, "the worker must keep running"
    reasons = {headers_of(r)["original-test-case"]: headers_of(r)["dlq-reason"] for r in dead}
    assert set(reasons) == set(bad), worker.tail()
    for name, reason in reasons.items():
        assert reason in expected_reasons[name], (name, reason)
    for record in dead:
        meta = headers_of(record)
        case = meta["original-test-case"]
        original = bad[case][1] or b""
        assert record.value == original, f"{case}: the dead letter must carry the original bytes"
        assert meta["source-topic"] == single.input
    assert len(outputs) == 2
    assert _sources(outputs) == {(0, 0), (0, len(labelled) - 1)}, "only the two good frames are published"
    # Every input has one frame record: a dead letter's says dropped, with the dead letter's reason.
    by_offset = {r["source_offset"]: r for r in records}
    assert sorted(by_offset) == list(range(len(labelled))), worker.tail()
    for record in dead:
        meta = headers_of(record)
        frame = by_offset[int(meta["source-offset"])]
        assert (frame["outcome"], frame["reason"]) == ("dropped", meta["dlq-reason"])


def _all_published(bootstrap: str, topic: str, inputs: int, timeout: float) -> list[Any]:
    """The output topic once it holds an output for each of the `inputs` (duplicates come before the last)."""
    deadline = time.monotonic() + timeout
    while True:
        outputs = consume_all(bootstrap, topic, 10_000, timeout=3)
        if len(_sources(outputs)) >= inputs or time.monotonic() > deadline:
            return outputs


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
    finally:
        consumer.close()


def test_kill_9_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap: str, topics: Topics, jpegs: list[bytes], tmp_path: Path
) -> None:
    produce(kafka_bootstrap, topics.input, [frame_message(f"cam-{i % 2}", i // 2, d) for i, d in enumerate(jpegs)])
    config, port = write_config(tmp_path, kafka_bootstrap, topics)
    worker = WorkerProcess(config, port, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        wait_for_outputs(worker, kafka_bootstrap, topics.output, 6)
        worker.signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        worker.kill()
    published_before = len(consume_all(kafka_bootstrap, topics.output, len(jpegs), timeout=3))
    assert 0 < published_before < len(jpegs), "the kill should land mid-stream"
    with running_worker(config, port, tmp_path / "worker2.log"):
        outputs = _all_published(kafka_bootstrap, topics.output, len(jpegs), timeout=90)
    sources = _sources(outputs)
    assert len(sources) == len(jpegs), f"every input frame must be published; got {len(sources)} of {len(jpegs)}"
    assert len(outputs) - len(sources) <= 4, "duplicates are bounded by one batch (batch_size 4)"


def test_sigterm_mid_batch_commits_cleanly(
    kafka_bootstrap: str, topics: Topics, jpegs: list[bytes], tmp_path: Path
) -> None:
    produce(kafka_bootstrap, topics.input, [frame_message(f"cam-{i % 2}", i // 2, d) for i, d in enumerate(jpegs)])
    config, port = write_config(tmp_path, kafka_bootstrap, topics)
    worker = WorkerProcess(config, port, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        wait_for_outputs(worker, kafka_bootstrap, topics.output, 4)
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.tail()
        assert time.monotonic() - started < 25, "shutdown must stay within its bound"
    finally:
        worker.kill()
    outputs = consume_all(kafka_bootstrap, topics.output, len(jpegs), timeout=3)
    committed = _committed(kafka_bootstrap, f"veilstream-{topics.input}", topics.input, 2)
    published: dict[int, set[int]] = {0: set(), 1: set()}
    for partition, offset in _sources(outputs):
        published[partition].add(offset)
    for partition in (0, 1):
        # Committed exactly up to what was published: nothing published is left uncommitted, nothing skipped.
        expected = max(published[partition]) + 1 if published[partition] else 0
        assert committed[partition] == expected, (partition, committed, published)
        assert published[partition] == set(range(expected))
    assert "worker_stopped" in worker.log.read_text()


def test_broker_restart_while_the_worker_runs(
    kafka_broker: ApacheKafkaBroker, kafka_bootstrap: str, topics: Topics, jpegs: list[bytes], tmp_path: Path
) -> None:
    first, second = jpegs[:6], jpegs[6:12]
    produce(kafka_bootstrap, topics.input, [frame_message("cam", i, d) for i, d in enumerate(first)])
    config, port = write_config(tmp_path, kafka_bootstrap, topics)
    with running_worker(config, port, tmp_path / "worker.log") as worker:
        assert len(consume_all(kafka_bootstrap, topics.output, 6)) == 6
        kafka_broker.restart()
        produce(kafka_bootstrap, topics.input, [frame_message("cam", 6 + i, d) for i, d in enumerate(second)])
        outputs = consume_all(kafka_bootstrap, topics.output, 12, timeout=120)
        assert worker.process.poll() is None, worker.tail()
    assert len(_sources(outputs)) == 12, worker.tail()


OUTPUT_LIMIT = 12_000
DLQ_LIMIT = 50_000


def _resized(jpeg: bytes, width: int) -> bytes:
    rgb = decode_frame(jpeg)
    small = cv2.resize(rgb, (width, width * rgb.shape[0] // rgb.shape[1]), interpolation=cv2.INTER_AREA)
    return encode_frame(np.ascontiguousarray(small), "jpeg", 90)


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_outputs_the_broker_refuses_for_good_are_dead_lettered_and_the_partition_goes_on(
    guarantee: str, kafka_bootstrap: str, topic_factory: TopicFactory, jpegs: list[bytes], tmp_path: Path
) -> None:
    """Defect 4: an output larger than the output topic's max.message.bytes used to be retried forever.

    Exactly-once: the refusal aborts the batch's transaction, and kafka-python's transactional producer fails the
    rest of it with the same error and then the next transaction too (OutOfOrderSequenceNumber): the sink must
    find the refused output, start a fresh producer, and commit the batch without it."""
    topics = Topics(
        input=topic_factory("in", config=TOPIC_CONFIG),
        output=topic_factory("out", config={"max.message.bytes": str(OUTPUT_LIMIT)}),
        metrics=topic_factory("metrics"),
        dlq=topic_factory("dlq", config={"max.message.bytes": str(DLQ_LIMIT)}),
    )
    small, medium, large = _resized(jpegs[0], 64), _resized(jpegs[1], 320), jpegs[2]
    assert len(small) < OUTPUT_LIMIT // 2 and OUTPUT_LIMIT * 1.5 < len(medium) < DLQ_LIMIT // 2, "test inputs"
    assert len(large) > DLQ_LIMIT * 1.5, "the large frame is too large for the dead-letter topic too"
    cases = {"small-first": small, "medium": medium, "large": large, "small-last": small}
    messages = []
    for sequence, (case, data) in enumerate(cases.items()):
        key, value, headers = frame_message("cam", sequence, data)
        messages.append((key, value, [*headers, ("test-case", case.encode())]))
    produce(kafka_bootstrap, topics.input, messages)
    config, port = write_config(tmp_path, kafka_bootstrap, topics, processing_guarantee=guarantee)
    with running_worker(config, port, tmp_path / "worker.log") as worker:
        dead = consume_all(kafka_bootstrap, topics.dlq, 2)
        outputs = consume_all(kafka_bootstrap, topics.output, 2)
        records = frame_records(kafka_bootstrap, topics.metrics, len(cases))
        counted = f'veilstream_frames_in_total{{topic="{topics.input}"}} 4.0'
        exposition = metrics_once(worker, lambda text: counted in text)
        assert worker.process.poll() is None, worker.tail()
    assert _sources(outputs) == {(0, 0), (0, 3)}, "the frames after the refused ones are published: no stall"
    letters = {headers_of(r)["original-test-case"]: r for r in dead}
    assert set(letters) == {"medium", "large"}, worker.tail()
    for letter in letters.values():
        meta = headers_of(letter)
        assert meta["dlq-reason"] == "output_refused"
        assert "MessageSizeTooLargeError" in meta["dlq-detail"]
        assert meta["original-camera-id"] == "cam"
    assert letters["medium"].value == medium, "the dead letter carries the original input"
    assert letters["large"].value == b"", "too large for the dead-letter topic: sent without its value"
    assert "value left out" in headers_of(letters["large"])["dlq-detail"]
    by_offset = {r["source_offset"]: r for r in records}
    assert [by_offset[o]["outcome"] for o in range(4)] == ["published", "dropped", "dropped", "published"]
    assert {by_offset[1]["reason"], by_offset[2]["reason"]} == {"output_refused"}
    assert 'veilstream_dead_letters_total{reason="output_refused"} 2.0' in exposition
    assert "veilstream_batch_retries_total 0.0" in exposition, "a refusal for good is not retried"
    assert _committed(kafka_bootstrap, f"veilstream-{topics.input}", topics.input, 1) == {0: 4}
    if guarantee == "exactly-once":
        # Read committed, every input is there once; the aborted attempts are in the log, and hidden.
        assert len(outputs) == 2 and len(dead) == 2 and len(records) == len(cases)
        everything = _read_uncommitted(kafka_bootstrap, topics.output)
        assert len(everything) > len(outputs), "the aborted transactions' outputs are in the log"


def _read_uncommitted(bootstrap: str, topic: str) -> list[Any]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000
    )
    consumer.assign([TopicPartition(topic, 0)])
    try:
        return list(consumer)  # read_uncommitted: aborted records too (transaction markers are not records)
    finally:
        consumer.close()


def _wait_status(worker: WorkerProcess, path: str, status: int, timeout: float) -> float:
    """Seconds until GET `path` answers `status` (fails after `timeout`)."""
    start = time.monotonic()
    while True:
        try:
            if worker.get(path)[0] == status:
                return time.monotonic() - start
        except OSError:
            pass
        assert time.monotonic() - start < timeout, f"{path} not {status} after {timeout}s:\n{worker.tail()}"
        time.sleep(0.1)


def _lines(log: Path) -> int:
    return log.read_bytes().count(b"\n")


OUTAGE_S = 15.0
READINESS_FOLLOWS_S = 5.0


def test_readiness_follows_a_broker_outage_and_sigterm_during_one_exits_0_in_the_grace(
    kafka_broker: ApacheKafkaBroker, topics: Topics, jpegs: list[bytes], tmp_path: Path
) -> None:
    """The issue's operator scenarios on one broker: /readyz (and the gauge) turn within 5 s of the outage
    starting and ending, kafka-python's reconnect loop does not flood the log, and SIGTERM in an outage exits 0
    within the grace, saying what will be reprocessed; a restarted worker then publishes every frame."""
    bootstrap = kafka_broker.bootstrap
    produce(bootstrap, topics.input, [frame_message(f"cam-{i % 2}", i // 2, d) for i, d in enumerate(jpegs)])
    shutdown_s = 20.0
    config, port = write_config(tmp_path, bootstrap, topics, shutdown_timeout_s=shutdown_s, delivery_timeout_ms=60_000)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(config, port, log)
    try:
        worker.wait_ready()
        wait_for_outputs(worker, bootstrap, topics.output, 4)

        lines_before = _lines(log)
        kafka_broker.kill()
        went = _wait_status(worker, "/readyz", 503, 30)
        assert "veilstream_ready 0.0" in worker.get("/metrics")[1], "the gauge agrees with /readyz"
        deadline = time.monotonic() + OUTAGE_S - went
        while time.monotonic() < deadline:
            assert worker.get("/healthz")[0] == 200, "an outage is no reason to restart the worker"
            assert worker.get("/readyz")[0] == 503
            time.sleep(0.5)
        outage_lines = _lines(log) - lines_before

        kafka_broker.start()
        came = _wait_status(worker, "/readyz", 200, 60)
        assert "veilstream_ready 1.0" in worker.get("/metrics")[1]
        print(
            f"readiness: not ready {went:.1f} s after the kill, ready {came:.1f} s after the broker was back; "
            f"{outage_lines} log lines in the {OUTAGE_S:.0f} s outage"
        )
        transitions = [line for line in log.read_text().splitlines() if "worker_ready" in line or "not_ready" in line]
        assert went < READINESS_FOLLOWS_S and came < READINESS_FOLLOWS_S, (went, came, transitions)
        assert outage_lines < 40, worker.tail(60)

        # A second outage with batches in flight: they cannot be acknowledged, and SIGTERM comes.
        published = len(consume_all(bootstrap, topics.output, 10_000, timeout=3))
        more = [frame_message(f"cam-{i % 2}", 100 + i // 2, d) for i, d in enumerate(jpegs[:8])]
        produce(bootstrap, topics.input, more)
        wait_for_outputs(worker, bootstrap, topics.output, published + 1)
        kafka_broker.kill()
        _wait_status(worker, "/readyz", 503, 30)
        time.sleep(3)
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = worker.wait(shutdown_s + 10)
        took = time.monotonic() - signalled
    finally:
        worker.kill()
        if not kafka_broker.is_running:
            kafka_broker.start()
    text = log.read_text()
    print(f"SIGTERM during the outage: exit {code} after {took:.1f} s")
    assert code == 0, worker.tail(40)
    assert took < shutdown_s, "within the grace, without the watchdog"
    assert "shutdown_timeout_exceeded" not in text
    (stopped,) = [json.loads(line) for line in text.splitlines() if '"worker_stopped"' in line]
    assert stopped["exit_code"] == 0
    reprocess = stopped["reprocessed_on_restart"]
    assert reprocess, "a batch was in flight: the line says which offsets a restart reads again"
    committed = _committed(bootstrap, f"veilstream-{topics.input}", topics.input, 2)
    for name, offsets in reprocess.items():
        partition = int(name.rpartition(":")[2])
        assert int(offsets.split("-")[0]) == committed[partition], (reprocess, committed)

    with running_worker(config, port, tmp_path / "worker2.log"):
        outputs = _all_published(bootstrap, topics.output, len(jpegs) + len(more), timeout=120)
    assert len(_sources(outputs)) == len(jpegs) + len(more), "nothing lost"
