"""The Kafka worker against a real single-node Apache Kafka on loopback, CPU only.

Per mode (correction on; correction off = `correction.enabled: false`; each with `worker.processing_guarantee`
at-least-once, and exactly-once = "EOS": one transaction per batch), interleaved over rounds (the mode order
rotates each round, because other processes share the 2 cores; `--modes` picks a subset):

  alone   the pipeline object (built once per mode, before any timing) decodes (`decode_frame`) and processes the
          N vtest.avi frames (JPEG q90) in batches of `pipeline.batch_size`: frames/s.
  burst   the N frames are produced to a fresh input topic first; a `Worker` (same config and pipeline object, fresh
          group) then runs in a background thread. frames/s = N / (last batch committed - first records handed to
          the worker), so group join and model loading are excluded. The worker's `latency_ms` (type=frame records
          on the metrics topic) is reported too; end-to-end broker latency is meaningless here (it is queueing).
  paced   a fresh topic and group; one warm-up frame is produced and processed first (not counted), then L frames
          are produced at PACE x the mode's pipeline-alone frames/s of the same round (below capacity), one at a
          time, so the worker mostly polls batches of one. Reported: `latency_ms` p50/p95 from the metrics topic and
          end-to-end broker latency p50/p95 = output record timestamp - input record timestamp. Every topic uses
          `message.timestamp.type=LogAppendTime`, so both timestamps are the broker's append clock.

The worker is the real `veilstream.worker.loop.Worker`, unchanged: the bench watches it through its observer seam
(one `BatchReport` per batch, with the instants between its stages: poll gap, parse + decode, pipeline, publish,
wait for acks, commit) to show where the broker overhead goes, and gives it a `Lifecycle` whose exit function
records a watchdog overrun instead of killing the bench process.

Then consumer throughput: M large PNG frames (upscaled vtest frames) are produced once and read back with a plain
kafka-python KafkaConsumer (fetch sizes raised, partition assigned, no group) with `check_crcs=True` (kafka-python
picks the `crc32c` C package when importable: `kafka/record/util.py`) and `check_crcs=False`, interleaved; once
with kafka-python's pure-Python CRC32C forced, on a prefix. MB = 10^6 bytes of record values.

The exactly-once cost is the median over rounds of EOS burst frames/s / at-least-once burst frames/s, per
correction setting (each round runs both, interleaved). Outputs are read with isolation_level=read_committed.

Prints tables and writes bench/results/worker.json (`--large-frames 0` skips the consumer part).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import kafka
import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.record import default_records
from kafka.record import util as record_util
from kafka.record._crc32c import crc as pure_crc32c

from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import DecodeLimits, Frame, decode_frame
from veilstream.detectors.memory import FrameKey
from veilstream.factory import build_pipeline
from veilstream.outcome import Published
from veilstream.pipeline import Pipeline
from veilstream.publishing.encoding import encode_frame
from veilstream.worker.lifecycle import Lifecycle
from veilstream.worker.loop import BatchReport, Worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.support`
from tests.support.brokers import KAFKA_VERSION, ApacheKafkaBroker, create_topics

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("VEILSTREAM_CACHE", Path.home() / ".cache" / "veilstream"))
DEFAULT_VIDEO = CACHE / "media" / "vtest.avi"
MAX_BYTES = 20 * 1024 * 1024
TOPIC_CONFIG: dict[str, str | int] = {"max.message.bytes": MAX_BYTES, "message.timestamp.type": "LogAppendTime"}
# name -> (correction enabled, worker.processing_guarantee)
MODES: dict[str, tuple[bool, str]] = {
    "correction on": (True, "at-least-once"),
    "correction off": (False, "at-least-once"),
    "correction on EOS": (True, "exactly-once"),
    "correction off EOS": (False, "exactly-once"),
}
STAGES = ("poll gap", "parse+decode", "pipeline", "publish", "await acks", "commit")
WAIT_LIMIT_S = 600.0


# -- inputs ------------------------------------------------------------------------------------------


def read_video(path: Path, count: int, step: int = 7) -> list[Frame]:
    """`count` RGB frames, every `step`-th (as the integration tests pick them), wrapping around at the end."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SystemExit(f"cannot open {path}")
    frames: list[Frame] = []
    index = 0
    while len(frames) < count:
        ok, bgr = capture.read()
        if not ok:
            if index == 0:
                raise SystemExit(f"{path} has no frames")
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        if index % step == 0:
            frames.append(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        index += 1
    capture.release()
    return frames


def headers_for(sequence: int, content_type: str = "image/jpeg") -> list[tuple[str, bytes]]:
    return [
        ("camera-id", b"bench-cam"),
        ("sequence", str(sequence).encode()),
        ("content-type", content_type.encode()),
    ]


# -- the worker, watched through its batch reports ------------------------------------------------------


class WorkerRun:
    """The real Worker in a background thread; its batch reports give the stage times and the completion."""

    def __init__(self, config: VeilstreamConfig, pipeline: Pipeline, expected: int) -> None:
        self.expected = expected
        self.processed = 0
        self.batches = 0
        self.first_records: float | None = None
        self.last_ack: float | None = None
        self.warm = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.stage_s: dict[str, float] = defaultdict(float)
        self._batch_end: float | None = None
        lifecycle = Lifecycle(config.worker.shutdown_timeout_s, exit=self._overrun)
        self.worker = Worker(config, pipeline, lifecycle=lifecycle, observer=self.observe)

    def observe(self, report: BatchReport) -> None:
        if self.first_records is None:
            self.first_records = report.started
        elif self._batch_end is not None:
            self.stage_s["poll gap"] += report.started - self._batch_end
        self.stage_s["parse+decode"] += report.decoded - report.started
        self.stage_s["pipeline"] += report.processed - report.decoded
        self.stage_s["publish"] += report.flushed - report.processed - report.wait_s
        self.stage_s["await acks"] += report.wait_s
        self.stage_s["commit"] += report.committed - report.flushed
        self._batch_end = report.committed
        if not report.delivered:
            return
        self.batches += 1
        self.processed += report.records
        self.warm.set()
        if self.processed >= self.expected and not self.done.is_set():
            self.last_ack = report.committed
            self.done.set()

    def _overrun(self, code: int) -> None:
        self.error = RuntimeError(f"the worker's shutdown watchdog fired (exit code {code})")
        self.done.set()

    def request_stop(self) -> None:
        self.worker.request_stop()

    def run_in_thread(self) -> threading.Thread:
        def target() -> None:
            try:
                self.worker.run()
            except BaseException as error:
                self.error = error
                self.done.set()
                self.warm.set()

        thread = threading.Thread(target=target, name="bench-worker", daemon=True)
        thread.start()
        return thread


# -- broker helpers ---------------------------------------------------------------------------------------


class Topics:
    def __init__(self, bootstrap: str, tag: str) -> None:
        stem = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
        self.input, self.output, self.metrics, self.dlq = (f"{stem}-{s}" for s in ("in", "out", "metrics", "dlq"))
        self.group = f"{stem}-group"
        create_topics(bootstrap, [self.input, self.output, self.metrics, self.dlq], 1, TOPIC_CONFIG)


def worker_config(bootstrap: str, topics: Topics, correction: bool, guarantee: str) -> VeilstreamConfig:
    return VeilstreamConfig.model_validate(
        {
            "device": "cpu",
            "correction": {"enabled": correction},
            "kafka": {"bootstrap_servers": bootstrap, "client_id": "veilstream-bench"},
            "worker": {**worker_section(topics, 0), "processing_guarantee": guarantee},
        }
    )


def worker_section(topics: Topics, http_port: int) -> dict[str, Any]:
    """The bench worker's `worker` settings: its topics and group, short group timeouts, its HTTP port."""
    return {
        "input_topics": [topics.input],
        "output_topic": topics.output,
        "metrics_topic": topics.metrics,
        "dlq_topic": topics.dlq,
        "group_id": topics.group,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "worker_id": f"bench-{topics.group}",
    }


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Any]:
    """Every record of partition 0, up to the end offset at the time of the call."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",  # exactly-once outputs count once committed
        fetch_max_bytes=2 * MAX_BYTES,
        max_partition_fetch_bytes=MAX_BYTES,
    )
    records: list[Any] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        deadline = time.monotonic() + timeout
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "n": len(values),
    }


def collect(bootstrap: str, topics: Topics, counted: range) -> dict[str, Any]:
    """Worker latency from the metrics topic and broker end-to-end latency, over the input offsets `counted`."""
    inputs = {r.offset: r.timestamp for r in read_topic(bootstrap, topics.input)}
    outputs = read_topic(bootstrap, topics.output)
    dead = read_topic(bootstrap, topics.dlq)
    metrics = [json.loads(r.value) for r in read_topic(bootstrap, topics.metrics)]
    frame_metrics = [m for m in metrics if m.get("type") == "frame" and m.get("source_offset") in counted]
    end_to_end: list[float] = []
    timestamp_types = set()
    for record in outputs:
        timestamp_types.add(record.timestamp_type)
        offset = int(dict(record.headers)["source-offset"].decode())
        if offset in counted and offset in inputs:
            end_to_end.append(float(record.timestamp - inputs[offset]))
    return {
        "outputs": len(outputs),
        "dead_letters": len(dead),
        "metrics_records": len(metrics),
        "worker_latency_ms": percentiles([float(m["latency_ms"]) for m in frame_metrics]),
        "end_to_end_ms": percentiles(end_to_end),
        "output_timestamp_types": sorted(timestamp_types),  # 1 = LogAppendTime
    }


def run_worker(
    config: VeilstreamConfig, pipeline: Pipeline, expected: int, feed: Callable[[WorkerRun], None]
) -> WorkerRun:
    worker = WorkerRun(config, pipeline, expected)
    thread = worker.run_in_thread()
    try:
        feed(worker)
        if not worker.done.wait(WAIT_LIMIT_S):
            raise TimeoutError(f"the worker processed {worker.processed} of {expected} frames in {WAIT_LIMIT_S}s")
    finally:
        worker.request_stop()
        thread.join(config.worker.shutdown_timeout_s + 10)
    if worker.error is not None:
        raise RuntimeError(f"worker failed: {worker.error!r}") from worker.error
    return worker


# -- the three measurements ----------------------------------------------------------------------------


def bench_alone(pipeline: Pipeline, jpegs: Sequence[bytes], batch: int, limits: DecodeLimits) -> dict[str, Any]:
    decode_s = process_s = 0.0
    failed = iterations = changed = regions = 0
    stage_ms: dict[str, float] = defaultdict(float)
    for first in range(0, len(jpegs), batch):
        start = time.perf_counter()
        frames = [decode_frame(data, limits) for data in jpegs[first : first + batch]]
        decoded = time.perf_counter()
        # Keyed as the worker's frames are (one camera, consecutive sequence numbers), so the detection memory
        # works here as it does in the worker: without keys it would remember nothing and the work would differ.
        keys = [FrameKey("bench-alone", first + k) for k in range(len(frames))]
        outcomes = pipeline.process(frames, keys)
        process_s += time.perf_counter() - decoded
        decode_s += decoded - start
        for outcome in outcomes:
            failed += not isinstance(outcome, Published)
            for stage, ms in outcome.timings_ms.items():
                stage_ms[stage] += ms  # the pipeline reports each stage per frame (batch time / batch size)
            if outcome.correction is not None:
                iterations += outcome.correction.iterations
                changed += outcome.correction.naive_changed
            regions += outcome.faces + outcome.plates
    total = decode_s + process_s
    n = len(jpegs)
    return {
        "fps": n / total,
        "seconds": total,
        "decode_ms_per_frame": decode_s * 1000 / n,
        "pipeline_ms_per_frame": process_s * 1000 / n,
        "pipeline_stage_ms_per_frame": {stage: ms / n for stage, ms in stage_ms.items()},
        "correction_iterations_mean": iterations / n,
        "naive_decision_changed": changed,
        "regions_per_frame": regions / n,
        "dropped": failed,
    }


def bench_burst(
    bootstrap: str, producer: KafkaProducer, pipeline: Pipeline, jpegs: Sequence[bytes], mode: tuple[bool, str]
) -> dict[str, Any]:
    topics = Topics(bootstrap, "burst")
    for sequence, data in enumerate(jpegs):
        producer.send(topics.input, key=b"bench-cam", value=data, headers=headers_for(sequence))
    producer.flush(timeout=60)
    config = worker_config(bootstrap, topics, *mode)
    worker = run_worker(config, pipeline, len(jpegs), lambda _w: None)
    assert worker.first_records is not None and worker.last_ack is not None
    seconds = worker.last_ack - worker.first_records
    n = len(jpegs)
    result: dict[str, Any] = {
        "fps": n / seconds,
        "seconds": seconds,
        "batches": worker.batches,
        "stage_ms_per_frame": {s: worker.stage_s.get(s, 0.0) * 1000 / n for s in STAGES},
    }
    result |= collect(bootstrap, topics, range(n))
    return result


def bench_paced(
    bootstrap: str,
    producer: KafkaProducer,
    pipeline: Pipeline,
    jpegs: Sequence[bytes],
    count: int,
    rate: float,
    mode: tuple[bool, str],
) -> dict[str, Any]:
    topics = Topics(bootstrap, "paced")
    producer.send(topics.input, key=b"bench-cam", value=jpegs[0], headers=headers_for(0)).get(timeout=30)
    sent_at: list[float] = []

    def feed(worker: WorkerRun) -> None:
        if not worker.warm.wait(WAIT_LIMIT_S):
            raise TimeoutError("the warm-up frame was not processed")
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent_at.append(time.perf_counter())
            data = jpegs[(i + 1) % len(jpegs)]
            producer.send(topics.input, key=b"bench-cam", value=data, headers=headers_for(i + 1))
        producer.flush(timeout=60)

    config = worker_config(bootstrap, topics, *mode)
    worker = run_worker(config, pipeline, count + 1, feed)
    achieved = (count - 1) / (sent_at[-1] - sent_at[0]) if count > 1 else rate
    result: dict[str, Any] = {
        "target_rate_fps": rate,
        "produced_rate_fps": achieved,
        "frames": count,
        "batches": worker.batches - 1,
    }
    result |= collect(bootstrap, topics, range(1, count + 1))
    return result


def consume_rate(bootstrap: str, topic: str, count: int, check_crcs: bool) -> dict[str, float]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        check_crcs=check_crcs,
        fetch_max_bytes=2 * MAX_BYTES,
        max_partition_fetch_bytes=MAX_BYTES,
    )
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        consumer.position(tp)  # resolves the start offset (a round trip) before the clock starts
        received = size = 0
        start = time.perf_counter()
        deadline = time.monotonic() + WAIT_LIMIT_S
        while received < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=1000, max_records=count - received).values():
                received += len(batch)
                size += sum(len(r.value) for r in batch)
        seconds = time.perf_counter() - start
    finally:
        consumer.close()
    return {"mb_per_s": size / 1e6 / seconds, "seconds": seconds, "records": received, "mb": size / 1e6}


def crc_function_rates() -> dict[str, float]:
    """MB/s of the CRC function kafka-python selected, and of its pure-Python fallback, on their own."""
    big = memoryview(np.random.default_rng(0).integers(0, 256, 64 * 1024 * 1024, dtype=np.uint8).tobytes())
    start = time.perf_counter()
    record_util.calc_crc32c(big)
    selected = big.nbytes / 1e6 / (time.perf_counter() - start)
    small = big[: 2 * 1024 * 1024]
    start = time.perf_counter()
    pure_crc32c(small)
    pure = small.nbytes / 1e6 / (time.perf_counter() - start)
    return {"selected_mb_per_s": selected, "pure_python_mb_per_s": pure}


def bench_consumer(
    bootstrap: str, producer: KafkaProducer, frames: Sequence[Frame], args: argparse.Namespace
) -> dict[str, Any]:
    topic = f"bench-large-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic], 1, TOPIC_CONFIG)
    sizes: list[int] = []
    shape: tuple[int, ...] = ()
    for i in range(args.large_frames):
        rgb = frames[i % len(frames)]
        big = cv2.resize(rgb, None, fx=args.large_scale, fy=args.large_scale, interpolation=cv2.INTER_CUBIC)
        shape = big.shape
        data = encode_frame(np.ascontiguousarray(big), "png")
        sizes.append(len(data))
        producer.send(topic, key=b"bench-cam", value=data, headers=headers_for(i, "image/png"))
    producer.flush(timeout=120)
    variants = {"check_crcs=True (crc32c C)": True, "check_crcs=False": False}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_ in range(args.consumer_repeats):
        names = list(variants)
        for name in names[round_ % 2 :] + names[: round_ % 2]:
            runs[name].append(consume_rate(bootstrap, topic, args.large_frames, variants[name]))
    # kafka-python's own fallback, forced: default_records imported calc_crc32c by name, so patch it there.
    original = default_records.calc_crc32c
    default_records.calc_crc32c = pure_crc32c
    try:
        pure_count = min(args.pure_crc_frames, args.large_frames)
        pure_run = consume_rate(bootstrap, topic, pure_count, True) if pure_count > 0 else None
    finally:
        default_records.calc_crc32c = original
    result: dict[str, Any] = {
        "frames": args.large_frames,
        "repeats": args.consumer_repeats,
        "frame_shape": list(shape),
        "codec": "png",
        "mean_frame_mb": statistics.fmean(sizes) / 1e6,
        "min_frame_mb": min(sizes) / 1e6,
        "max_frame_mb": max(sizes) / 1e6,
        "variants": {
            name: {"runs": values, "median_mb_per_s": statistics.median(v["mb_per_s"] for v in values)}
            for name, values in runs.items()
        },
        "pure_python_crc_forced": pure_run,
        "crc_function": crc_function_rates(),
    }
    return result


# -- main ---------------------------------------------------------------------------------------------------


def crc_implementation() -> str:
    impl = record_util.calc_crc32c.__defaults__[0] if record_util.calc_crc32c.__defaults__ else None
    return f"{getattr(impl, '__module__', None)}.{getattr(impl, '__name__', repr(impl))}"


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    alone = [r["alone"]["fps"] for r in rounds]
    pipeline_stages = list(rounds[0]["alone"]["pipeline_stage_ms_per_frame"])
    broker = [r["burst"]["fps"] for r in rounds]

    def med(path: Sequence[str]) -> float | None:
        values: list[float | None] = []
        for r in rounds:
            node: Any = r
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            values.append(node)
        return _median(values)

    return {
        "alone_fps": statistics.median(alone),
        "broker_fps": statistics.median(broker),
        "ratio_of_medians": statistics.median(broker) / statistics.median(alone),
        "median_of_round_ratios": statistics.median(b / a for a, b in zip(alone, broker, strict=True)),
        "alone_decode_ms_per_frame": med(["alone", "decode_ms_per_frame"]),
        "alone_pipeline_ms_per_frame": med(["alone", "pipeline_ms_per_frame"]),
        "alone_pipeline_stage_ms_per_frame": {
            s: med(["alone", "pipeline_stage_ms_per_frame", s]) for s in pipeline_stages
        },
        "alone_correction_iterations_mean": med(["alone", "correction_iterations_mean"]),
        "burst_stage_ms_per_frame": {s: med(["burst", "stage_ms_per_frame", s]) for s in STAGES},
        "burst_worker_latency_ms": {p: med(["burst", "worker_latency_ms", p]) for p in ("p50", "p95")},
        "burst_end_to_end_ms": {p: med(["burst", "end_to_end_ms", p]) for p in ("p50", "p95")},
        "paced_rate_fps": med(["paced", "produced_rate_fps"]),
        "paced_worker_latency_ms": {p: med(["paced", "worker_latency_ms", p]) for p in ("p50", "p95")},
        "paced_end_to_end_ms": {p: med(["paced", "end_to_end_ms", p]) for p in ("p50", "p95")},
    }


def exactly_once_cost(modes: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per correction setting: exactly-once burst frames/s against at-least-once, round by round (interleaved)."""
    costs: dict[str, dict[str, float]] = {}
    for correction in ("on", "off"):
        alo, eos = modes.get(f"correction {correction}"), modes.get(f"correction {correction} EOS")
        if alo is None or eos is None:
            continue
        pairs = list(zip(alo["rounds"], eos["rounds"], strict=True))
        ratios = [e["burst"]["fps"] / a["burst"]["fps"] for a, e in pairs]
        costs[f"correction {correction}"] = {
            "at_least_once_fps": alo["median"]["broker_fps"],
            "exactly_once_fps": eos["median"]["broker_fps"],
            "median_round_ratio": statistics.median(ratios),
            "slower_percent": 100 * (1 - statistics.median(ratios)),
            # Less exposed to the CPU load of other processes than frames/s: the broker's share of a frame.
            "at_least_once_delivery_ms_per_frame": statistics.median(_delivery_ms(a) for a, _e in pairs),
            "exactly_once_delivery_ms_per_frame": statistics.median(_delivery_ms(e) for _a, e in pairs),
        }
    return costs


def _delivery_ms(round_: dict[str, Any]) -> float:
    """ms per frame from the pipeline's end to the commit: producing, awaiting acknowledgements, committing."""
    stages = round_["burst"]["stage_ms_per_frame"]
    return float(stages["publish"] + stages["await acks"] + stages["commit"])


def print_tables(modes: dict[str, dict[str, Any]], consumer: dict[str, Any] | None) -> None:
    print()
    print(
        f"{'mode':>18} {'alone f/s':>9} {'broker f/s':>10} {'ratio':>6} {'ratio/rnd':>9} "
        f"{'burst wrk p50/p95 ms':>21} {'paced f/s':>9} {'paced wrk p50/p95 ms':>21} {'paced e2e p50/p95 ms':>21}"
    )
    for name, mode in modes.items():
        m = mode["median"]
        burst = m["burst_worker_latency_ms"]
        paced = m["paced_worker_latency_ms"]
        e2e = m["paced_end_to_end_ms"]
        print(
            f"{name:>18} {m['alone_fps']:>9.2f} {m['broker_fps']:>10.2f} {m['ratio_of_medians']:>6.2f} "
            f"{m['median_of_round_ratios']:>9.2f} "
            f"{_fmt(burst['p50'], 0) + ' / ' + _fmt(burst['p95'], 0):>21} {_fmt(m['paced_rate_fps'], 2):>9} "
            f"{_fmt(paced['p50'], 0) + ' / ' + _fmt(paced['p95'], 0):>21} "
            f"{_fmt(e2e['p50'], 0) + ' / ' + _fmt(e2e['p95'], 0):>21}"
        )
    print()
    print("ms per frame (medians over rounds): alone = decode + pipeline; burst = the worker's stages")
    header = f"{'mode':>18} {'alone dec':>9} {'alone pipe':>10} " + " ".join(f"{s:>12}" for s in STAGES)
    print(header + f" {'burst total':>11}")
    for name, mode in modes.items():
        m = mode["median"]
        stages = m["burst_stage_ms_per_frame"]
        total = sum(v for v in stages.values() if v is not None)
        print(
            f"{name:>18} {_fmt(m['alone_decode_ms_per_frame']):>9} {_fmt(m['alone_pipeline_ms_per_frame']):>10} "
            + " ".join(f"{_fmt(stages[s]):>12}" for s in STAGES)
            + f" {total:>11.1f}"
        )
    print()
    for name, mode in modes.items():
        m = mode["median"]
        inside = ", ".join(f"{k} {_fmt(v)}" for k, v in m["alone_pipeline_stage_ms_per_frame"].items())
        iterations = _fmt(m["alone_correction_iterations_mean"], 2)
        print(f"{name:>18} pipeline stages ms/frame: {inside}; correction iterations/frame {iterations}")
    for setting, cost in exactly_once_cost(modes).items():
        print(
            f"exactly-once cost, {setting}: {cost['exactly_once_fps']:.2f} vs {cost['at_least_once_fps']:.2f} "
            f"broker f/s, {cost['slower_percent']:.1f}% slower (median of the per-round ratios); delivery "
            f"{cost['exactly_once_delivery_ms_per_frame']:.1f} vs {cost['at_least_once_delivery_ms_per_frame']:.1f} "
            f"ms per frame (produce + acks + commit)"
        )
    if consumer is None:
        return
    print()
    print(
        f"consumer: {consumer['frames']} PNG frames {consumer['frame_shape']}, "
        f"{consumer['mean_frame_mb']:.2f} MB mean ({consumer['min_frame_mb']:.2f}-{consumer['max_frame_mb']:.2f})"
    )
    print(f"{'variant':>34} {'MB/s':>8}")
    for name, variant in consumer["variants"].items():
        print(f"{name:>34} {variant['median_mb_per_s']:>8.1f}")
    pure = consumer["pure_python_crc_forced"]
    if pure is not None:
        label = f"pure-Python CRC forced ({int(pure['records'])} fr)"
        print(f"{label:>34} {pure['mb_per_s']:>8.1f}")
    crc = consumer["crc_function"]
    print(
        f"CRC function alone: selected {crc['selected_mb_per_s']:.0f} MB/s, "
        f"pure Python {crc['pure_python_mb_per_s']:.1f} MB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--frames", type=int, default=60, help="N frames per alone/burst measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--latency-frames", type=int, default=16, help="L frames of a paced run")
    parser.add_argument("--pace", type=float, default=0.5, help="paced rate as a fraction of alone frames/s")
    parser.add_argument("--large-frames", type=int, default=30)
    parser.add_argument("--large-scale", type=float, default=2.5, help="upscale factor of the large PNG frames")
    parser.add_argument("--consumer-repeats", type=int, default=5, help="interleaved reads per CRC variant")
    parser.add_argument("--pure-crc-frames", type=int, default=6, help="frames read with pure-Python CRC forced")
    parser.add_argument("--out", type=Path, default=RESULTS / "worker.json")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of: {', '.join(MODES)}")
    args = parser.parse_args()
    selected = {name: MODES[name] for name in (n.strip() for n in args.modes.split(",")) if name}

    began = time.monotonic()
    load_start = os.getloadavg()
    rgb = read_video(args.video, max(args.frames, args.latency_frames + 1))
    jpegs = [encode_frame(f, "jpeg", 90) for f in rgb[: args.frames]]
    mean_kb = statistics.fmean(map(len, jpegs)) / 1e3
    print(f"{len(jpegs)} frames {rgb[0].shape[1]}x{rgb[0].shape[0]}, JPEG q90 {mean_kb:.0f} kB")
    latency_jpegs = [encode_frame(f, "jpeg", 90) for f in rgb[: args.latency_frames + 1]]

    with ApacheKafkaBroker() as broker:
        bootstrap = broker.bootstrap
        print(f"Apache Kafka {KAFKA_VERSION} on {bootstrap} (started in {broker.last_start_seconds:.1f}s)")
        producer = KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=MAX_BYTES, acks="all", linger_ms=0, client_id="bench-feed"
        )
        try:
            pipelines: dict[str, Pipeline] = {}
            base: dict[str, VeilstreamConfig] = {}
            built: dict[bool, Pipeline] = {}  # one pipeline per correction setting, shared by both guarantees
            for name, (enabled, _guarantee) in selected.items():
                base[name] = VeilstreamConfig.model_validate({"device": "cpu", "correction": {"enabled": enabled}})
                if enabled not in built:
                    start = time.perf_counter()
                    built[enabled] = build_pipeline(base[name])
                    warm = [decode_frame(d) for d in jpegs[: base[name].pipeline.batch_size]]
                    built[enabled].process(warm)
                    print(f"{name}: pipeline built and warmed in {time.perf_counter() - start:.1f}s")
                pipelines[name] = built[enabled]
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in selected}
            for round_ in range(args.repeats):
                names = list(selected)
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    config = base[name]
                    limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
                    alone = bench_alone(pipelines[name], jpegs, config.pipeline.batch_size, limits)
                    burst = bench_burst(bootstrap, producer, pipelines[name], jpegs, selected[name])
                    rate = args.pace * alone["fps"]
                    paced = bench_paced(
                        bootstrap, producer, pipelines[name], latency_jpegs, args.latency_frames, rate, selected[name]
                    )
                    rounds[name].append({"alone": alone, "burst": burst, "paced": paced})
                    print(
                        f"round {round_ + 1} {name}: alone {alone['fps']:.2f} f/s, broker {burst['fps']:.2f} f/s "
                        f"({burst['outputs']} out, {burst['dead_letters']} dlq), paced e2e p50 "
                        f"{_fmt(paced['end_to_end_ms']['p50'], 0)} ms at {paced['produced_rate_fps']:.2f} f/s "
                        f"[{time.monotonic() - began:.0f}s]",
                        flush=True,
                    )
            consumer = bench_consumer(bootstrap, producer, rgb, args) if args.large_frames > 0 else None
        finally:
            producer.close()

    modes = {name: {"rounds": rounds[name], "median": summarize(rounds[name])} for name in selected}
    print_tables(modes, consumer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "device": "cpu",
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "python": sys.version.split()[0],
                "kafka_broker": f"Apache Kafka {KAFKA_VERSION}, single node KRaft, loopback",
                "kafka_python": kafka.__version__,
                "kafka_python_crc32c": crc_implementation(),
                "load_average_start": load_start,
                "load_average_end": os.getloadavg(),
                "wall_seconds": time.monotonic() - began,
                "statistic": "median over interleaved rounds",
                "settings": {
                    "frames": args.frames,
                    "repeats": args.repeats,
                    "input": "vtest.avi every 7th frame, JPEG q90",
                    "batch_size": base[next(iter(selected))].pipeline.batch_size,
                    "batch_timeout_ms": base[next(iter(selected))].worker.batch_timeout_ms,
                    "residual_check": base[next(iter(selected))].pipeline.residual_check,
                    "modes": {name: {"correction": c, "processing_guarantee": g} for name, (c, g) in selected.items()},
                    "topic_config": TOPIC_CONFIG,
                    "worker_overrides": "session_timeout_ms 6000, heartbeat_interval_ms 1000, http port 0",
                    "throughput": "N / (last batch committed - first records handed over by poll)",
                    "latency_frames": args.latency_frames,
                    "pace_fraction_of_alone_fps": args.pace,
                    "end_to_end": "output LogAppendTime - input LogAppendTime (broker clock, ms)",
                },
                "modes": modes,
                "exactly_once_cost": exactly_once_cost(modes),
                "consumer": consumer,
            },
            indent=2,
        )
    )
    print(f"written {args.out}  ({time.monotonic() - began:.0f}s)")


if __name__ == "__main__":
    main()
