"""Runs `veilstream worker` as a real subprocess against the test broker, and reads its outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from kafka import KafkaConsumer, KafkaProducer

from tests.support.brokers import free_port
from veilstream.publishing.encoding import encode_frame

MAX_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    metrics: str
    dlq: str


def vtest_jpegs(media: Path, count: int, step: int = 7) -> list[bytes]:
    capture = cv2.VideoCapture(str(media / "vtest.avi"))
    frames: list[bytes] = []
    index = 0
    while len(frames) < count:
        ok, bgr = capture.read()
        assert ok, "vtest.avi ran out of frames"
        if index % step == 0:
            frames.append(encode_frame(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), "jpeg", 90))
        index += 1
    capture.release()
    return frames


def produce(
    bootstrap: str, topic: str, messages: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]
) -> None:
    """Send (key, value, headers) in order and wait for every acknowledgement."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=MAX_BYTES, acks="all")
    try:
        for key, value, headers in messages:
            producer.send(topic, key=key, value=value, headers=headers).get(timeout=30)
    finally:
        producer.close()


def frame_message(
    camera: str, sequence: int, data: bytes, content_type: str = "image/jpeg"
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    headers = [
        ("camera-id", camera.encode()),
        ("sequence", str(sequence).encode()),
        ("content-type", content_type.encode()),
    ]
    return camera.encode(), data, headers


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 120.0) -> list[Any]:
    """Read a topic from the beginning until `expected` records or the timeout."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",  # as every consumer of the worker's outputs should (exactly-once)
        fetch_max_bytes=2 * MAX_BYTES,
        max_partition_fetch_bytes=MAX_BYTES,
        consumer_timeout_ms=1000,
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def wait_for_outputs(worker: WorkerProcess, bootstrap: str, topic: str, count: int, timeout: float = 120.0) -> None:
    """Block until `topic` holds at least `count` records while the worker keeps running, or fail."""
    deadline = time.monotonic() + timeout
    while len(consume_all(bootstrap, topic, count, timeout=2)) < count:
        assert worker.process.poll() is None, f"the worker exited:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"fewer than {count} outputs after {timeout}s:\n{worker.tail()}"


def metrics_once(worker: WorkerProcess, done: Callable[[str], bool], timeout: float = 60.0) -> str:
    """The worker's /metrics exposition once `done(exposition)` holds (it counts a batch after its outputs and
    records are acknowledged, a moment after they can be consumed), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        status, exposition = worker.get("/metrics")
        if status == 200 and done(exposition):
            return exposition
        assert time.monotonic() < deadline, f"/metrics not as expected after {timeout}s:\n{exposition}"
        time.sleep(0.2)


def headers_of(record: Any) -> dict[str, str]:
    return {name: value.decode() for name, value in record.headers}


def write_config(folder: Path, bootstrap: str, topics: Topics, **worker: Any) -> tuple[Path, int]:
    port = free_port()
    config = {
        "kafka": {"bootstrap_servers": bootstrap},
        "worker": {
            "input_topics": [topics.input],
            "output_topic": topics.output,
            "metrics_topic": topics.metrics,
            "dlq_topic": topics.dlq,
            "group_id": f"veilstream-{topics.input}",
            "batch_timeout_ms": 200,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "lag_interval_s": 1.0,
            "aggregate_interval_s": 2.0,
            "delivery_timeout_ms": 20000,
            "retry_backoff_s": 1.0,
            "http_host": "127.0.0.1",
            "http_port": port,
            **worker,
        },
        "correction": {"time_budget_ms": 3000},
        "pipeline": {"batch_size": 4, "residual_check": "off"},
    }
    path = folder / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


class WorkerProcess:
    def __init__(
        self,
        config: Path,
        port: int,
        log: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.log = log
        environment = {
            **os.environ,
            "YOLO_OFFLINE": "1",
            "YOLO_AUTOINSTALL": "0",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.handle = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "veilstream.commands.cli", "--config", str(config), "worker", *args],
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            env=environment,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.handle.close()


@contextmanager
def running_worker(
    config: Path, port: int, log: Path, args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(config, port, log, args, env)
    try:
        worker.wait_ready()
        yield worker
    finally:
        if worker.process.poll() is None:
            worker.signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                worker.wait(30)
        worker.kill()


def frame_records(bootstrap: str, topic: str, count: int, timeout: float = 120.0) -> list[dict[str, Any]]:
    """The type=frame records of the metrics topic, once there are `count` (aggregates come in between)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(r.value) for r in consume_all(bootstrap, topic, 10_000, timeout=3)]
        frames = [r for r in records if r["type"] == "frame"]
        if len(frames) >= count or time.monotonic() > deadline:
            return frames
