"""The `veilstream replay` command: sources -> paced Kafka producer, with progress and resumable position."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

from kafka import KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from veilstream.client_errors import describe_connect_failure, watch_client_problems
from veilstream.commands.replay import ManifestError, Pacer, ReplayItem, interleave, replay, source_items
from veilstream.config import VeilstreamConfig
from veilstream.errors import ConfigError

MAX_REQUEST_BYTES = 20 * 1024 * 1024


def _pacer(rate: str) -> Pacer:
    if rate in ("recorded", "max"):
        return Pacer(rate)  # type: ignore[arg-type]
    try:
        return Pacer("fixed", float(rate))
    except ValueError as error:
        raise ConfigError(f"--rate must be 'recorded', 'max' or a number of frames/s, got {rate!r}") from error


def run_replay(args: argparse.Namespace, config: VeilstreamConfig) -> int:
    cameras = args.camera or []
    if len(cameras) > len(args.sources):
        raise ConfigError("more --camera values than sources")
    for source in args.sources:
        if not source.exists():
            raise ConfigError(f"replay source not found: {source}")
    errors: list[ManifestError] = []
    start = datetime.now(UTC)

    def items() -> Iterator[ReplayItem]:
        errors.clear()
        streams = [
            source_items(source, cameras[i] if i < len(cameras) else None, start, args.folder_fps, errors)
            for i, source in enumerate(args.sources)
        ]
        return interleave(streams)

    start_at = args.start_at
    if start_at is None and args.state is not None and args.state.is_file():
        start_at = int(args.state.read_text().strip() or 0)
        print(f"resuming at message {start_at} ({args.state})", file=sys.stderr)
    options = config.kafka.client_options()
    if args.bootstrap:
        options["bootstrap_servers"] = args.bootstrap.split(",")
    watch_client_problems(options.get("security_protocol"))
    try:
        producer = KafkaProducer(**options, acks="all", linger_ms=5, max_request_size=MAX_REQUEST_BYTES)
    except KafkaError as unreachable:
        print(f"veilstream replay: cannot reach Kafka: {describe_connect_failure(unreachable)}", file=sys.stderr)
        return 2
    bar = tqdm(unit="frame", disable=args.no_progress, total=args.limit)
    failures: list[BaseException] = []

    def send(item: ReplayItem, data: bytes) -> None:
        future = producer.send(args.topic, key=item.camera_id.encode(), value=data, headers=item.headers(data))
        future.add_errback(failures.append)
        bar.update(1)

    def remember(position: int) -> None:
        if args.state is not None and position % 10 == 0:
            args.state.write_text(str(position))

    try:
        stats = replay(items, send, _pacer(args.rate), start_at or 0, args.limit, args.loop, remember)
        producer.flush(timeout=60)
    except KeyboardInterrupt:
        producer.flush(timeout=10)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bar.close()
        producer.close(timeout=10)
    if args.state is not None:
        args.state.write_text(str((start_at or 0) + stats.sent))
    for error in errors:
        print(f"{error.path}:{error.line}: {error.message}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} messages not acknowledged, e.g. {failures[0]}", file=sys.stderr)
        return 1
    megabytes = stats.bytes / 1e6
    print(f"sent {stats.sent} frames ({megabytes:.1f} MB) to {args.topic} in {stats.seconds:.1f}s ({stats.fps:.1f}/s)")
    return 0 if stats.sent or stats.skipped else 1
