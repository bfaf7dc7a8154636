"""Every delivery path of the worker (at-least-once and exactly-once), in-process: the real Worker, Runner,
Pipeline and KafkaSink on an in-memory Kafka (tests/fake_kafka.py) that refuses sends, fails commits and
transactions, and revokes partitions on demand.

The models are stand-ins (a scripted region finder, a solid mask, a tiny classifier); the real-broker tests are
tests/integration/test_worker.py.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.errors import (
    CommitFailedError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
    ProducerFencedError,
    TopicAuthorizationFailedError,
)

from veilstream.anonymizers.filters import SolidMask
from veilstream.anonymizers.regions import Region
from veilstream.config import VeilstreamConfig
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.decoding.images import Frame, decode_frame
from veilstream.detectors.base import Detection
from veilstream.detectors.finders import FoundRegions
from veilstream.pipeline import FailurePolicy, OnFailure, Pipeline
from veilstream.publishing.encoding import Encoder, encode_frame
from veilstream.worker.client import TransactionInDoubt
from veilstream.worker.lifecycle import SHUTDOWN_OVERRUN_EXIT, Lifecycle
from veilstream.worker.loop import EXIT_FENCED, EXIT_TRANSACTION_IN_DOUBT, BatchReport, Worker

from .conftest import noise_frames, tiny_classifier
from .fake_kafka import FakeKafka, Record, Rule, Send

INPUT, OUTPUT, METRICS, DLQ = "in", "out", "metrics", "dlq"
BOX = Detection(8, 8, 40, 40, 0.9, "face")


class ScriptedFinder:
    """One face per frame; a frame whose top-left pixel is 0 makes the detector crash (a pipeline failure)."""

    def find(self, frames: Sequence[Frame]) -> list[FoundRegions]:
        if any(int(f[0, 0, 0]) == 0 for f in frames):
            raise RuntimeError("detector crashed")
        return [FoundRegions((Region(BOX.x1, BOX.y1, BOX.x2, BOX.y2),), (BOX,)) for _ in frames]


def pipeline(on_failure: OnFailure = "drop", correct: bool = False) -> Pipeline:
    encoder = Encoder("jpeg", 90)
    corrector = None
    if correct:
        settings = CorrectionSettings(max_change=96, time_budget_ms=None, max_iterations=5)
        corrector = AdaptiveCorrector(Ensemble([tiny_classifier()]), settings, encoder=encoder)
    return Pipeline(ScriptedFinder(), SolidMask(value=0), encoder, corrector, FailurePolicy(on_failure, "off"))


def config(on_failure: OnFailure = "drop", **worker: Any) -> VeilstreamConfig:
    return VeilstreamConfig.model_validate(
        {
            "correction": {"enabled": False},
            "pipeline": {"batch_size": 4, "on_failure": on_failure, "residual_check": "off"},
            "worker": {
                "input_topics": [INPUT],
                "output_topic": OUTPUT,
                "metrics_topic": METRICS,
                "dlq_topic": DLQ,
                "retry_backoff_s": 0,
                "delivery_attempts": 3,
                "aggregate_interval_s": 3600,
                "worker_id": "test-worker",
                **worker,
            },
        }
    )


def png(poisoned: bool = False, seed: int = 0) -> bytes:
    frame = noise_frames(1, seed=seed)[0]
    frame[0, 0] = 0 if poisoned else 200  # PNG is lossless: the finder sees exactly this pixel
    return encode_frame(frame, "png")


def feed(kafka: FakeKafka, partition: int, count: int, poisoned: Sequence[int] = ()) -> list[Record]:
    """`count` frames of camera cam-<partition>; the sequence numbers in `poisoned` crash the detector."""
    camera = f"cam-{partition}".encode()
    records = []
    for sequence in range(count):
        headers = [
            ("camera-id", camera),
            ("sequence", str(sequence).encode()),
            ("content-type", b"image/png"),
            ("test-case", f"p{partition}-s{sequence}".encode()),
        ]
        value = png(sequence in poisoned, seed=sequence)
        records.append(kafka.produce_input(partition, camera, value, headers))
    return records


def run(kafka: FakeKafka, cfg: VeilstreamConfig, pipe: Pipeline, max_polls: int = 60) -> Worker:
    """Run the worker until the input is drained (or `max_polls`: a worker stuck retrying stops there)."""
    exits: list[int] = []
    lifecycle = Lifecycle(30.0, exit=exits.append)
    worker = Worker(cfg, pipe, client=kafka, lifecycle=lifecycle)

    def idle() -> None:
        # With overlap the worker polls the next batch while it still holds one: an empty poll means the input
        # is drained only once no batch is held.
        if not worker.holds_batch_ahead():
            lifecycle.request_stop()

    kafka.on_idle = idle
    kafka.poll_limit = max_polls
    assert worker.run() == 0
    assert exits == [], "the worker must stop without the watchdog"
    assert kafka.closed
    return worker


def metric(worker: Worker, name: str, **labels: str) -> float:
    value = worker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def sources(records: Sequence[Record]) -> list[tuple[int, int]]:
    return [(int(r.header("source-partition") or -1), int(r.header("source-offset") or -1)) for r in records]


def frame_records(kafka: FakeKafka) -> list[dict[str, Any]]:
    return [r for r in (json.loads(m.value or b"") for m in kafka.topic(METRICS)) if r["type"] == "frame"]


def aggregates(kafka: FakeKafka) -> list[dict[str, Any]]:
    return [r for r in (json.loads(m.value or b"") for m in kafka.topic(METRICS)) if r["type"] == "aggregate"]


def refuse(topic: str, error: BaseException, case: str | None = None, flushes: int | None = None) -> Rule:
    """A rule: sends to `topic` meet `error`, only those for the input `case` (`p<partition>-s<sequence>`) if
    given, and only before flush number `flushes` if given."""

    def rule(send: Send) -> BaseException | None:
        if send.topic != topic or (flushes is not None and send.flush >= flushes):
            return None
        return error if case is None or case == case_of(send) else None

    return rule


def case_of(send: Send) -> str:
    """The input a send is for: dead letters carry its headers; outputs and records its lineage."""
    meta = dict(send.headers)
    if "original-test-case" in meta:
        return meta["original-test-case"].decode()
    if "source-partition" in meta:
        return f"p{meta['source-partition'].decode()}-s{meta['source-offset'].decode()}"
    record = json.loads(send.value)
    return f"p{record.get('source_partition')}-s{record.get('source_offset')}"


# -- the normal path -------------------------------------------------------------------------------------


def test_frames_are_published_then_recorded_then_committed() -> None:
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 3)
    feed(kafka, 1, 3)
    reports: list[BatchReport] = []
    cfg = config()
    worker = Worker(cfg, pipeline(correct=True), client=kafka, lifecycle=Lifecycle(30.0, exit=lambda _c: None))
    worker.observer = reports.append
    kafka.on_idle = worker.request_stop
    assert worker.run() == 0

    outputs = kafka.topic(OUTPUT)
    assert sorted(sources(outputs)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for output in outputs:
        assert output.value is not None and output.value[:3] == b"\xff\xd8\xff"
        assert output.header("outcome") == "published"
        assert output.header("camera-id") == f"cam-{output.header('source-partition')}"
        assert output.key == (output.header("camera-id") or "").encode()
        assert output.header("original-decision") and output.header("final-decision")
        assert output.header("faces") == "1"
    assert kafka.topic(DLQ) == []
    records = frame_records(kafka)
    assert sorted((r["source_partition"], r["source_offset"]) for r in records) == sorted(sources(outputs))
    assert all(r["outcome"] == "published" and r["corrected"] and r["worker"] == "test-worker" for r in records)
    # A frame's record goes out only once the frame is acknowledged: in a later flush.
    output_flush = {case_of(s): s.flush for s in kafka.sent if s.topic == OUTPUT}
    record_sends = [s for s in kafka.sent if s.topic == METRICS and json.loads(s.value)["type"] == "frame"]
    assert len(record_sends) == 6
    assert all(s.flush > output_flush[case_of(s)] for s in record_sends)
    assert kafka.committed == {TopicPartition(INPUT, 0): 3, TopicPartition(INPUT, 1): 3}
    assert metric(worker, "veilstream_frames_in_total", topic=INPUT) == 6
    assert metric(worker, "veilstream_frames_out_total") == 6
    assert metric(worker, "veilstream_correction_iterations_count") == 6
    assert metric(worker, "veilstream_stage_seconds_count", stage="decode") == 6
    assert metric(worker, "veilstream_frame_latency_seconds_count") == 6
    assert [r.records for r in reports] == [4, 2] and all(r.delivered for r in reports)
    assert all(r.started <= r.decoded <= r.processed <= r.flushed <= r.committed for r in reports)
    (aggregate,) = aggregates(kafka)
    assert (aggregate["frames"], aggregate["published"], aggregate["worker"]) == (6, 6, "test-worker")


# -- defect 1: mask_frame --------------------------------------------------------------------------------


def test_mask_frame_publishes_a_failed_frame_fully_masked() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 3, poisoned=[1])
    worker = run(kafka, config("mask_frame"), pipeline("mask_frame"))

    outputs = {offset: r for (_p, offset), r in zip(sources(kafka.topic(OUTPUT)), kafka.topic(OUTPUT), strict=True)}
    assert sorted(outputs) == [0, 1, 2], "the failed frame is published masked, not dead-lettered"
    masked = outputs[1]
    assert (masked.header("outcome"), masked.header("reason"), masked.header("flagged")) == (
        "masked",
        "detect_failed",
        "true",
    )
    assert masked.value is not None
    pixels = decode_frame(masked.value)
    assert np.abs(pixels.astype(int) - 128).max() <= 2, "a masked frame is fully grey"
    assert outputs[0].header("outcome") == "published"
    assert kafka.topic(DLQ) == []
    record = next(r for r in frame_records(kafka) if r["source_offset"] == 1)
    assert (record["outcome"], record["reason"], record["flagged"]) == ("masked", "detect_failed", True)
    assert metric(worker, "veilstream_frames_out_total") == 3
    assert metric(worker, "veilstream_dead_letters_total", reason="detect_failed") == 0


# -- defect 2: dead letters keep the original headers ------------------------------------------------------


def test_dead_letters_of_pipeline_and_decode_failures_keep_the_original_value_and_headers() -> None:
    kafka = FakeKafka(partitions=1)
    inputs = feed(kafka, 0, 3, poisoned=[1])
    bad = kafka.produce_input(0, b"cam-0", b"not an image", [("camera-id", b"cam-0"), ("test-case", b"garbage")])
    worker = run(kafka, config(), pipeline())

    assert sorted(sources(kafka.topic(OUTPUT))) == [(0, 0), (0, 2)]
    dead = {r.header("original-test-case"): r for r in kafka.topic(DLQ)}
    assert set(dead) == {"p0-s1", "garbage"}
    failed = dead["p0-s1"]
    assert failed.value == inputs[1].value, "the dead letter carries the original bytes"
    assert failed.key == b"cam-0"
    assert (failed.header("dlq-reason"), failed.header("source-offset"), failed.header("camera-id")) == (
        "detect_failed",
        "1",
        "cam-0",
    )
    assert "detector crashed" in (failed.header("dlq-detail") or "")
    for name, value in inputs[1].headers:
        assert failed.header(f"original-{name}") == (value or b"").decode(), name
    assert dead["garbage"].value == bad.value
    assert dead["garbage"].header("dlq-reason") == "unknown_format"
    assert dead["garbage"].header("original-camera-id") == "cam-0"
    records = {r["source_offset"]: r for r in frame_records(kafka)}
    assert len(records) == 4, "every input has exactly one record, a dropped one too"
    assert (records[1]["outcome"], records[1]["reason"]) == ("dropped", "detect_failed")
    assert (records[3]["outcome"], records[3]["reason"]) == ("dropped", "unknown_format")
    assert metric(worker, "veilstream_dead_letters_total", reason="detect_failed") == 1
    assert metric(worker, "veilstream_dead_letters_total", reason="unknown_format") == 1
    assert kafka.committed == {TopicPartition(INPUT, 0): 4}


# -- defect 3: counted once, after delivery ----------------------------------------------------------------


def test_a_rewound_batch_is_counted_once() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 4)
    kafka.rules.append(refuse(OUTPUT, NotEnoughReplicasError("in sync replicas"), case="p0-s1", flushes=1))
    worker = run(kafka, config(), pipeline())

    assert metric(worker, "veilstream_batch_retries_total") == 1
    assert len(kafka.topic(OUTPUT)) == 3 + 4, "three frames of the failed attempt were acknowledged (duplicates)"
    assert sorted(set(sources(kafka.topic(OUTPUT)))) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert metric(worker, "veilstream_frames_in_total", topic=INPUT) == 4
    assert metric(worker, "veilstream_frames_out_total") == 4
    assert metric(worker, "veilstream_stage_seconds_count", stage="detect") == 4
    assert metric(worker, "veilstream_frame_latency_seconds_count") == 4
    assert len(frame_records(kafka)) == 4, "records are sent once the outputs are acknowledged"
    (aggregate,) = aggregates(kafka)
    assert (aggregate["frames"], aggregate["published"]) == (4, 4)
    assert kafka.committed == {TopicPartition(INPUT, 0): 4}


# -- defect 4: refused for good, or failing too often --------------------------------------------------------


def test_an_output_refused_for_good_is_dead_lettered_and_the_batch_commits() -> None:
    kafka = FakeKafka(partitions=1)
    inputs = feed(kafka, 0, 4)
    too_large = MessageSizeTooLargeError("larger than max.message.bytes")
    kafka.rules.append(refuse(OUTPUT, too_large, case="p0-s2"))
    worker = run(kafka, config(), pipeline())

    assert metric(worker, "veilstream_batch_retries_total") == 0, "a refusal for good is not retried"
    assert kafka.committed == {TopicPartition(INPUT, 0): 4}
    assert sorted(sources(kafka.topic(OUTPUT))) == [(0, 0), (0, 1), (0, 3)]
    (dead,) = kafka.topic(DLQ)
    assert dead.header("dlq-reason") == "output_refused"
    assert "MessageSizeTooLargeError" in (dead.header("dlq-detail") or "")
    assert dead.value == inputs[2].value, "the dead letter holds the original input, never the raw frame elsewhere"
    assert dead.header("original-test-case") == "p0-s2"
    record = next(r for r in frame_records(kafka) if r["source_offset"] == 2)
    assert (record["outcome"], record["reason"], record["published_bytes"]) == ("dropped", "output_refused", None)
    assert metric(worker, "veilstream_frames_out_total") == 3
    assert metric(worker, "veilstream_dead_letters_total", reason="output_refused") == 1


def test_a_refused_output_whose_original_is_too_large_for_the_dead_letters_goes_without_its_value() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2)
    too_large = MessageSizeTooLargeError("larger than max.message.bytes")
    kafka.rules.append(refuse(OUTPUT, too_large, case="p0-s1"))
    kafka.rules.append(lambda send: too_large if send.topic == DLQ and send.value else None)
    worker = run(kafka, config(), pipeline())

    (dead,) = kafka.topic(DLQ)
    assert dead.value == b""
    assert (dead.header("dlq-reason"), dead.header("original-test-case")) == ("output_refused", "p0-s1")
    detail = dead.header("dlq-detail") or ""
    assert "value left out" in detail and "MessageSizeTooLargeError" in detail
    assert kafka.committed == {TopicPartition(INPUT, 0): 2}
    assert metric(worker, "veilstream_batch_retries_total") == 0


def test_an_output_failing_retriably_is_dead_lettered_after_delivery_attempts() -> None:
    kafka = FakeKafka(partitions=1)
    inputs = feed(kafka, 0, 3)
    kafka.rules.append(refuse(OUTPUT, KafkaTimeoutError("no leader"), case="p0-s0"))
    worker = run(kafka, config(delivery_attempts=3), pipeline())

    assert metric(worker, "veilstream_batch_retries_total") == 2, "two rewinds, then the third attempt dead-letters"
    (dead,) = kafka.topic(DLQ)
    assert dead.header("dlq-reason") == "delivery_failed"
    assert "3 attempts" in (dead.header("dlq-detail") or "")
    assert dead.value == inputs[0].value
    assert sorted(set(sources(kafka.topic(OUTPUT)))) == [(0, 1), (0, 2)]
    assert kafka.committed == {TopicPartition(INPUT, 0): 3}
    assert len(frame_records(kafka)) == 3
    assert metric(worker, "veilstream_frames_out_total") == 2
    assert metric(worker, "veilstream_dead_letters_total", reason="delivery_failed") == 1


@pytest.mark.parametrize(
    "error", [KafkaTimeoutError("broker down"), TopicAuthorizationFailedError("not authorized")], ids=str
)
def test_dead_letters_that_cannot_be_delivered_keep_the_batch_retrying(error: BaseException) -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2, poisoned=[0])
    kafka.rules.append(refuse(DLQ, error, flushes=8))  # the dead-letter topic recovers after 8 flushes
    worker = run(kafka, config(delivery_attempts=2), pipeline(), max_polls=40)

    assert metric(worker, "veilstream_batch_retries_total") >= 3, "more retries than delivery_attempts"
    (dead,) = kafka.topic(DLQ)
    assert dead.header("dlq-reason") == "detect_failed" and dead.value, "delivered in the end, with its value"
    assert sources(kafka.topic(OUTPUT)).count((0, 0)) == 0, "a failed frame is never published"
    assert kafka.committed == {TopicPartition(INPUT, 0): 2}
    assert metric(worker, "veilstream_dead_letters_total", reason="detect_failed") == 1


def test_nothing_is_committed_while_the_dead_letters_fail() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2, poisoned=[1])
    kafka.rules.append(refuse(DLQ, KafkaTimeoutError("broker down")))
    worker = run(kafka, config(), pipeline(), max_polls=10)

    assert kafka.committed == {}
    assert kafka.topic(DLQ) == []
    assert metric(worker, "veilstream_frames_out_total") == 0, "nothing of an undelivered batch is counted"
    assert aggregates(kafka) == []


# -- commits, rewinds and revokes -----------------------------------------------------------------------------


def test_a_failed_commit_is_logged_and_the_worker_goes_on() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 12)
    kafka.commit_errors = [CommitFailedError("rebalanced"), KafkaTimeoutError("coordinator unreachable")]
    worker = run(kafka, config(), pipeline())

    assert sources(kafka.topic(OUTPUT)) == [(0, i) for i in range(12)], "no rewind: the outputs were delivered"
    assert kafka.committed == {TopicPartition(INPUT, 0): 12}, "the next commit covers the offsets"
    assert metric(worker, "veilstream_frames_out_total") == 12
    assert metric(worker, "veilstream_batch_retries_total") == 0


def test_a_failed_delivery_rewinds_to_the_first_offsets_of_the_batch() -> None:
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 3)
    feed(kafka, 1, 3)
    kafka.rules.append(refuse(OUTPUT, NotEnoughReplicasError("in sync replicas"), case="p1-s0", flushes=1))
    worker = run(kafka, config(), pipeline())

    # The first batch was partition 0's three frames and partition 1's first.
    assert kafka.seeks == [(TopicPartition(INPUT, 0), 0), (TopicPartition(INPUT, 1), 0)]
    assert sorted(set(sources(kafka.topic(OUTPUT)))) == [(p, o) for p in (0, 1) for o in range(3)]
    assert kafka.committed == {TopicPartition(INPUT, 0): 3, TopicPartition(INPUT, 1): 3}
    assert metric(worker, "veilstream_frames_out_total") == 6


def test_a_partition_revoked_mid_batch_is_left_to_its_new_owner() -> None:
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 3)
    feed(kafka, 1, 3)
    kafka.rules.append(refuse(OUTPUT, KafkaTimeoutError("no leader"), flushes=1))

    def revoke_during_the_first_flush(fake: FakeKafka) -> None:
        if fake.flushes == 0:
            fake.revoke([TopicPartition(INPUT, 1)])

    kafka.on_flush = revoke_during_the_first_flush
    worker = run(kafka, config(lag_interval_s=0.001), pipeline())

    assert kafka.seeks == [(TopicPartition(INPUT, 0), 0)], "only partitions still ours are rewound"
    assert sorted(set(sources(kafka.topic(OUTPUT)))) == [(0, 0), (0, 1), (0, 2)]
    assert kafka.committed == {TopicPartition(INPUT, 0): 3}
    assert metric(worker, "veilstream_consumer_lag", topic=INPUT, partition="0") == 0
    assert (
        worker.metrics.registry.get_sample_value("veilstream_consumer_lag", {"topic": INPUT, "partition": "1"}) is None
    ), "a revoked partition's lag is another worker's to report"


def test_a_revoke_during_a_delivered_batch_fails_its_commit_only() -> None:
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 2)
    feed(kafka, 1, 2)

    def revoke_during_the_first_flush(fake: FakeKafka) -> None:
        if fake.flushes == 0:
            fake.revoke([TopicPartition(INPUT, 1)])

    kafka.on_flush = revoke_during_the_first_flush
    worker = run(kafka, config(), pipeline())

    assert sorted(sources(kafka.topic(OUTPUT))) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert kafka.committed == {}, "the group moved on: the new owner reprocesses the batch (at-least-once)"
    assert metric(worker, "veilstream_frames_out_total") == 4
    assert metric(worker, "veilstream_batch_retries_total") == 0


# -- lifecycle -------------------------------------------------------------------------------------------------


def test_the_shutdown_watchdog_exits_through_the_injected_function() -> None:
    exited = threading.Event()
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)
        exited.set()

    lifecycle = Lifecycle(0.05, exit=exit_)
    lifecycle.request_stop()
    assert exited.wait(5)
    assert codes == [SHUTDOWN_OVERRUN_EXIT]

    # 5 s, not 0.05: a thread switch of 50 ms between request_stop and finished would fire a 0.05 s watchdog.
    stopped = Lifecycle(5.0, exit=exit_)
    stopped.request_stop()
    stopped.finished()  # the loop ended in time: the watchdog is disarmed, so its thread ends now
    watchdog = stopped._watchdog
    assert watchdog is not None
    watchdog.join(2)
    assert not watchdog.is_alive()
    late = Lifecycle(0.05, exit=exit_)
    late.finished()
    late.request_stop()  # after the loop ended (a host process stopping a worker): no watchdog at all
    assert late._watchdog is None
    time.sleep(0.3)
    assert codes == [SHUTDOWN_OVERRUN_EXIT]


def test_a_second_signal_exits_at_once() -> None:
    codes: list[int] = []
    lifecycle = Lifecycle(30.0, exit=codes.append)
    lifecycle.on_signal(signal.SIGTERM)
    assert lifecycle.stopping and codes == []
    lifecycle.on_signal(signal.SIGINT)
    assert codes == [128 + signal.SIGINT]
    lifecycle.finished()


# -- exactly-once: one transaction per batch -------------------------------------------------------------------


CLOSING_AGGREGATE = ["begin", "commit"]  # the aggregate of the delivered frames, sent when the worker stops


def exactly_once(**worker: Any) -> VeilstreamConfig:
    return config(processing_guarantee="exactly-once", **worker)


def test_exactly_once_commits_outputs_records_and_offsets_in_one_transaction_per_batch() -> None:
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 3)
    feed(kafka, 1, 3)
    kafka.commit_errors = [AssertionError("exactly-once commits offsets in the transaction only")]
    worker = run(kafka, exactly_once(aggregate_interval_s=0.001), pipeline())

    assert kafka.transactions == ["begin", "commit"] * 3, "two batches, then the last aggregate"
    assert sorted(sources(kafka.topic(OUTPUT))) == [(p, o) for p in (0, 1) for o in range(3)]
    assert len(frame_records(kafka)) == 6 and kafka.aborted == []
    assert {s.transaction for s in kafka.sent} == {1, 2, 3}, "nothing is sent outside a transaction"
    assert kafka.committed == {TopicPartition(INPUT, 0): 3, TopicPartition(INPUT, 1): 3}
    assert sum(a["frames"] for a in aggregates(kafka)) == 6
    assert metric(worker, "veilstream_frames_out_total") == 6


def test_exactly_once_a_retriable_failure_aborts_and_the_retry_publishes_each_frame_once() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 4)
    kafka.rules.append(refuse(OUTPUT, NotEnoughReplicasError("in sync replicas"), case="p0-s1", flushes=1))
    worker = run(kafka, exactly_once(), pipeline())

    assert kafka.transactions == ["begin", "abort", "begin", "commit", *CLOSING_AGGREGATE]
    assert sources(kafka.topic(OUTPUT)) == [(0, 0), (0, 1), (0, 2), (0, 3)], "no duplicate is ever visible"
    assert len(kafka.aborted) == 3 + 4, "what the first attempt got acknowledged: three outputs, the four records"
    assert kafka.seeks == [(TopicPartition(INPUT, 0), 0)]
    assert len(frame_records(kafka)) == 4
    assert metric(worker, "veilstream_batch_retries_total") == 1
    assert metric(worker, "veilstream_frames_out_total") == 4
    assert kafka.committed == {TopicPartition(INPUT, 0): 4}


def test_exactly_once_finds_the_refused_output_among_the_failed_ones_and_dead_letters_it() -> None:
    """After one refusal the fake, like kafka-python, fails the whole transaction with that same error: the sink
    must probe each suspect alone (aborting each probe) to find which one the broker refuses."""
    kafka = FakeKafka(partitions=1)
    inputs = feed(kafka, 0, 4)
    too_large = MessageSizeTooLargeError("larger than max.message.bytes")
    kafka.rules.append(refuse(OUTPUT, too_large, case="p0-s2"))
    worker = run(kafka, exactly_once(), pipeline())

    probes = 6  # the refused output and the five messages after it failed with its error: each is sent alone
    assert (
        kafka.transactions == ["begin", "abort"] + ["begin", "abort"] * probes + ["begin", "commit"] + CLOSING_AGGREGATE
    )
    assert sources(kafka.topic(OUTPUT)) == [(0, 0), (0, 1), (0, 3)]
    (dead,) = kafka.topic(DLQ)
    assert (dead.header("dlq-reason"), dead.header("original-test-case")) == ("output_refused", "p0-s2")
    assert dead.value == inputs[2].value
    record = next(r for r in frame_records(kafka) if r["source_offset"] == 2)
    assert (record["outcome"], record["reason"]) == ("dropped", "output_refused")
    assert len(frame_records(kafka)) == 4, "each record once: the aborted attempts left none behind"
    assert metric(worker, "veilstream_batch_retries_total") == 0
    assert kafka.committed == {TopicPartition(INPUT, 0): 4}


def test_exactly_once_a_single_refused_message_needs_no_probe() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2)
    kafka.rules.append(refuse(METRICS, MessageSizeTooLargeError("too large"), case="p0-s1"))  # the last message
    worker = run(kafka, exactly_once(), pipeline())

    assert kafka.transactions == ["begin", "abort", "begin", "commit", *CLOSING_AGGREGATE]
    assert sources(kafka.topic(OUTPUT)) == [(0, 0), (0, 1)]
    assert [r["source_offset"] for r in frame_records(kafka)] == [0], "the refused record is left out"
    assert metric(worker, "veilstream_batch_retries_total") == 0
    assert kafka.committed == {TopicPartition(INPUT, 0): 2}


def test_exactly_once_a_failed_offset_commit_aborts_and_nothing_is_visible() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2)
    kafka.transaction_errors = [CommitFailedError("fenced: the group moved to a new generation")]
    worker = run(kafka, exactly_once(), pipeline())

    assert kafka.transactions == ["begin", "abort", "begin", "commit", *CLOSING_AGGREGATE]
    assert sources(kafka.topic(OUTPUT)) == [(0, 0), (0, 1)], "the aborted attempt left nothing visible"
    assert len(kafka.aborted) == 4
    assert metric(worker, "veilstream_batch_retries_total") == 1
    assert kafka.committed == {TopicPartition(INPUT, 0): 2}


def test_exactly_once_a_commit_in_doubt_restarts_the_worker_without_rewinding() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2)
    kafka.transaction_errors = [TransactionInDoubt("the commit was not confirmed within 20 s")]
    worker = Worker(exactly_once(), pipeline(), client=kafka, lifecycle=Lifecycle(30.0, exit=lambda _c: None))

    assert worker.run() == EXIT_TRANSACTION_IN_DOUBT
    assert kafka.seeks == [] and kafka.committed == {}, "the broker's outcome decides, not a rewind"
    assert metric(worker, "veilstream_frames_out_total") == 0
    assert kafka.closed


def test_exactly_once_a_fenced_producer_stops_the_worker() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2)

    def fenced(timeout_s: float) -> None:
        raise ProducerFencedError("another producer with the same transactional.id")

    kafka.begin_transaction = fenced  # type: ignore[method-assign]
    worker = Worker(exactly_once(), pipeline(), client=kafka, lifecycle=Lifecycle(30.0, exit=lambda _c: None))

    assert worker.run() == EXIT_FENCED
    assert kafka.topic(OUTPUT) == [] and kafka.committed == {}
