"""`veilstream report`: a self-contained HTML report (PNG plots embedded as base64) of metrics records.

Records come from a JSONL file (one JSON record per line, e.g. a dump of the metrics topic) or straight
from the metrics topic for a time window. The report holds: a per-camera table (from the frame records of
every outcome: published, masked, dropped), throughput over time, naive vs final decision changes over time
(cumulative), latency percentiles over time, a histogram of correction iterations (plots in `plots`), and a
per-worker table (from the aggregate records). Every figure is `stats.figures` of the records it covers.

Intended CLI (the wiring lives in `veilstream.commands.cli`)::

    veilstream report (--input metrics.jsonl | --bootstrap HOST:PORT --topic T) --out DIR
        [--since WHEN] [--until WHEN] [--title TEXT] [--timeout SECONDS]

    --input        JSONL file; a bad line fails the command with its line number (MetricsFileError)
    --bootstrap    read the metrics topic instead (default topic: worker.metrics_topic of --config)
    --since/until  ISO 8601 (naive = UTC) or a duration back from now: 90s, 15m, 2h, 7d (`parse_time`);
                   applied to the records' own times (frame `time`, aggregate `window_end`)
    --out          folder; the report is OUT/index.html (printed)

Errors reading records raise MetricsSourceError (a VeilstreamError: the CLI prints it and exits 2).
"""

from __future__ import annotations

import html
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError
from pydantic import ValidationError

from veilstream.monitoring.kafka_io import offsets_at, open_consumer, read_range, topic_partitions
from veilstream.monitoring.plots import plot_decision_changes, plot_iterations, plot_latency, plot_throughput
from veilstream.monitoring.records import MetricsRecord, MetricsSourceError, load_jsonl, parse_record
from veilstream.monitoring.snapshot import as_utc, build_snapshot
from veilstream.schemas import AggregateRecord, FrameRecord

log = logging.getLogger(__name__)

UNTIL_GRACE = timedelta(seconds=60)
"""Reading a topic up to `until` stops at the first message stamped this long after it: a record's own
`time` precedes its Kafka timestamp by the worker's produce delay, which this bounds."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# ------------------------------------------------------------------------------------------ loading


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """`--since`/`--until` values: ISO 8601 (naive = UTC), `now`, or a duration back from now (90s, 15m, 2h, 7d)."""
    now = datetime.now(UTC) if now is None else as_utc(now)
    if text.strip().lower() == "now":
        return now
    match = _DURATION.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    try:
        return as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(f"bad time {text!r}: expected ISO 8601 or a duration like 90s, 15m, 2h, 7d") from None


def record_time(record: MetricsRecord) -> datetime:
    """When a record happened: a frame's `time`, an aggregate's `window_end` (UTC)."""
    return as_utc(record.time if isinstance(record, FrameRecord) else record.window_end)


def in_range(records: Iterable[MetricsRecord], since: datetime | None, until: datetime | None) -> list[MetricsRecord]:
    """The records with since <= record_time <= until (a missing bound is open)."""
    low = None if since is None else as_utc(since)
    high = None if until is None else as_utc(until)
    return [r for r in records if (low is None or record_time(r) >= low) and (high is None or record_time(r) <= high)]


def load_kafka(
    bootstrap: str,
    topic: str,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    client_options: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
    connect_timeout_s: float = 10.0,
) -> list[MetricsRecord]:
    """The metrics records of `topic` whose own time is within [since, until], read without committing.

    Messages that are not metrics records are skipped with a logged warning: a topic cannot be repaired the
    way a file can. Raises MetricsSourceError when the broker or the topic cannot be read.
    """
    consumer: Any = None
    records: list[MetricsRecord] = []
    skipped = 0
    try:
        consumer = open_consumer(bootstrap, client_options=client_options, connect_timeout_s=connect_timeout_s)
        partitions = topic_partitions(consumer, topic)
        if not partitions:
            raise MetricsSourceError(f"topic {topic!r} does not exist on {bootstrap}")
        end = consumer.end_offsets(partitions)
        starts = offsets_at(consumer, partitions, since, end)
        stops = end if until is None else offsets_at(consumer, partitions, as_utc(until) + UNTIL_GRACE, end)
        for message in read_range(consumer, starts, stops, timeout_s):
            try:
                records.append(parse_record(message.value if message.value is not None else b""))
            except ValidationError:
                skipped += 1
    except (KafkaError, OSError, TimeoutError) as error:
        raise MetricsSourceError(f"cannot read topic {topic!r} from {bootstrap}: {error}") from error
    finally:
        if consumer is not None:
            consumer.close()
    if skipped:
        log.warning("skipped %d message(s) of topic %s that are not metrics records", skipped, topic)
    return in_range(records, since, until)


def load_records(
    path: Path | None = None,
    *,
    bootstrap: str | None = None,
    topic: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    client_options: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> list[MetricsRecord]:
    """Records from a JSONL file (`path`) or a topic (`bootstrap` and `topic`), within [since, until]."""
    if path is not None:
        return in_range(load_jsonl(path), since, until)
    if bootstrap is None or topic is None:
        raise ValueError("give a JSONL path, or both bootstrap and topic")
    return load_kafka(bootstrap, topic, since, until, client_options=client_options, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------------ tables


def _cell(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


_CAMERA_COLUMNS = (
    "camera",
    "frames",
    "masked",
    "dropped",
    "fps",
    "naive chg",
    "naive rate",
    "final chg",
    "final rate",
    "budget",
    "iter mean",
    "iter p95",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "residual",
)


def camera_rows(frames: Sequence[FrameRecord]) -> list[list[str]]:
    """Per-camera rows, then the overall row ("ALL"), from the monitor's snapshot (`stats.figures` per camera).
    Decision counts are '-' where the correction ran on no frame: there are no decisions to compare."""
    snapshot = build_snapshot(frames)
    rows = []
    for name, fig in [*snapshot.cameras.items(), ("ALL", snapshot.overall)]:
        corrected = fig.corrected > 0
        rows.append(
            [
                name,
                str(fig.frames),
                str(fig.masked),
                str(fig.dropped),
                _cell(fig.frames_per_second, ".2f"),
                str(fig.naive_changed) if corrected else "-",
                _percent(fig.naive_changed_rate),
                str(fig.final_changed) if corrected else "-",
                _percent(fig.final_changed_rate),
                str(fig.budget_exhausted) if corrected else "-",
                _cell(fig.mean_iterations, ".2f"),
                _cell(fig.p95_iterations, ".1f"),
                _cell(fig.p50_latency_ms, ".0f"),
                _cell(fig.p95_latency_ms, ".0f"),
                _cell(fig.p99_latency_ms, ".0f"),
                str(fig.residual_detections),
            ]
        )
    return rows


_WORKER_COLUMNS = (
    "worker",
    "windows",
    "frames",
    "masked",
    "dead letters",
    "naive chg",
    "final chg",
    "budget",
    "residual",
    "accuracy original",
    "accuracy published",
)


def worker_rows(aggregates: Sequence[AggregateRecord]) -> list[list[str]]:
    """Per-worker sums of the aggregate records (each already `stats.figures` of its window); accuracies
    weighted by each window's labelled frames; decision counts '-' where no window corrected a frame."""
    by_worker: dict[str, list[AggregateRecord]] = defaultdict(list)
    for aggregate in aggregates:
        by_worker[aggregate.worker].append(aggregate)

    def accuracy(windows: list[AggregateRecord], pick: str) -> str:
        pairs = [(getattr(w, pick), w.labelled_frames) for w in windows if getattr(w, pick) is not None]
        labelled = sum(n for _, n in pairs)
        return _percent(sum(a * n for a, n in pairs) / labelled if labelled else None)

    def decisions(windows: list[AggregateRecord], field: str) -> str:
        corrected = any(w.corrected for w in windows)
        return str(sum(getattr(w, field) for w in windows)) if corrected else "-"

    return [
        [
            worker,
            str(len(windows)),
            str(sum(w.frames for w in windows)),
            str(sum(w.masked for w in windows)),
            str(sum(w.dead_letters for w in windows)),
            decisions(windows, "naive_changed"),
            decisions(windows, "final_changed"),
            decisions(windows, "budget_exhausted"),
            str(sum(w.residual_detections for w in windows)),
            accuracy(windows, "accuracy_original"),
            accuracy(windows, "accuracy_published"),
        ]
        for worker, windows in sorted(by_worker.items())
    ]


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------ the report

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tbody tr:last-child td { font-weight: bold; }
img { max-width: 100%; }
.meta { color: #555; }
"""


def write_report(records: Iterable[MetricsRecord], out: Path, title: str = "veilstream metrics") -> Path:
    """Write `out/index.html` (plots embedded, no other files) and return its path."""
    frames: list[FrameRecord] = []
    aggregates: list[AggregateRecord] = []
    for record in records:
        if isinstance(record, FrameRecord):
            frames.append(record)
        else:
            aggregates.append(record)
    everything: list[MetricsRecord] = [*frames, *aggregates]
    times = [record_time(r) for r in everything]
    span = f"{min(times):%Y-%m-%d %H:%M:%S} to {max(times):%Y-%m-%d %H:%M:%S} UTC" if times else "no records"
    cameras = sorted({f.camera_id for f in frames})
    workers = sorted({r.worker for r in everything})
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(span)}; {len(frames)} frame record(s), {len(aggregates)} aggregate record(s); "
        f"cameras: {html.escape(', '.join(cameras) or '-')}; workers: {html.escape(', '.join(workers) or '-')}; "
        f"generated {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC</p>",
    ]
    if frames:
        plots = [
            ("Throughput", "throughput", plot_throughput(frames)),
            ("Decision changes", "decision-changes", plot_decision_changes(frames)),
            ("Latency", "latency", plot_latency(frames)),
            ("Correction iterations", "iterations", plot_iterations(frames)),
        ]
        parts += [
            "<h2>Per camera</h2>",
            "<p class='meta'>frames: every outcome (published, masked, dropped); fps: frames over the span of "
            "frame times; decision changes and rates: over the frames the correction ran on ('-': none); "
            "iterations: mean and p95 over frames that needed correction; final change: the published decision "
            "differs from the original.</p>",
            _html_table(_CAMERA_COLUMNS, camera_rows(frames)),
        ]
        for heading, name, png in plots:
            parts.append(f"<h2>{heading}</h2><img id='{name}' alt='{heading}' src='data:image/png;base64,{png}'>")
    else:
        parts.append("<p>No frame records: no per-camera figures or plots.</p>")
    if aggregates:
        parts += ["<h2>Workers (aggregate records)</h2>", _html_table(_WORKER_COLUMNS, worker_rows(aggregates))]
    parts.append("</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
