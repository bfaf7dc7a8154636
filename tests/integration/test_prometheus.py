"""A real Prometheus scrapes a running worker, loads deploy/prometheus/alerts.yaml, and its alerts fire.

The rules wait up to 15 minutes (`for:`) before firing. Prometheus loads the shipped file as it is and a copy that
differs only in `for: 0s` (tests.support.prometheus.immediate_copy), both evaluated every second on the same
scrapes: the copy must fire and the original must be pending (or already firing), so the shipped expressions are
the ones that became true. Kubernetes' `namespace` and `pod` target labels come from the scrape job's labels.

Causes: final decision changes come from a worker whose anonymization is strong (a grey mask over faces padded
by twice their size) and whose correction may not step (max_iterations 0, correction enabled): the published
decision is the naive one, which differs on the face photos sent. Dead letters come from undecodable frames, in
two waves: a counter series that appears with its first value has no increase yet (Prometheus only sees it
grow from the second wave on), and "dead letters growing" is about dead letters that keep coming.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.support.brokers import TopicFactory
from tests.support.prometheus import COPY_LABEL, PrometheusServer, ScrapeJob, immediate_copy

from .worker_harness import Topics, frame_message, metrics_once, produce, running_worker, write_config

pytestmark = pytest.mark.slow

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yaml"
JOB = "veilstream-metrics"  # the job the shipped rules expect (the metrics Service's name)
NAMESPACE = "veilstream-test"
POD = "veilstream-worker-0"
FACE_PHOTOS = ("grace_hopper.jpg", "zidane.jpg", "messi5.jpg")  # each changes the decision when masked
CAUSED = ("VeilstreamFinalDecisionChanged", "VeilstreamDeadLettersGrowing", "VeilstreamDeadLetterRatioHigh")
NOT_CAUSED = (
    "VeilstreamWorkerDown",
    "VeilstreamNoWorkerUp",
    "VeilstreamWorkerNotReady",
    "VeilstreamWorkerStalled",
    "VeilstreamResidualDetections",
    "VeilstreamBatchRetries",
    "VeilstreamConsumerLagGrowing",
)
T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout_s: float, what: Callable[[], str]) -> T:
    """`probe()` once it is truthy, polled every half second, or fail with `what()`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout_s:.0f}s: {what()}")
        time.sleep(0.5)


def decision_changing_config(path: Path) -> None:
    """The worker configuration of write_config, made to publish frames whose decision changed."""
    config = yaml.safe_load(path.read_text())
    config["worker"]["worker_id"] = POD
    config |= {
        "device": "cpu",
        "classifiers": [{"source": "efficientnet-lite0", "grouping": None}],  # top-1 ImageNet class
        "anonymizer": {"kind": "mask"},
        "detectors": {"padding": {"face": 2.0, "plate": 2.0}},
        "correction": {"enabled": True, "max_iterations": 0},
        "pipeline": {"batch_size": 4, "residual_check": "off"},
    }
    path.write_text(yaml.safe_dump(config))


def undecodable(first_sequence: int, count: int = 3) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [frame_message("cam-bad", first_sequence + i, b"these bytes are not a JPEG") for i in range(count)]


def _is_copy(alert: dict[str, Any]) -> bool:
    name, value = COPY_LABEL
    return bool(alert["labels"].get(name) == value)


def _active(prometheus: PrometheusServer, copy: bool) -> dict[str, list[dict[str, Any]]]:
    active: dict[str, list[dict[str, Any]]] = {}
    for alert in prometheus.alerts():
        if _is_copy(alert) == copy:
            active.setdefault(alert["labels"]["alertname"], []).append(alert)
    return active


def _pending_or_firing(prometheus: PrometheusServer) -> dict[str, list[dict[str, Any]]] | None:
    """The shipped (not copied) rules' active alerts, once each caused one is pending or firing."""
    active = _active(prometheus, copy=False)
    started = {name for name, alerts in active.items() if {a["state"] for a in alerts} & {"pending", "firing"}}
    return active if started >= set(CAUSED) else None


def _firing(prometheus: PrometheusServer) -> dict[str, list[dict[str, Any]]] | None:
    active = _active(prometheus, copy=True)
    firing = {name: [a for a in alerts if a["state"] == "firing"] for name, alerts in active.items()}
    return firing if all(firing.get(name) for name in CAUSED) else None


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("prometheus not on PATH: scripts/setup.sh installs Debian's package prometheus (apt-get)")
    return found


def test_shipped_alerts_fire_on_a_scraped_worker(
    prometheus_binary: str, kafka_bootstrap: str, topic_factory: TopicFactory, media: Path, tmp_path: Path
) -> None:
    topics = Topics(topic_factory("in"), topic_factory("out"), topic_factory("metrics"), topic_factory("dlq"))
    config, port = write_config(tmp_path, kafka_bootstrap, topics)
    decision_changing_config(config)
    rules = [ALERTS, immediate_copy(ALERTS, tmp_path / "alerts-for-0s.yaml")]
    job = ScrapeJob(JOB, [f"127.0.0.1:{port}"], {"namespace": NAMESPACE, "pod": POD})
    (tmp_path / "prometheus").mkdir()
    with (
        running_worker(config, port, tmp_path / "worker.log") as worker,
        PrometheusServer(tmp_path / "prometheus", [job], rules) as prometheus,
    ):
        eventually(
            lambda: prometheus.query(f'veilstream_final_decision_changes_total{{job="{JOB}",pod="{POD}"}}'),
            30,
            lambda: f"Prometheus never scraped the worker:\n{prometheus.log_tail()}",
        )
        time.sleep(2)  # a couple of evaluations on an idle worker: nothing we cause is active yet
        assert not set(CAUSED) & set(_active(prometheus, copy=True)), prometheus.alerts()

        photos = [(media / name).read_bytes() for name in FACE_PHOTOS]
        produce(kafka_bootstrap, topics.input, [frame_message("cam-faces", i, d) for i, d in enumerate(photos)])
        produce(kafka_bootstrap, topics.input, undecodable(0))
        exposition = metrics_once(
            worker, lambda text: "veilstream_dead_letters_total{" in text and _counted(text, len(photos) + 3)
        )
        changes = _sample(exposition, "veilstream_final_decision_changes_total")
        assert changes >= 1, f"no published decision changed, nothing to alert on:\n{exposition}"
        reasons = {line.split('reason="')[1].split('"')[0] for line in _lines(exposition, "veilstream_dead_letters")}
        eventually(
            lambda: prometheus.query(f'veilstream_dead_letters_total{{namespace="{NAMESPACE}"}}'),
            20,
            lambda: "Prometheus has not scraped the first dead letters",
        )
        produce(kafka_bootstrap, topics.input, undecodable(3))  # the dead letters keep coming

        firing = eventually(
            lambda: _firing(prometheus),
            60,
            lambda: f"not all of {CAUSED} fire: {prometheus.alerts()}\n{prometheus.log_tail()}\n{worker.tail()}",
        )
        # The two rule files are separate groups, evaluated at their own instants: the original may see the
        # same scrapes a second after its copy did.
        originals = eventually(
            lambda: _pending_or_firing(prometheus),
            10,
            lambda: f"the shipped rules are not all pending or firing: {_active(prometheus, copy=False)}",
        )
        health = prometheus.rule_health()
        final_value = prometheus.query(
            f'sum by (namespace) (increase(veilstream_final_decision_changes_total{{namespace="{NAMESPACE}"}}[15m]))'
        )

    assert len(health) == 2 * _rule_count(ALERTS), health
    assert all(state == "ok" for state in health.values()), health
    decision = firing["VeilstreamFinalDecisionChanged"][0]
    assert decision["labels"]["namespace"] == NAMESPACE and decision["labels"]["severity"] == "warning"
    assert NAMESPACE in decision["annotations"]["description"]
    assert float(decision["value"]) > 0 and float(final_value[0]["value"][1]) > 0
    assert {a["labels"]["reason"] for a in firing["VeilstreamDeadLettersGrowing"]} == reasons
    assert all(a["labels"]["namespace"] == NAMESPACE for name in CAUSED for a in firing[name])
    assert set(originals) >= set(CAUSED), originals  # the shipped expressions hold; their `for:` keeps them pending
    copies = _active_names(firing)
    assert not copies & set(NOT_CAUSED), firing


def _active_names(firing: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {name for name, alerts in firing.items() if alerts}


def _rule_count(path: Path) -> int:
    return sum(len(group["rules"]) for group in yaml.safe_load(path.read_text())["groups"])


def _lines(exposition: str, family: str) -> list[str]:
    return [line for line in exposition.splitlines() if line.startswith(f"{family}_total")]


def _sample(exposition: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith(f"{name} "))


def _counted(exposition: str, frames: int) -> bool:
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in _lines(exposition, "veilstream_frames_in"))
    return counted >= frames
