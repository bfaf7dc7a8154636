"""`veilstream demo`: the whole product on one machine with nothing installed beforehand.

Starts an embedded broker (tansu, shipped in a PyPI wheel), creates the topics, starts the worker as a real
subprocess, replays vtest.avi into it, collects the anonymized frames and metrics, writes `out/` (anonymized
video, before/after contact sheet, plots, summary.json) and stops everything it started, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from kafka import KafkaConsumer, KafkaProducer

from veilstream.commands.embedded_broker import TansuBroker, create_topics, free_port
from veilstream.commands.replay import Pacer, ReplayItem, replay, video_items
from veilstream.decoding.images import decode_frame
from veilstream.schemas.records import FrameRecord
from veilstream.stats import figures

TOPICS = {
    "input": "frames",
    "output": "frames-anonymized",
    "metrics": "veilstream-metrics",
    "dlq": "frames-dead-letter",
}
MAX_BYTES = 20 * 1024 * 1024


def _worker_config(folder: Path, bootstrap: str, port: int, extra: dict[str, Any] | None) -> Path:
    config: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap},
        # vtest.avi is a street scene: the vehicle grouping says "other" on every frame, so the demo keeps the
        # fine ImageNet decision (the paper's setting), where blurring faces does change some decisions.
        "classifiers": [{"name": "efficientnet-lite0", "grouping": None}],
        "pipeline": {"batch_size": 4},
        "worker": {
            "input_topics": [TOPICS["input"]],
            "output_topic": TOPICS["output"],
            "metrics_topic": TOPICS["metrics"],
            "dlq_topic": TOPICS["dlq"],
            "group_id": "veilstream-demo",
            "batch_timeout_ms": 200,
            # tansu makes a group join wait half the session timeout.
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "aggregate_interval_s": 5.0,
            "http_host": "127.0.0.1",
            "http_port": port,
        },
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    path = folder / "worker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def _worker(config: Path, port: int, log: Path, timeout: float = 180.0) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "veilstream.commands.cli", "--config", str(config), "worker"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the worker exited with {process.returncode}; see {log}")
                with (
                    suppress(OSError),
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response,
                ):
                    if response.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker was not ready after {timeout:.0f}s; see {log}")
                time.sleep(0.5)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def _collect(bootstrap: str, frames: int, timeout: float) -> tuple[list[Any], list[dict[str, Any]], list[Any]]:
    """Read outputs until every replayed frame is accounted for (published or dead-lettered)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",  # as every consumer of the worker's outputs should
        fetch_max_bytes=2 * MAX_BYTES,
        max_partition_fetch_bytes=MAX_BYTES,
    )
    consumer.subscribe([TOPICS["output"], TOPICS["metrics"], TOPICS["dlq"]])
    outputs: list[Any] = []
    metrics: list[dict[str, Any]] = []
    dead: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(dead) < frames and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    if record.topic == TOPICS["output"]:
                        outputs.append(record)
                    elif record.topic == TOPICS["dlq"]:
                        dead.append(record)
                    else:
                        metrics.append(json.loads(record.value))
        # The last metrics records trail their frames by a moment.
        end = time.monotonic() + 3
        while time.monotonic() < end:
            for batch in consumer.poll(timeout_ms=300).values():
                metrics.extend(json.loads(r.value) for r in batch if r.topic == TOPICS["metrics"])
    finally:
        consumer.close()
    return outputs, metrics, dead


def _headers(record: Any) -> dict[str, str]:
    return {name: value.decode() for name, value in record.headers}


def frame_records(metrics: list[dict[str, Any]]) -> list[FrameRecord]:
    """The frame records among the metrics topic's records (the aggregates are left out)."""
    return [FrameRecord.model_validate(m) for m in metrics if m.get("type") == "frame"]


def summarize(
    outputs: list[Any], records: list[FrameRecord], dead: list[Any], seconds: float, replayed: int
) -> dict[str, Any]:
    """The demo's table: what the broker delivered, then `stats.figures` over the worker's own frame records."""
    return {
        "frames_replayed": replayed,
        "outputs_received": len(outputs),
        "dead_letters_received": len(dead),
        **figures(records, seconds).model_dump(),
    }


def _write_video(outputs: list[Any], path: Path, fps: float) -> None:
    ordered = sorted(outputs, key=lambda r: int(_headers(r).get("sequence", "0")))
    if not ordered:
        return
    first = decode_frame(ordered[0].value)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (first.shape[1], first.shape[0]))
    try:
        for record in ordered:
            writer.write(cv2.cvtColor(decode_frame(record.value), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def _contact_sheet(video: Path, outputs: list[Any], path: Path, pairs: int = 4) -> None:
    """Before/after pairs of the frames with the most detections."""
    scored = sorted(outputs, key=lambda r: -(int(_headers(r)["faces"]) + int(_headers(r)["plates"])))[:pairs]
    scored.sort(key=lambda r: int(_headers(r)["sequence"]))
    rows = []
    capture = cv2.VideoCapture(str(video))
    try:
        for record in scored:
            capture.set(cv2.CAP_PROP_POS_FRAMES, int(_headers(record)["sequence"]))
            ok, before = capture.read()
            if not ok:
                continue
            after = cv2.cvtColor(decode_frame(record.value), cv2.COLOR_RGB2BGR)
            label = f"frame {_headers(record)['sequence']}: {_headers(record)['faces']} faces"
            cv2.putText(before, "original " + label, (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 255), 2)
            cv2.putText(after, "published", (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 255), 2)
            rows.append(np.hstack([before, after]))
    finally:
        capture.release()
    if rows:
        cv2.imwrite(str(path), np.vstack(rows))


def _plots(records: list[FrameRecord], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = sorted(records, key=lambda r: r.sequence or 0)
    if not frames:
        return
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6))
    sequence = [r.sequence or 0 for r in frames]
    top.plot(sequence, np.cumsum([r.naive_changed is True for r in frames]), label="naive blur")
    top.plot(sequence, np.cumsum([r.consistent is False for r in frames]), label="published (corrected)")
    top.set(ylabel="decision changes (cumulative)", title="Classifier decision changes")
    top.legend()
    bottom.plot(sequence, [r.latency_ms if r.latency_ms is not None else np.nan for r in frames], ".", markersize=3)
    bottom.set(xlabel="frame", ylabel="latency ms", title="Per-frame latency through the worker")
    figure.tight_layout()
    figure.savefig(out / "metrics.png", dpi=100)
    plt.close(figure)


def format_summary(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    lines = []
    for key, value in summary.items():
        text = f"{value:.2f}" if isinstance(value, float) else ("-" if value is None else str(value))
        lines.append(f"{key:<{width}}  {text:>10}")
    return "\n".join(lines)


def run_demo(video: Path, out: Path, frames: int, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the demo and return its summary (also written to out/summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="veilstream-demo-") as temp:
        print("starting the embedded broker (tansu)...", flush=True)
        broker = stack.enter_context(TansuBroker())
        create_topics(broker.bootstrap, list(TOPICS.values()), partitions=1)
        port = free_port()
        config = _worker_config(Path(temp), broker.bootstrap, port, extra_config)
        print("starting the worker (loading models)...", flush=True)
        stack.enter_context(_worker(config, port, out / "worker.log"))
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=MAX_BYTES)
        stack.callback(producer.close, 10)
        print(f"replaying {frames} frames of {video.name}...", flush=True)
        started = time.monotonic()
        start_time = datetime.now(UTC)

        def send(item: ReplayItem, data: bytes) -> None:
            producer.send(TOPICS["input"], key=item.camera_id.encode(), value=data, headers=item.headers(data))

        replay(lambda: video_items(video, "vtest", start_time), send, Pacer("max"), limit=frames)
        producer.flush(60)
        outputs, metrics, dead = _collect(broker.bootstrap, frames, timeout=max(120.0, frames * 5.0))
        seconds = time.monotonic() - started
    records = frame_records(metrics)
    summary = summarize(outputs, records, dead, seconds, frames)
    fps = cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FPS) or 10.0
    _write_video(outputs, out / "anonymized.mp4", fps)
    _contact_sheet(video, outputs, out / "contact_sheet.png")
    _plots(records, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "metrics.jsonl").open("w") as handle:
        handle.writelines(json.dumps(m) + "\n" for m in metrics)
    return summary
