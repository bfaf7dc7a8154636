"""The worker on a real 3-node Apache Kafka cluster (KRaft, replication factor 3, min.insync.replicas 2): a leader
broker killed with -9, workers scaled up and down, exactly-once through worker and broker kills, and the group
coordinator lost with the controller quorum. Marked slow: a cluster starts in ~15-25 s on 2 cores.

Lean by design: small frames, correction off and one face detector, so that a worker keeps up and each scenario
lasts seconds. Every frame carries (camera, sequence); a scenario passes when every input is accounted for (an
output or a dead letter), each camera's first outputs come in sequence order, and (exactly-once, read committed)
no input comes out twice. Each scenario prints its figures (readiness times, duplicates, log lines).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from kafka import KafkaProducer

from tests.support.brokers import KafkaCluster, free_port
from veilstream.publishing.encoding import encode_frame

from .worker_harness import MAX_BYTES, WorkerProcess, consume_all, headers_of

pytestmark = pytest.mark.slow

CAMERAS = 6
PARTITIONS = 4
TAIL_ROUNDS = 2  # rounds of every camera a feed produces after `fed` is called
MAX_ROUNDS = 200  # a feed never told to end stops here: 5 minutes of frames at 4 fps
TOPIC_CONFIG = {"max.message.bytes": str(MAX_BYTES)}
OUTAGE_S = float(os.environ.get("VEILSTREAM_OUTAGE_S", "20"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    with KafkaCluster(3, min_insync=2) as running:
        yield running


@pytest.fixture(autouse=True)
def _all_nodes_up(cluster: KafkaCluster) -> None:
    """A scenario that failed midway may leave nodes down: the next one starts from a whole cluster."""
    cluster.start()


@pytest.fixture(scope="module")
def frames(media: Path) -> list[bytes]:
    """Small JPEGs of real street frames (vtest.avi at 320x240)."""
    capture = cv2.VideoCapture(str(media / "vtest.avi"))
    out: list[bytes] = []
    while len(out) < 12:
        ok, bgr = capture.read()
        assert ok
        small = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (320, 240), interpolation=cv2.INTER_AREA)
        out.append(encode_frame(np.ascontiguousarray(small), "jpeg", 85))
        for _ in range(20):
            capture.read()
    capture.release()
    return out


class Scenario:
    """Topics of one scenario, its workers, and a camera stream fed from a background thread."""

    def __init__(self, cluster: KafkaCluster, name: str, folder: Path, **worker: Any) -> None:
        self.cluster = cluster
        stem = f"{name}-{time.monotonic_ns() % 10**8}"
        self.input, self.output, self.metrics, self.dlq = (f"{stem}-{t}" for t in ("in", "out", "metrics", "dlq"))
        cluster.create_topics([self.input, self.output], PARTITIONS, TOPIC_CONFIG)
        cluster.create_topics([self.metrics, self.dlq], 1, TOPIC_CONFIG)
        self.group = f"{stem}-group"
        self.folder = folder
        self.worker_settings = worker
        self.workers: list[WorkerProcess] = []
        self.sent: list[tuple[str, int]] = []
        self._feeder: threading.Thread | None = None
        self._enough = threading.Event()

    def config(self, worker_id: str) -> tuple[Path, int]:
        port = free_port()
        settings = {
            "input_topics": [self.input],
            "output_topic": self.output,
            "metrics_topic": self.metrics,
            "dlq_topic": self.dlq,
            "group_id": self.group,
            "worker_id": worker_id,
            "batch_timeout_ms": 200,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "delivery_timeout_ms": 30_000,
            "retry_backoff_s": 0.5,
            "aggregate_interval_s": 5.0,
            "http_host": "127.0.0.1",
            "http_port": port,
            **self.worker_settings,
        }
        config = {
            "device": "cpu",
            "kafka": {"bootstrap_servers": self.cluster.bootstrap},
            "correction": {"enabled": False, "time_budget_ms": 3000},
            "pipeline": {"batch_size": 4, "residual_check": "off"},
            "detectors": {"backends": [{"type": "centerface", "threads": 1}]},
            "worker": settings,
        }
        path = self.folder / f"{worker_id}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path, port

    def launch_worker(self, worker_id: str) -> WorkerProcess:
        """Start a worker process (it loads its models, then joins the group: ~10-20 s here)."""
        path, port = self.config(worker_id)
        worker = WorkerProcess(path, port, self.folder / f"{worker_id}-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def start_worker(self, worker_id: str) -> WorkerProcess:
        worker = self.launch_worker(worker_id)
        worker.wait_ready(180)
        return worker

    def feed(self, frames: list[bytes], per_camera: int, fps: float, until_fed: bool = False) -> None:
        """Produce `per_camera` frames of each camera, round robin, at `fps` in all (in the background). With
        `until_fed`, go on until `fed` is called and then `TAIL_ROUNDS` more, so that a change the test makes
        before `fed` always comes mid-stream however slow the machine (a fixed length raced model loading)."""

        def run() -> None:
            producer = KafkaProducer(bootstrap_servers=self.cluster.bootstrap, acks="all", max_request_size=MAX_BYTES)
            try:
                sequence, tail = 0, TAIL_ROUNDS
                while sequence < per_camera or (until_fed and tail > 0 and sequence < MAX_ROUNDS):
                    if until_fed and self._enough.is_set() and sequence >= per_camera:
                        tail -= 1
                    for camera in range(CAMERAS):
                        name = f"cam-{camera}"
                        headers = [("camera-id", name.encode()), ("sequence", str(sequence).encode())]
                        data = frames[(sequence + camera) % len(frames)]
                        producer.send(self.input, key=name.encode(), value=data, headers=headers)
                        self.sent.append((name, sequence))
                        time.sleep(1 / fps)
                    sequence += 1
                producer.flush(60)
            finally:
                producer.close(10)

        self._feeder = threading.Thread(target=run, name="camera-feed", daemon=True)
        self._feeder.start()

    def fed(self, timeout: float = 120) -> None:
        assert self._feeder is not None
        self._enough.set()
        self._feeder.join(timeout)
        assert not self._feeder.is_alive(), "the camera feed did not finish"

    def outputs(self) -> list[Any]:
        return consume_all(self.cluster.bootstrap, self.output, 100_000, timeout=4)

    def wait_outputs(self, count: int | None = None, timeout: float = 180) -> list[Any]:
        """The output and dead-letter records (read committed) once `count` distinct inputs (default: all that
        were sent) came out."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.outputs() + consume_all(self.cluster.bootstrap, self.dlq, 100_000, timeout=2)
            wanted = len(self.sent) if count is None else count
            if len({_frame_of(r) for r in done}) >= wanted or time.monotonic() > deadline:
                return done
            for worker in self.workers:
                assert worker.process.poll() is None or worker.process.returncode in (0, -9), worker.tail()

    def stop(self) -> None:
        self._enough.set()
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.signal(signal.SIGTERM)
        for worker in self.workers:
            with suppress(subprocess.TimeoutExpired):
                worker.wait(30)
            worker.kill()


def _frame_of(record: Any) -> tuple[str, int]:
    meta = headers_of(record)
    camera = meta.get("camera-id") or meta.get("original-camera-id") or ""
    sequence = meta.get("sequence") or meta.get("original-sequence") or "-1"
    return camera, int(sequence)


def check(scenario: Scenario, records: list[Any]) -> dict[str, int]:
    """0 lost and order kept per camera; returns the counts (duplicates are reported, not judged here)."""
    seen = [_frame_of(r) for r in records]
    lost = set(scenario.sent) - set(seen)
    assert not lost, f"{len(lost)} of {len(scenario.sent)} frames lost, e.g. {sorted(lost)[:5]}"
    outputs = [_frame_of(r) for r in records if "dlq-reason" not in headers_of(r)]
    for camera in {c for c, _ in outputs}:
        firsts = list(dict.fromkeys(s for c, s in outputs if c == camera))
        assert firsts == sorted(firsts), f"{camera}'s frames came out of order: {firsts}"
    counts = Counter(seen)
    return {"inputs": len(scenario.sent), "duplicates": sum(n - 1 for n in counts.values())}


class ReadinessWatch:
    """Polls a worker's /readyz five times a second and keeps each change: [(time.monotonic(), status)]."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.changes: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                status = self.worker.get("/readyz")[0]
            except OSError:
                continue
            if not self.changes or self.changes[-1][1] != status:
                self.changes.append((time.monotonic(), status))

    def first(self, status: int, after: float) -> float | None:
        """Seconds from `after` to the first change to `status` after it."""
        return next((t - after for t, s in self.changes if s == status and t >= after), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _leader_now(cluster: KafkaCluster, topic: str) -> int:
    """The leader of partition 0, or -1 while the cluster cannot tell (a node was just killed)."""
    try:
        return cluster.leader(topic, 0)
    except Exception:  # kafka-python's errors while its connection to the killed node fails
        return -1


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def test_kill_9_of_the_leader_broker_mid_stream_loses_nothing(
    cluster: KafkaCluster, frames: list[bytes], tmp_path: Path
) -> None:
    scenario = Scenario(cluster, "leader-kill", tmp_path)
    try:
        worker = scenario.start_worker("w1")
        watch = ReadinessWatch(worker)
        scenario.feed(frames, per_camera=10, fps=4)
        scenario.wait_outputs(12)
        leader = cluster.leader(scenario.input, 0)
        killed = time.monotonic()
        cluster.kill(leader)
        while _leader_now(cluster, scenario.input) in (leader, -1):
            assert time.monotonic() < killed + 60, "no new leader 60 s after the kill"
            time.sleep(0.2)
        elected = time.monotonic()
        scenario.fed()
        records = scenario.wait_outputs()
        cluster.start_nodes(leader)
        watch.stop()
    finally:
        scenario.stop()
    figures = check(scenario, records)
    went, came = watch.first(503, killed), watch.first(200, elected)
    print(
        f"leader {leader} killed: {figures}; /readyz 503 after {went} s; a new leader after "
        f"{elected - killed:.1f} s, and /readyz 200 {came} s after that"
    )


def test_two_workers_scaled_up_and_down_mid_stream_lose_nothing_and_keep_each_cameras_order(
    cluster: KafkaCluster, frames: list[bytes], tmp_path: Path
) -> None:
    scenario = Scenario(cluster, "scale", tmp_path)
    try:
        first = scenario.start_worker("w1")
        scenario.feed(frames, per_camera=20, fps=4, until_fed=True)  # 30 s of frames, or more until fed()
        second = scenario.launch_worker("w2")  # scale up: it joins mid-stream once its models are loaded
        second.wait_ready(180)
        joined = len(scenario.sent)
        time.sleep(4)
        first.signal(signal.SIGTERM)  # scale down: its partitions move to the second worker
        assert first.wait(30) == 0, first.tail()
        left = len(scenario.sent)
        scenario.fed()
        records = scenario.wait_outputs()
        assert second.process.poll() is None, second.tail()
        assert joined < left < len(scenario.sent), ("both changes must come mid-stream", joined, left)
    finally:
        scenario.stop()
    figures = check(scenario, records)
    print(f"scale up and down: {figures}")


def test_exactly_once_through_a_worker_and_a_broker_kill_9_shows_every_frame_once(
    cluster: KafkaCluster, frames: list[bytes], tmp_path: Path
) -> None:
    scenario = Scenario(cluster, "eos", tmp_path, processing_guarantee="exactly-once", transaction_timeout_ms=30_000)
    try:
        scenario.start_worker("eos-1")
        scenario.feed(frames, per_camera=16, fps=3, until_fed=True)  # 32 s of frames, or more until fed()
        scenario.wait_outputs(8)
        leader = cluster.leader(scenario.output, 0)
        cluster.kill(leader)  # a broker: the transactions in flight abort or wait for the new leaders
        scenario.wait_outputs(len({_frame_of(r) for r in scenario.outputs()}) + 6)
        scenario.workers[0].signal(signal.SIGKILL)  # and the worker, mid-transaction most likely
        scenario.workers[0].wait(10)
        out_at_kill = len({_frame_of(r) for r in scenario.outputs()})
        scenario.start_worker("eos-1")  # the same identity: it fences the old transactions and aborts them
        cluster.start_nodes(leader)
        scenario.fed()
        records = scenario.wait_outputs()
        assert out_at_kill < len(scenario.sent), "the worker must be killed with work left"
        metrics = consume_all(cluster.bootstrap, scenario.metrics, 100_000, timeout=4)
    finally:
        scenario.stop()
    figures = check(scenario, records)
    print(f"exactly-once, broker {leader} and the worker killed: {figures}")
    assert figures["duplicates"] == 0, "read committed, every frame comes out exactly once"
    frame_records = [json.loads(r.value) for r in metrics if json.loads(r.value)["type"] == "frame"]
    keys = Counter((r["source_partition"], r["source_offset"]) for r in frame_records)
    assert len(keys) == len(scenario.sent) and max(keys.values()) == 1, "one record per input, once"


def test_losing_the_coordinator_with_the_quorum_is_followed_by_readiness_and_logs_little(
    cluster: KafkaCluster, frames: list[bytes], tmp_path: Path
) -> None:
    """Two of three nodes killed, the group coordinator among them: nothing can be fetched, delivered or
    committed. /readyz turns 503 within 5 s, each worker logs few lines however long the outage, SIGTERM during
    it exits 0 within the grace, and once the nodes are back readiness returns and nothing is lost."""
    scenario = Scenario(cluster, "quorum", tmp_path, shutdown_timeout_s=20)
    try:
        leaving, staying = scenario.start_worker("w1"), scenario.start_worker("w2")
        watches = [ReadinessWatch(leaving), ReadinessWatch(staying)]
        scenario.feed(frames, per_camera=6, fps=6)
        scenario.fed()
        scenario.wait_outputs(12)
        coordinator = cluster.coordinator(scenario.group)
        other = next(n for n in cluster.running() if n != coordinator)
        lines = [_lines(w.log) for w in (leaving, staying)]
        lost_at = time.monotonic()
        cluster.kill(coordinator, other)
        time.sleep(max(0.0, OUTAGE_S - 8))
        signalled = time.monotonic()
        leaving.signal(signal.SIGTERM)
        code = leaving.wait(30)
        took = time.monotonic() - signalled
        time.sleep(max(0.0, lost_at + OUTAGE_S - time.monotonic()))
        outage_lines = [_lines(w.log) - before for w, before in zip((leaving, staying), lines, strict=True)]
        restarting = time.monotonic()
        cluster.start_nodes(coordinator, other)
        back = time.monotonic() - restarting  # until both nodes answer; the quorum may be back sooner
        records = scenario.wait_outputs()
        deadline = time.monotonic() + 60
        while watches[1].first(200, restarting) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        for watch in watches:
            watch.stop()
    finally:
        scenario.stop()
    went = [watch.first(503, lost_at) for watch in watches]
    came = watches[1].first(200, restarting)
    print(
        f"quorum and coordinator lost for {OUTAGE_S:.0f} s: /readyz 503 after {went} s; the two nodes restarted "
        f"and answered within {back:.1f} s, /readyz 200 again {came} s after the restart began; log lines during "
        f"the outage per worker {outage_lines}; SIGTERM in the outage: exit {code} after {took:.1f} s"
    )
    assert code == 0 and took < 20, leaving.tail()
    assert all(w is not None and w < 5 for w in went), went
    assert came is not None and came < back + 5, (came, back)
    assert max(outage_lines) < 100, staying.tail(80)
    check(scenario, records)
