"""The worker started with the Kubernetes ConfigMap's configuration, against the real broker: its HTTP
endpoints, and `veilstream monitor --once --json` agreeing with the metrics it produced."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from tests.support.brokers import TopicFactory, free_port
from veilstream.commands.cli import main

from .worker_harness import consume_all, frame_message, metrics_once, produce, running_worker, vtest_jpegs

CONFIGMAP = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "veilstream.yaml"


def _prometheus_value(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_configmap_worker_metrics_and_monitor_agree(
    kafka_bootstrap: str, topic_factory: TopicFactory, media: Path, tmp_path: Path
) -> None:
    topics = {name: topic_factory(name) for name in ("in", "out", "metrics", "dlq")}
    frames = vtest_jpegs(media, 6)
    produce(kafka_bootstrap, topics["in"], [frame_message("gate-1", i, data) for i, data in enumerate(frames)])
    produce(kafka_bootstrap, topics["in"], [(b"gate-1", b"not an image", [("camera-id", b"gate-1")])])
    port = free_port()
    # What a pod's environment would set for this cluster: plaintext loopback instead of SASL_SSL.
    env = {
        "VEILSTREAM__KAFKA__SECURITY_PROTOCOL": "PLAINTEXT",
        "VEILSTREAM__KAFKA__SASL_MECHANISM": "null",
        "VEILSTREAM__KAFKA__SSL_CAFILE": "null",
        "VEILSTREAM__WORKER__SESSION_TIMEOUT_MS": "6000",
        "VEILSTREAM__WORKER__HEARTBEAT_INTERVAL_MS": "1000",
        "VEILSTREAM__WORKER__HTTP_HOST": "127.0.0.1",
    }
    args = [
        "--bootstrap", kafka_bootstrap,
        "--input-topic", topics["in"],
        "--output-topic", topics["out"],
        "--metrics-topic", topics["metrics"],
        "--dlq-topic", topics["dlq"],
        "--group", f"k8s-{topics['in']}",
        "--http-port", str(port),
    ]  # fmt: skip
    with running_worker(CONFIGMAP, port, tmp_path / "worker.log", args, env) as worker:
        outputs = consume_all(kafka_bootstrap, topics["out"], 6)
        dead = consume_all(kafka_bootstrap, topics["dlq"], 1)
        assert worker.get("/healthz")[0] == 200
        assert worker.get("/readyz")[0] == 200
        exposition = metrics_once(worker, lambda text: _prometheus_value(text, "veilstream_frames_in_total") >= 7)
    assert len(outputs) == 6
    assert len(dead) == 1
    assert _prometheus_value(exposition, "veilstream_frames_out_total") == 6
    assert _prometheus_value(exposition, "veilstream_dead_letters_total") == 1
    final_changes = _prometheus_value(exposition, "veilstream_final_decision_changes_total")

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "monitor", "--bootstrap", kafka_bootstrap, "--metrics-topic", topics["metrics"],
                "--dlq-topic", topics["dlq"], "--from-beginning", "--once", "--json", "--timeout", "60",
            ]
        )  # fmt: skip
    snapshot = json.loads(stdout.getvalue())
    assert code == (0 if final_changes == 0 else 1)
    overall = snapshot["overall"]
    assert (overall["frames"], overall["published"], overall["dropped"]) == (7, 6, 1), "every input has a record"
    assert overall["final_changed"] == final_changes
    assert overall["naive_changed"] == _prometheus_value(exposition, "veilstream_naive_decision_changes_total")
    assert overall["dead_letters"] == 1
    assert overall["dead_letters_by_reason"] == {"unknown_format": 1}
    assert set(snapshot["cameras"]) == {"gate-1"}
    assert snapshot["ok"] == (final_changes == 0)
