"""The worker, replay and monitor against Apache Kafka with SASL_SSL (SCRAM-SHA-512, a CA made in the test).

Every command reads the configuration's `kafka` section (security_protocol SASL_SSL, sasl_mechanism, sasl_username,
ssl_cafile) and the password from VEILSTREAM__KAFKA__SASL_PASSWORD; the file never holds it. The broker's other
listener (PLAINTEXT, tests.support.secure_kafka) is the test's own: topics, SCRAM users, reading outputs.

A wrong password or a certificate the worker does not trust must leave a worker that says why (a log record of
its own naming the cause), stays up and alive, reports not ready (endpoint and gauge), keeps its log short, and
becomes ready once the cause is gone -- not a process that exits and is restarted over and over.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka.admin import UserScramCredentialUpsertion

from tests.support.brokers import TopicFactory
from tests.support.secure_kafka import (
    SCRAM_MECHANISM,
    CertificateAuthority,
    SecureKafkaBroker,
    kafka_section,
    make_ca,
)

from .worker_harness import Topics, WorkerProcess, consume_all, running_worker, write_config

USER = "veilstream"
PASSWORD = "correct horse battery staple"
ROTATED_USER = "rotated"  # its broker-side password changes during a test
PASSWORD_ENV = "VEILSTREAM__KAFKA__SASL_PASSWORD"
FRAMES = 6
OBSERVE_S = 70.0  # two of kafka-python's 30 s bootstrap attempts (a loaded machine may time out the first)


@pytest.fixture(scope="module")
def trusted_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """The CA that signs the broker's certificate (clients get its certificate as ssl_cafile)."""
    return make_ca(tmp_path_factory.mktemp("tls"), "trusted")


@pytest.fixture(scope="module")
def broker(trusted_ca: CertificateAuthority) -> Iterator[SecureKafkaBroker]:
    with SecureKafkaBroker(trusted_ca, {USER: PASSWORD, ROTATED_USER: "the old password"}) as running:
        yield running


@pytest.fixture
def topics(broker: SecureKafkaBroker, request: pytest.FixtureRequest) -> Iterator[Topics]:
    factory = TopicFactory(broker.bootstrap, prefix=request.node.name)
    yield Topics(factory("in"), factory("out"), factory("metrics"), factory("dlq"))
    factory.cleanup()


def secure_config(
    folder: Path, broker: SecureKafkaBroker, topics: Topics, cafile: Path, user: str = USER
) -> tuple[Path, int]:
    """write_config's worker settings with the SASL_SSL `kafka` section; no classifier (correction off)."""
    path, port = write_config(folder, broker.secure_bootstrap, topics)
    config = yaml.safe_load(path.read_text())
    config["kafka"] = kafka_section(broker, user, cafile)
    config |= {"device": "cpu", "correction": {"enabled": False}}
    path.write_text(yaml.safe_dump(config))
    return path, port


def cli(config: Path, password: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, PASSWORD_ENV: password, "YOLO_OFFLINE": "1"}
    command = [sys.executable, "-m", "veilstream.commands.cli", "--config", str(config), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_worker_replay_and_monitor_over_sasl_ssl(
    broker: SecureKafkaBroker, topics: Topics, trusted_ca: CertificateAuthority, media: Path, tmp_path: Path
) -> None:
    config, port = secure_config(tmp_path, broker, topics, trusted_ca.cert_path)
    assert PASSWORD not in config.read_text()
    replay = ["replay", str(media / "vtest.avi"), "--topic", topics.input, "--camera", "cam-0", "--rate", "max"]
    with running_worker(config, port, tmp_path / "worker.log", env={PASSWORD_ENV: PASSWORD}) as worker:
        replayed = cli(config, PASSWORD, *replay, "--limit", str(FRAMES), "--no-progress")
        assert replayed.returncode == 0, replayed.stderr
        outputs = consume_all(broker.bootstrap, topics.output, FRAMES, timeout=60)
        assert len(outputs) == FRAMES, worker.tail()
        assert worker.get("/readyz")[0] == 200
        monitored = _monitor_until(config, FRAMES)
    snapshot = json.loads(monitored.stdout)
    assert snapshot["overall"]["published"] == FRAMES, snapshot["overall"]
    assert snapshot["cameras"].keys() == {"cam-0"}
    for text in (worker.log.read_text(), replayed.stdout + replayed.stderr, monitored.stdout + monitored.stderr):
        assert PASSWORD not in text


def _monitor_until(config: Path, frames: int, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`monitor --once --json` until its snapshot counts `frames` (records follow the outputs they describe)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = cli(config, PASSWORD, "monitor", "--once", "--json", "--from-beginning", "--timeout", "20")
        assert result.returncode == 0, result.stdout + result.stderr
        if json.loads(result.stdout)["overall"]["frames"] >= frames or time.monotonic() > deadline:
            return result
        time.sleep(1)


def test_wrong_password_gives_a_clear_error_and_a_waiting_worker(
    broker: SecureKafkaBroker, topics: Topics, trusted_ca: CertificateAuthority, tmp_path: Path
) -> None:
    config, port = secure_config(tmp_path, broker, topics, trusted_ca.cert_path, ROTATED_USER)
    new_password = "the new password"
    worker = WorkerProcess(config, port, tmp_path / "worker.log", env={PASSWORD_ENV: new_password})
    try:
        _assert_waits_not_ready(worker, re.compile(r"authentication", re.IGNORECASE))
        # The broker gets the password the worker has (rotation in the wrong order, then fixed): no restart needed.
        admin = broker.admin()
        try:
            errors = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(ROTATED_USER, SCRAM_MECHANISM, new_password)]
            )
        finally:
            admin.close()
        assert not any(errors.values()), errors
        _wait_ready(worker, 45)
    finally:
        worker.kill()


def test_untrusted_certificate_gives_a_clear_error_and_a_waiting_worker(
    broker: SecureKafkaBroker, topics: Topics, tmp_path: Path
) -> None:
    stranger = make_ca(tmp_path / "tls", "stranger")  # the broker's certificate is not signed by this CA
    config, port = secure_config(tmp_path, broker, topics, stranger.cert_path)
    worker = WorkerProcess(config, port, tmp_path / "worker.log", env={PASSWORD_ENV: PASSWORD})
    try:
        _assert_waits_not_ready(worker, re.compile(r"certificate verify failed", re.IGNORECASE))
    finally:
        worker.kill()


def test_replay_and_monitor_name_a_wrong_password(
    broker: SecureKafkaBroker, topics: Topics, trusted_ca: CertificateAuthority, media: Path, tmp_path: Path
) -> None:
    config, _ = secure_config(tmp_path, broker, topics, trusted_ca.cert_path)
    for args in (
        ("replay", str(media / "vtest.avi"), "--topic", topics.input, "--rate", "max", "--limit", "1", "--no-progress"),
        ("monitor", "--once", "--json", "--timeout", "15"),
    ):
        result = cli(config, "not the password", *args)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "Traceback" not in output, output
        assert re.search(r"authentication", output, re.IGNORECASE), output


def _assert_waits_not_ready(worker: WorkerProcess, cause: re.Pattern[str]) -> None:
    """For OBSERVE_S after its HTTP endpoints answer: up, alive, not ready (endpoint and gauge agree), a log record
    of its own naming `cause`, no traceback, fewer than 100 log lines."""
    _wait_http(worker, 120)
    deadline = time.monotonic() + OBSERVE_S
    started = time.monotonic()
    while time.monotonic() < deadline:
        code = worker.process.poll()
        assert code is None, (
            f"the worker exited with {code} after {time.monotonic() - started:.0f}s instead of waiting not ready:\n"
            f"{worker.tail(15)}"
        )
        assert worker.get("/healthz")[0] == 200, worker.tail(15)
        assert worker.get("/readyz")[0] == 503, worker.tail(15)
        assert _gauge(worker.get("/metrics")[1], "veilstream_ready") == 0.0
        time.sleep(1)
    lines = worker.log.read_text(errors="replace").splitlines()
    assert not [line for line in lines if line.startswith("Traceback")], worker.tail(30)
    assert len(lines) < 100, f"{len(lines)} log lines in {OBSERVE_S:.0f}s:\n{worker.tail(30)}"
    records = [record for record in map(_json_record, lines) if record is not None]
    named = [r for r in records if r.get("level") in ("warning", "error", "critical") and cause.search(json.dumps(r))]
    assert named, f"no warning or error record of the worker's own names {cause.pattern!r}:\n{worker.tail(30)}"


def _json_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def _gauge(exposition: str, name: str) -> float | None:
    for line in exposition.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def _wait_http(worker: WorkerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert worker.process.poll() is None, f"the worker exited with {worker.process.returncode}:\n{worker.tail()}"
        try:
            worker.get("/healthz")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the worker's HTTP endpoints did not answer within {timeout_s}s:\n{worker.tail()}")


def _wait_ready(worker: WorkerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.get("/readyz")[0] != 200:
        assert worker.process.poll() is None, f"the worker exited with {worker.process.returncode}:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"not ready {timeout_s}s after the cause was fixed:\n{worker.tail()}"
        time.sleep(0.5)
