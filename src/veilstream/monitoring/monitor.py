"""`veilstream monitor`: figures of the workers' metrics topic, as a live dashboard or as one snapshot.

Reads the metrics topic (the frame records of every outcome, folded into `stats.figures` per camera;
aggregate records are skipped) and, for counts by reason only, the headers of the dead-letter topic, from
the start of a time window (`offsets_for_times`) or from the beginning. It never commits: partitions are
assigned, without a group unless one is given, and even then nothing is committed. With `--once` it reads
up to the end offsets taken at start, prints ONE snapshot and exits 0, 1 when a threshold is crossed, 2 when
Kafka cannot be read (unreachable, missing metrics topic, not caught up in time). Without `--once` it
refreshes a table per camera and overall (rich's Live display when `rich` is installed and the output is a
terminal, else a plain reprint) until Ctrl-C or `--duration`, and exits as `--once` would for the last
snapshot shown.

Intended CLI (the wiring lives in `veilstream.commands.cli`)::

    veilstream monitor [--bootstrap HOST:PORT] [--metrics-topic T] [--dlq-topic T | --no-dlq]
        [--window SECONDS | --from-beginning] [--once] [--json] [--group GROUP]
        [--group-lag GROUP [--lag-topic TOPIC ...]]
        [--max-final-changes N] [--max-dead-letters N] [--max-budget-exhausted N]
        [--max-p95-latency-ms MS] [--max-lag N]
        [--refresh SECONDS] [--duration SECONDS] [--timeout SECONDS] [--plain]

    --bootstrap        default: kafka.bootstrap_servers of --config (TLS/SASL options from there too,
                       passed as `client_options=config.kafka.client_options()`)
    --metrics-topic    default: worker.metrics_topic; --dlq-topic default: worker.dlq_topic
    --window           seconds back from now (default 300); --from-beginning: everything retained
    --once             read until caught up, print one snapshot, exit 0/1/2; --json: as JSON (with
                       "violations" and "ok"); without --once --json prints one JSON line per refresh
    --group            consumer group id for the monitor's own reads (throwaway label, never committed)
    --group-lag        the workers' group whose lag to show (committed offsets vs end offsets);
                       --lag-topic: its input topic(s) (default: the topics it committed offsets for)
    --max-*            Thresholds (max_final_changes defaults to 0: any final change fails)
    --plain            no rich display even on a terminal
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from kafka.errors import KafkaError

from veilstream.client_errors import describe_connect_failure, watch_client_problems
from veilstream.monitoring import dashboard
from veilstream.monitoring.dashboard import Display, render_text
from veilstream.monitoring.kafka_io import (
    POLL_MS,
    assign_at,
    offsets_at,
    open_admin,
    open_consumer,
    read_range,
    topic_partitions,
)
from veilstream.monitoring.records import parse_record
from veilstream.monitoring.snapshot import (
    ConsumerLag,
    Snapshot,
    SnapshotBuilder,
    Thresholds,
    as_utc,
    compute_lag,
    dead_letter_from_headers,
)
from veilstream.schemas import FrameRecord

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_KAFKA = 2
LAG_INTERVAL_S = 5.0
"""The dashboard refreshes lag at most this often: each refresh is a round of admin requests."""


# ------------------------------------------------------------------------------------------ kafka side


class TopicMissing(Exception):
    """A topic to read does not exist (a wrong name, or the wrong broker)."""


def measure_lag(admin: Any, consumer: Any, group: str, topics: Sequence[str] | None = None) -> ConsumerLag:
    """Lag of `group` per partition of `topics` (default: the topics the group committed offsets for)."""
    partitions: list[Any] | None = None
    if topics:
        partitions = []
        for topic in topics:
            found = topic_partitions(consumer, topic)
            if not found:  # else a mistyped topic would read as "no lag"
                raise TopicMissing(f"lag topic {topic!r} does not exist")
            partitions += found
    if hasattr(admin, "list_group_offsets"):  # kafka-python 3.x
        committed = admin.list_group_offsets({group: partitions}).get(group, {})
    else:  # kafka-python 2.x names it list_consumer_group_offsets
        committed = admin.list_consumer_group_offsets(group, partitions=partitions)
    if partitions is None:
        partitions = sorted(committed)
    if not partitions:
        return compute_lag(group, {}, {})
    end = consumer.end_offsets(partitions)
    uncommitted = [tp for tp in partitions if tp not in committed or committed[tp].offset < 0]
    beginning = consumer.beginning_offsets(uncommitted) if uncommitted else {}
    return compute_lag(
        group,
        {(tp.topic, tp.partition): offset for tp, offset in end.items()},
        {(tp.topic, tp.partition): meta.offset for tp, meta in committed.items()},
        {(tp.topic, tp.partition): offset for tp, offset in beginning.items()},
    )


def _folder(builder: SnapshotBuilder, dlq_topic: str | None, since: datetime | None) -> Callable[[Any], None]:
    """Folds one Kafka record into the builder: DLQ records by their headers only (the value is a frame),
    metrics records when they are frame records from `since` on (the Kafka timestamp only finds the start
    offset; the record's own `time` decides)."""

    def fold(record: Any) -> None:
        if dlq_topic is not None and record.topic == dlq_topic:
            dead_letter = dead_letter_from_headers(record.headers or [], record.timestamp)
            if since is None or dead_letter.time is None or dead_letter.time >= since:
                builder.add_dead_letter(dead_letter)
            return
        try:
            parsed = parse_record(record.value) if record.value is not None else None
        except ValueError:
            parsed = None
        if parsed is None:
            builder.add_invalid()
        elif isinstance(parsed, FrameRecord) and (since is None or as_utc(parsed.time) >= since):
            builder.add_frame(parsed)

    return fold


def _partitions(consumer: Any, metrics_topic: str, dlq_topic: str | None, err: TextIO) -> list[Any]:
    partitions = topic_partitions(consumer, metrics_topic)
    if not partitions:
        raise TopicMissing(f"metrics topic {metrics_topic!r} does not exist")
    if dlq_topic is not None:
        dlq = topic_partitions(consumer, dlq_topic)
        if not dlq:
            print(f"veilstream monitor: dead-letter topic {dlq_topic!r} not found: no dead letters counted", file=err)
        partitions += dlq
    return partitions


@dataclass
class _Session:
    """What one monitor run reads with: positioned partitions, the fold, and the lag probe."""

    consumer: Any
    starts: Mapping[Any, int]
    end: Mapping[Any, int]
    builder: SnapshotBuilder
    fold: Callable[[Any], None]
    admin: Any
    group_lag: str | None
    lag_topics: Sequence[str] | None
    err: TextIO
    warned_no_offsets: bool = False

    def lag(self) -> ConsumerLag | None:
        """The watched group's lag now (None when no group is watched)."""
        if self.admin is None or self.group_lag is None:
            return None
        measured = measure_lag(self.admin, self.consumer, self.group_lag, self.lag_topics)
        if not measured.partitions and not self.warned_no_offsets:
            self.warned_no_offsets = True  # once: the dashboard asks every few seconds
            print(
                f"veilstream monitor: group {self.group_lag!r} has no committed offsets: name its input topic "
                "(lag_topics / --lag-topic) to count everything retained as lag",
                file=self.err,
            )
        return measured

    def behind(self) -> int:
        """Records between the positions and the end offsets taken at start."""
        return sum(max(0, end - self.consumer.position(tp)) for tp, end in self.end.items())


# ------------------------------------------------------------------------------------------ entry point


def run_monitor(
    bootstrap: str,
    metrics_topic: str = "veilstream-metrics",
    dlq_topic: str | None = "frames-dead-letter",
    group: str | None = None,
    once: bool = False,
    as_json: bool = False,
    window_s: float = 300.0,
    thresholds: Thresholds | None = None,
    *,
    from_beginning: bool = False,
    group_lag: str | None = None,
    lag_topics: Sequence[str] | None = None,
    refresh_s: float = 2.0,
    duration_s: float | None = None,
    timeout_s: float = 60.0,
    connect_timeout_s: float = 10.0,
    display: Display = "auto",
    client_options: Mapping[str, Any] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Monitor the metrics topic; returns the exit code (0 ok, 1 threshold crossed, 2 Kafka unreadable).

    `window_s`: how far back from now to read (ignored with `from_beginning`); in live mode also the sliding
    window the dashboard shows. `dlq_topic=None`: no dead letters counted. See the module docstring for the rest.
    """
    watch_client_problems((client_options or {}).get("security_protocol"))
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    thresholds = Thresholds() if thresholds is None else thresholds
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    if thresholds.max_lag is not None and group_lag is None:
        raise ValueError("max_lag needs group_lag: the group whose lag to measure")
    consumer: Any = None
    admin: Any = None
    try:
        consumer = open_consumer(
            bootstrap, group=group, client_options=client_options, connect_timeout_s=connect_timeout_s
        )
        if group_lag is not None:
            admin = open_admin(bootstrap, client_options=client_options, connect_timeout_s=connect_timeout_s)
        partitions = _partitions(consumer, metrics_topic, dlq_topic, err)
        now = datetime.now(UTC)
        since = None if from_beginning else now - timedelta(seconds=window_s)
        end = consumer.end_offsets(partitions)
        builder = SnapshotBuilder()
        session = _Session(
            consumer=consumer,
            starts=offsets_at(consumer, partitions, since, end),
            end=end,
            builder=builder,
            fold=_folder(builder, dlq_topic, since),
            admin=admin,
            group_lag=group_lag,
            lag_topics=lag_topics,
            err=err,
        )
        if not once:
            window = None if from_beginning else window_s
            return _live(session, thresholds, window, refresh_s, duration_s, display, as_json, out)
        for record in read_range(consumer, session.starts, end, timeout_s):
            session.fold(record)
        snapshot = builder.snapshot(window_start=since, window_end=None if from_beginning else now, lag=session.lag())
        if as_json:
            print(json.dumps(snapshot.to_json(thresholds), indent=2), file=out)
        else:
            print(render_text(snapshot, thresholds), file=out)
        return EXIT_THRESHOLD if snapshot.violations(thresholds) else EXIT_OK
    except (KafkaError, OSError, TimeoutError, TopicMissing) as error:
        print(f"veilstream monitor: cannot read from Kafka at {bootstrap}: {describe_connect_failure(error)}", file=err)
        return EXIT_KAFKA
    finally:
        for client in (consumer, admin):
            if client is not None:
                with contextlib.suppress(Exception):  # closing must not hide the exit code
                    client.close()


def _live(
    session: _Session,
    thresholds: Thresholds,
    window_s: float | None,
    refresh_s: float,
    duration_s: float | None,
    display: Display,
    as_json: bool,
    out: TextIO,
) -> int:
    """The dashboard loop: poll and fold; every `refresh_s` slide the window (None: keep everything) and
    show a snapshot."""
    consumer, builder = session.consumer, session.builder
    assign_at(consumer, session.starts)
    stop_at = None if duration_s is None else time.monotonic() + duration_s
    next_refresh = next_lag = 0.0
    measured: ConsumerLag | None = None
    lag_note = ""
    snapshot: Snapshot | None = None
    with dashboard.display(display, as_json, out, refresh_s, thresholds) as show:
        try:
            while True:
                for records in consumer.poll(timeout_ms=POLL_MS).values():
                    for record in records:
                        session.fold(record)
                clock = time.monotonic()
                finished = stop_at is not None and clock >= stop_at
                if clock < next_refresh and not finished:
                    continue
                next_refresh = clock + refresh_s
                if clock >= next_lag:
                    next_lag = clock + max(refresh_s, LAG_INTERVAL_S)
                    try:
                        measured, lag_note = session.lag(), ""
                    except (KafkaError, TopicMissing) as error:  # a dashboard keeps going: it may come back
                        lag_note = f"lag unavailable: {error}"
                now = datetime.now(UTC)
                since = None if window_s is None else now - timedelta(seconds=window_s)
                if since is not None:
                    builder.discard_before(since)
                snapshot = builder.snapshot(window_start=since, window_end=None if since is None else now, lag=measured)
                behind = session.behind()
                status = f"catching up: {behind} to read" if behind else "live"
                show(snapshot, "; ".join(note for note in (status, lag_note) if note))
                if finished:
                    break
        except KeyboardInterrupt:
            pass
    if snapshot is None:
        snapshot = builder.snapshot(lag=measured)
    return EXIT_THRESHOLD if snapshot.violations(thresholds) else EXIT_OK
