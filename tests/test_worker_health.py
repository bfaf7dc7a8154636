"""The worker's readiness, liveness, bounded shutdown and client log limiting, in-process on the fake Kafka
(tests/fake_kafka.py). The real-broker counterparts are in tests/integration/test_worker.py and test_cluster.py."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from kafka import TopicPartition
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

from veilstream.worker.client import ClientState
from veilstream.worker.health import HealthServer
from veilstream.worker.kafka_python import KafkaPythonClient
from veilstream.worker.lifecycle import Lifecycle
from veilstream.worker.logs import RepeatLimiter
from veilstream.worker.loop import EXIT_FAILED, Worker
from veilstream.worker.metrics import WorkerMetrics
from veilstream.worker.readiness import LoopView, Readiness, not_ready_reasons

from .fake_kafka import FakeKafka
from .test_worker_delivery import INPUT, OUTPUT, config, feed, metric, pipeline, run

STALL = 1.0
NOW = 1000.0
FINE = ClientState(joined=True, partitions=2, last_fetch=NOW - 0.1)


# -- the verdict --------------------------------------------------------------------------------------------


def test_ready_when_the_clients_are_fine_and_the_loop_is_not_stuck() -> None:
    assert not_ready_reasons(LoopView(polling_since=NOW - 60), FINE, True, STALL, NOW) == []
    busy = ClientState(joined=True, partitions=2, last_fetch=NOW - 60)
    assert not_ready_reasons(LoopView(), busy, True, STALL, NOW) == [], "a busy loop fetches nothing: no stall"
    idle = ClientState(joined=True, partitions=0, last_fetch=None)
    assert not_ready_reasons(LoopView(polling_since=NOW - 60), idle, False, STALL, NOW) == [], "nothing to fetch"


@pytest.mark.parametrize(
    ("view", "state", "expected"),
    [
        (LoopView(stopping=True), FINE, "stopping"),
        (LoopView(connect_error="NoBrokersAvailable"), None, "not connected: NoBrokersAvailable"),
        (LoopView(), None, "not connected yet"),
        (LoopView(), ClientState(joined=False, partitions=2, last_fetch=NOW), "not a member of the consumer group"),
        (LoopView(), ClientState(True, 2, ("in:1",), NOW), "no leader reachable for in:1"),
        (LoopView(polling_since=NOW - 1.5), ClientState(True, 2, (), NOW - 1.5), "no fetch response for 2 s"),
        (LoopView(polling_since=NOW - 1.5), ClientState(True, 2, (), None), "no fetch response for ever"),
        (LoopView(waiting_since=NOW - 3), FINE, "outputs unacknowledged for 3 s"),
        (LoopView(delivery_error="NotEnoughReplicas", delivery_failed_at=NOW - 1), FINE, "last delivery failed"),
        (LoopView(), ClientState(True, 2, (), NOW, None, ("cannot authenticate",)), "cannot authenticate"),
    ],
)
def test_each_reason_makes_the_worker_not_ready(view: LoopView, state: ClientState | None, expected: str) -> None:
    reasons = not_ready_reasons(view, state, True, STALL, NOW)
    assert any(reason.startswith(expected) for reason in reasons), reasons


def test_a_short_wait_or_a_short_poll_is_no_reason() -> None:
    view = LoopView(polling_since=NOW - 0.5, waiting_since=NOW - 0.5)
    assert not_ready_reasons(view, ClientState(True, 2, (), NOW - 5), True, STALL, NOW) == []


def test_a_failed_delivery_stops_counting_once_the_producer_acknowledges_again() -> None:
    failed = LoopView(delivery_error="4 of 4 outputs not acknowledged", delivery_failed_at=NOW - 2)
    before = ClientState(True, 2, (), NOW, NOW - 3)
    after = ClientState(True, 2, (), NOW, NOW - 1)
    assert not_ready_reasons(failed, before, True, STALL, NOW) == [
        "last delivery failed: 4 of 4 outputs not acknowledged"
    ]
    assert not_ready_reasons(failed, after, True, STALL, NOW) == []


# -- the worker: gauge, endpoint and log agree, and follow within a second --------------------------------------


@pytest.fixture
def running() -> Iterator[Callable[..., tuple[Worker, FakeKafka, threading.Thread]]]:
    started: list[tuple[Worker, threading.Thread]] = []

    def start(kafka: FakeKafka | None = None, **worker: Any) -> tuple[Worker, FakeKafka, threading.Thread]:
        kafka = kafka or FakeKafka(partitions=1)
        settings = {"readiness_stall_s": 0.5, "batch_timeout_ms": 20, **worker}
        exits: list[int] = []
        lifecycle = Lifecycle(settings.pop("shutdown_timeout_s", 30.0), exit=exits.append)
        instance = Worker(config(**settings), pipeline(), client=kafka, lifecycle=lifecycle)
        instance.exits = exits  # type: ignore[attr-defined]
        thread = threading.Thread(target=lambda: setattr(instance, "code", instance.run()), daemon=True)
        thread.start()
        started.append((instance, thread))
        return instance, kafka, thread

    yield start
    for instance, thread in started:
        instance.request_stop()
        thread.join(10)


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `condition` held (fails after `timeout`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - start


def _readyz(server: HealthServer) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_readiness_follows_the_clients_both_ways_and_the_gauge_and_endpoint_agree(
    running: Callable[..., tuple[Worker, FakeKafka, threading.Thread]],
) -> None:
    worker, kafka, _thread = running()
    server = HealthServer("127.0.0.1", 0, worker.metrics, worker.alive, worker.ready, worker.not_ready_reasons).start()
    try:
        _wait_for(worker.ready)
        assert _readyz(server) == (200, "ready\n") and metric(worker, "veilstream_ready") == 1

        kafka.client_state = ClientState(joined=False)  # the coordinator stops answering
        went = _wait_for(lambda: not worker.ready())
        status, body = _readyz(server)
        assert status == 503 and "not a member of the consumer group" in body
        assert metric(worker, "veilstream_ready") == 0

        kafka.client_state = ClientState(joined=True)
        came = _wait_for(worker.ready)
        assert _readyz(server)[0] == 200 and metric(worker, "veilstream_ready") == 1
        assert went < 1.5 and came < 1.5, (went, came)

        kafka.fetching = False  # polls get no fetch response any more
        _wait_for(lambda: not worker.ready())
        assert any(r.startswith("no fetch response") for r in worker.not_ready_reasons())
        kafka.fetching = True
        _wait_for(worker.ready)
        assert worker.alive()
    finally:
        server.stop()


def test_outputs_waiting_for_the_broker_make_the_worker_not_ready_until_acknowledged(
    running: Callable[..., tuple[Worker, FakeKafka, threading.Thread]],
) -> None:
    kafka = FakeKafka(partitions=1)
    release = threading.Event()
    kafka.hold = lambda: not release.is_set()  # type: ignore[attr-defined]
    feed(kafka, 0, 2)
    worker, kafka, _thread = running(kafka, delivery_timeout_ms=30_000)
    _wait_for(lambda: any(r.startswith("outputs unacknowledged") for r in worker.not_ready_reasons()))
    release.set()
    _wait_for(worker.ready)
    _wait_for(lambda: kafka.committed == {TopicPartition(INPUT, 0): 2})


# -- shutdown during an outage ---------------------------------------------------------------------------------


def test_sigterm_during_an_outage_exits_0_within_its_share_and_commits_nothing_unacknowledged(
    running: Callable[..., tuple[Worker, FakeKafka, threading.Thread]],
) -> None:
    kafka = FakeKafka(partitions=1)
    kafka.hold = lambda: True  # type: ignore[attr-defined]  # the broker never acknowledges
    feed(kafka, 0, 3)
    with structlog.testing.capture_logs() as logs:
        worker, kafka, thread = running(kafka, delivery_timeout_ms=60_000, shutdown_timeout_s=4.0)
        _wait_for(lambda: kafka.flushes > 0)
        stopped = time.monotonic()
        worker.request_stop()
        thread.join(10)
        took = time.monotonic() - stopped
    assert getattr(worker, "code", None) == 0
    # Below the 4 s watchdog with room for a loaded machine; the deliveries' half of the grace is the lower bound.
    assert 1.5 < took < 3.8, f"the deliveries get half of the 4 s grace, then the clients close: {took:.1f} s"
    assert worker.exits == [], "the watchdog is a last resort"  # type: ignore[attr-defined]
    assert kafka.committed == {} and kafka.topic(OUTPUT) == []
    (stop,) = [e for e in logs if e["event"] == "worker_stopped"]
    assert stop["exit_code"] == 0 and stop["reprocessed_on_restart"] == {f"{INPUT}:0": "0-2"}
    assert kafka.closed


def test_sigterm_when_idle_reports_nothing_to_reprocess(
    running: Callable[..., tuple[Worker, FakeKafka, threading.Thread]],
) -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2)
    with structlog.testing.capture_logs() as logs:
        worker, kafka, thread = running(kafka)
        _wait_for(lambda: kafka.committed == {TopicPartition(INPUT, 0): 2})
        worker.request_stop()
        thread.join(10)
    (stop,) = [e for e in logs if e["event"] == "worker_stopped"]
    assert stop["exit_code"] == 0 and stop["reprocessed_on_restart"] is None


def test_a_broker_unreachable_at_start_is_retried_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[float] = []

    def unreachable(*args: object) -> None:
        attempts.append(time.monotonic())
        raise KafkaTimeoutError("Bootstrap failed: no broker answered")

    monkeypatch.setattr(KafkaPythonClient, "connect", unreachable)
    lifecycle = Lifecycle(30.0, exit=lambda _code: None)
    worker = Worker(config(), pipeline(), lifecycle=lifecycle)
    thread = threading.Thread(target=lambda: setattr(worker, "code", worker.run()), daemon=True)
    thread.start()
    _wait_for(lambda: len(attempts) >= 2, timeout=5)
    worker.refresh_readiness()
    assert not worker.ready() and worker.not_ready_reasons()[0].startswith("not connected: KafkaTimeoutError")
    assert worker.alive(), "retrying is the loop turning: no restart"
    worker.request_stop()
    thread.join(5)
    assert getattr(worker, "code", None) == 0


def test_polls_that_raise_while_the_brokers_are_away_do_not_stop_the_worker() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 2)
    kafka.poll_errors = [KafkaConnectionError("111 ECONNREFUSED")] * 5
    with structlog.testing.capture_logs() as logs:
        worker = run(kafka, config(batch_timeout_ms=10), pipeline())
    assert kafka.committed == {TopicPartition(INPUT, 0): 2}
    events = [e["event"] for e in logs]
    assert events.count("polls_failing") == 1 and events.count("polls_recovered") == 1, events
    assert metric(worker, "veilstream_frames_out_total") == 2


def test_a_bug_in_the_loop_is_logged_with_a_failing_exit_code_and_raised() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 1)
    kafka.poll_errors = [ZeroDivisionError("a bug")]
    worker = Worker(config(), pipeline(), client=kafka, lifecycle=Lifecycle(30.0, exit=lambda _c: None))
    with structlog.testing.capture_logs() as logs, pytest.raises(ZeroDivisionError):
        worker.run()
    (stopped,) = [e for e in logs if e["event"] == "worker_stopped"]
    assert stopped["exit_code"] == EXIT_FAILED and kafka.closed


def test_readiness_logs_each_flip_and_at_most_one_reason_change_per_interval() -> None:
    now = [0.0]
    readiness = Readiness(WorkerMetrics().ready, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for second in range(60):
            now[0] = float(second)
            flapping = ["not a member of the consumer group"] + (["no fetch response for 3 s"] if second % 2 else [])
            readiness.update(flapping if second < 50 else [])
    events = [(e["event"], e.get("reasons")) for e in logs]
    assert events[0] == ("worker_not_ready", ["not a member of the consumer group"])
    assert [e for e, _ in events] == ["worker_not_ready", "worker_not_ready", "worker_ready"], events
    assert readiness.ready


# -- kafka-python's log lines ----------------------------------------------------------------------------------


def test_the_client_log_limiter_passes_each_template_once_per_interval_with_counts() -> None:
    now = [0.0]
    limiter = RepeatLimiter(interval_s=60, clock=lambda: now[0])
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    handler.addFilter(limiter)
    logger = logging.getLogger("kafka.coordinator.test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(20_000):
            now[0] = i * 0.003  # 20,000 lines in 60 s, as in a coordinator outage
            logger.warning("Marking the coordinator dead (node %s) for group %s: %s.", 1, "g", "down")
            if i % 1000 == 0:
                logger.error("Fetch to node %s failed: %s", 2, "refused")
        now[0] = 61.0
        logger.warning("Marking the coordinator dead (node %s) for group %s: %s.", 1, "g", "down")
        logging.getLogger("veilstream.other").addHandler(handler)
        logging.getLogger("veilstream.other").warning("not a client line: never held back")
    finally:
        logger.removeHandler(handler)
        logging.getLogger("veilstream.other").removeHandler(handler)
    assert len(seen) == 4, seen
    assert seen[0] == "Marking the coordinator dead (node 1) for group g: down."
    assert seen[2].endswith("[repeated 19999 more times in the last 60 s]")
    counts = limiter.take_counts()
    assert sum(counts.values()) == 19_999 + 19 and limiter.take_counts() == {}
