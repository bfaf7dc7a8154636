"""The worker's memory over a long run: RSS of a real `veilstream worker` process while it works through N frames
(default 2,000) from a real single-node Apache Kafka on loopback (as bench/worker.py starts it).

Inputs: `--clip` distinct frames of vtest.avi (every 7th, as bench/worker.py picks them), downscaled to `--size`
(default 384x288, half size, so that 2,000 frames fit in minutes on 2 cores and CenterFace still finds faces),
JPEG q90, repeated in order for camera `bench-cam` (sequence numbers run on, so the detection memory sees one long
stream); every `--plate-every`-th frame is instead licenseplate_motion.jpg at its own 600x482 from camera
`bench-plate`, so that the plate detector finds a plate and the plate paths (blur, residual check) run too. All N
frames are produced to the input topic before the worker starts: a backlog, the flood the consumer must read
without growing.

The worker is the product's own process (`veilstream --config FILE worker`), started in a subprocess with the
default configuration except `device` (`--device`, default cpu), the topics, the group, the HTTP port and the
group timeouts of bench/worker.py (environment overrides `VEILSTREAM__...` and `--config` apply as usual). Every
`--sample-s` the bench reads /proc/PID/status (VmRSS, RssAnon, RssFile, VmHWM, Threads) and the worker's /metrics
(`veilstream_frames_in_total`: frames delivered and committed). RSS "after K frames" is the first sample with at
least K frames delivered. The figure: RSS after N / RSS after 200 (target: within 10%); the peak is the kernel's
VmHWM (and the largest sample). frames/s is from the sample after 200 frames to the one after N.

Prints a table and writes bench/results/memory.json. Smoke run: `--frames 60 --checkpoint 20`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import cv2
import kafka
import numpy as np
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from veilstream.publishing.encoding import encode_frame

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.support`
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for the helpers of worker.py
from tests.support.brokers import KAFKA_VERSION, ApacheKafkaBroker

from worker import CACHE, DEFAULT_VIDEO, MAX_BYTES, RESULTS, Topics, headers_for, read_video, worker_section

PLATE_IMAGE = CACHE / "media" / "licenseplate_motion.jpg"
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads")


# -- inputs ------------------------------------------------------------------------------------------------


def jpeg_inputs(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    """(camera, JPEG) per input frame, in production order."""
    width, height = args.size
    clip = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in read_video(args.video, args.clip)]
    street = [encode_frame(np.ascontiguousarray(f), "jpeg", 90) for f in clip]
    plate: bytes | None = None
    if args.plate_every > 0:
        bgr = cv2.imread(str(PLATE_IMAGE))
        if bgr is None:
            raise SystemExit(f"cannot read {PLATE_IMAGE} (or run with --plate-every 0)")
        plate = encode_frame(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), "jpeg", 90)
    inputs: list[tuple[str, bytes]] = []
    for index in range(args.frames):
        if plate is not None and index % args.plate_every == args.plate_every - 1:
            inputs.append(("bench-plate", plate))
        else:
            inputs.append(("bench-cam", street[index % len(street)]))
    return inputs


def produce(bootstrap: str, topic: str, inputs: list[tuple[str, bytes]]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=MAX_BYTES, acks="all", linger_ms=20, client_id="bench-feed"
    )
    sequences: dict[str, int] = {}
    try:
        for camera, data in inputs:
            sequence = sequences[camera] = sequences.get(camera, -1) + 1
            headers = [(k, camera.encode() if k == "camera-id" else v) for k, v in headers_for(sequence)]
            producer.send(topic, key=camera.encode(), value=data, headers=headers)
        producer.flush(timeout=120)
    finally:
        producer.close()


def end_offset(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed")
    try:
        tp = TopicPartition(topic, 0)
        return int(consumer.end_offsets([tp])[tp])
    finally:
        consumer.close()


# -- the worker process --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker_yaml(args: argparse.Namespace, bootstrap: str, topics: Topics, port: int, folder: Path) -> Path:
    data: dict[str, Any] = {}
    if args.config is not None:
        data = yaml.safe_load(args.config.read_text()) or {}
    data.setdefault("device", args.device)
    data.setdefault("kafka", {}).update({"bootstrap_servers": bootstrap, "client_id": "veilstream-bench"})
    data.setdefault("worker", {}).update(worker_section(topics, port))
    path = folder / "worker.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def worker_command(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("veilstream")  # the console script of this environment
    head = [str(script)] if script.exists() else [sys.executable, "-m", "veilstream.commands.cli"]
    return [*head, "--config", str(config), "worker", "--log-level", "WARNING"]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM in bytes and Threads, from /proc (Linux)."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in STATUS_FIELDS:
            number = int(value.split()[0])
            found[name] = number * 1024 if value.strip().endswith("kB") else number
    return found


def scrape(port: int) -> dict[str, float]:
    """The worker's Prometheus samples, summed over labels except `stage` (name{stage} -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name + (f"{{{sample.labels['stage']}}}" if "stage" in sample.labels else "")
            values[name] = values.get(name, 0.0) + sample.value
    return values


def watch(process: subprocess.Popen[bytes], port: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """Sample the worker until it has delivered `args.frames` frames (or fails, or times out)."""
    began = time.monotonic()
    samples: list[dict[str, float]] = []
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with {process.returncode}")
        if time.monotonic() - began > args.timeout_s:
            raise TimeoutError(f"{samples[-1]['frames'] if samples else 0:.0f} frames after {args.timeout_s:.0f} s")
        status = proc_status(process.pid)
        try:
            frames = scrape(port).get("veilstream_frames_in_total", 0.0)
        except OSError:  # the HTTP server starts after the models are loaded
            frames = -1.0
        samples.append({"t": time.monotonic() - began, "frames": frames, **status})
        if len(samples) > 1 and frames // args.checkpoint > max(0.0, samples[-2]["frames"]) // args.checkpoint:
            print(f"{frames:.0f} frames, RSS {status['VmRSS'] / 2**20:.0f} MiB [{samples[-1]['t']:.0f}s]", flush=True)
        if frames >= args.frames:
            return samples
        time.sleep(args.sample_s)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


# -- figures -------------------------------------------------------------------------------------------------


def at(samples: list[dict[str, float]], frames: int) -> dict[str, float]:
    return next(s for s in samples if s["frames"] >= frames)


def summarize(samples: list[dict[str, float]], args: argparse.Namespace) -> dict[str, Any]:
    first, last = at(samples, args.checkpoint), at(samples, args.frames)
    steps = sorted({*range(args.checkpoint, args.frames, args.checkpoint), args.frames})
    checkpoints = []
    previous = first
    for frames in steps:
        sample = at(samples, frames)
        elapsed = sample["t"] - previous["t"]
        checkpoints.append(
            {
                "frames": frames,
                "delivered": sample["frames"],
                "t_s": sample["t"],
                "rss_mib": sample["VmRSS"] / 2**20,
                "anon_mib": sample["RssAnon"] / 2**20,
                "file_mib": sample["RssFile"] / 2**20,
                "threads": sample["Threads"],
                "vs_first": sample["VmRSS"] / first["VmRSS"],
                "fps_since_previous": (sample["frames"] - previous["frames"]) / elapsed if elapsed > 0 else None,
            }
        )
        previous = sample
    ratio = last["VmRSS"] / first["VmRSS"]
    return {
        f"rss_after_{args.checkpoint}_mib": first["VmRSS"] / 2**20,
        f"rss_after_{args.frames}_mib": last["VmRSS"] / 2**20,
        "ratio": ratio,
        "anon_ratio": last["RssAnon"] / first["RssAnon"],
        "target_within": 0.10,
        "target_met": abs(ratio - 1) <= 0.10,
        "peak_vmhwm_mib": max(s["VmHWM"] for s in samples) / 2**20,
        "peak_sampled_rss_mib": max(s["VmRSS"] for s in samples) / 2**20,
        "fps": (last["frames"] - first["frames"]) / (last["t"] - first["t"]),
        "checkpoints": checkpoints,
    }


def print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{'frames':>7} {'t s':>7} {'RSS MiB':>8} {'anon':>7} {'file':>7} {'threads':>7} {'vs first':>8} {'f/s':>6}"
    )
    for c in summary["checkpoints"]:
        fps = "-" if c["fps_since_previous"] is None else f"{c['fps_since_previous']:.2f}"
        print(
            f"{c['frames']:>8} {c['t_s']:>8.0f} {c['rss_mib']:>8.1f} {c['anon_mib']:>8.1f} {c['file_mib']:>8.1f} "
            f"{c['threads']:>8.0f} {c['vs_first']:>8.3f} {fps:>8}"
        )
    first, last = args.checkpoint, args.frames
    print(
        f"\nRSS after {first}: {summary[f'rss_after_{first}_mib']:.1f} MiB, after {last}: "
        f"{summary[f'rss_after_{last}_mib']:.1f} MiB, ratio {summary['ratio']:.3f} (target within 10%: "
        f"{'met' if summary['target_met'] else 'NOT met'}); peak {summary['peak_vmhwm_mib']:.1f} MiB (VmHWM); "
        f"{summary['fps']:.2f} frames/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000, help="N frames through the worker")
    parser.add_argument("--checkpoint", type=int, default=200, help="RSS is compared with the RSS after this many")
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--clip", type=int, default=100, help="distinct video frames, repeated")
    parser.add_argument("--size", type=lambda t: tuple(int(v) for v in t.split("x")), default=(384, 288))
    parser.add_argument("--plate-every", type=int, default=20, help="every Nth frame is the plate image; 0: none")
    parser.add_argument("--device", default="cpu", help="the worker's `device` unless --config sets one")
    parser.add_argument("--config", type=Path, help="a veilstream YAML the bench's worker settings are added to")
    parser.add_argument("--sample-s", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = parser.parse_args()
    if not 0 < args.checkpoint < args.frames:
        parser.error("--checkpoint must be between 0 and --frames")

    began = time.monotonic()
    load_start = os.getloadavg()
    inputs = jpeg_inputs(args)
    with ApacheKafkaBroker() as broker, tempfile.TemporaryDirectory(prefix="veilstream-rss-") as folder:
        bootstrap = broker.bootstrap
        print(f"Apache Kafka {KAFKA_VERSION} on {bootstrap} (started in {broker.last_start_seconds:.1f}s)")
        topics = Topics(bootstrap, f"rss-{uuid.uuid4().hex[:4]}")
        produce(bootstrap, topics.input, inputs)
        mean_kb = sum(len(data) for _camera, data in inputs) / len(inputs) / 1e3
        print(f"{len(inputs)} frames produced ({mean_kb:.0f} kB mean) [{time.monotonic() - began:.0f}s]")
        port = free_port()
        config = worker_yaml(args, bootstrap, topics, port, Path(folder))
        log_path = Path(folder) / "worker.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(worker_command(config), stdout=log, stderr=subprocess.STDOUT)
            try:
                samples = watch(process, port, args)
                final = scrape(port)
            except BaseException:
                stop(process)
                print(log_path.read_text()[-4000:], file=sys.stderr)
                raise
            exit_code = stop(process)
        outputs = end_offset(bootstrap, topics.output)
        dead_letters = end_offset(bootstrap, topics.dlq)

    summary = summarize(samples, args)
    print_table(summary, args)
    stage_counts = {k: v for k, v in final.items() if k.startswith("veilstream_stage_seconds_count")}
    sanity = {
        "outputs": outputs,
        "dead_letters": dead_letters,
        "worker_exit_code": exit_code,
        "frames_out": final.get("veilstream_frames_out_total"),
        "residual_detections": final.get("veilstream_residual_detections_total"),
        "frames_per_stage": stage_counts,
    }
    print(f"outputs {outputs}, dead letters {dead_letters}, exit code {exit_code}; frames per stage {stage_counts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "kafka_broker": f"Apache Kafka {KAFKA_VERSION}, single node KRaft, loopback",
        "kafka_python": kafka.__version__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_seconds": time.monotonic() - began,
        "settings": settings,
        "summary": summary,
        "sanity": sanity,
        "samples": samples,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}  ({time.monotonic() - began:.0f}s)")


if __name__ == "__main__":
    main()
