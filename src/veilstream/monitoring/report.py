"""`veilstream report`: a self-contained HTML report (PNG plots embedded as base64) of metrics records.

Records come from a JSONL file (one JSON record per line, e.g. a dump of the metrics topic) or straight
from the metrics topic for a time window. The report holds: a per-camera table (from the frame records),
throughput over time, naive vs final decision changes over time (cumulative), latency percentiles over
time, a histogram of correction iterations, and a per-worker table (from the aggregate records; the only
place dead letters appear, since the metrics topic carries no dead-letter messages).

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

import base64
import html
import io
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError
from pydantic import ValidationError

from veilstream.monitoring.kafka_io import offsets_at, open_consumer, read_range, topic_partitions
from veilstream.monitoring.records import MetricsRecord, MetricsSourceError, load_jsonl, parse_record
from veilstream.monitoring.snapshot import as_utc, build_snapshot
from veilstream.schemas import AggregateMetrics, FrameMetrics
from veilstream.stats import percentile

log = logging.getLogger(__name__)

NICE_BIN_SECONDS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
TARGET_BINS = 60
MAX_CAMERA_LINES = 8
"""Throughput is drawn per camera up to this many cameras; beyond, only the overall line stays readable."""
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
    return as_utc(record.time if isinstance(record, FrameMetrics) else record.window_end)


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


# ------------------------------------------------------------------------------------------ time series


def bin_seconds(span_s: float, target: int = TARGET_BINS) -> int:
    """The smallest round bin width that cuts `span_s` into at most `target` bins."""
    for step in NICE_BIN_SECONDS:
        if span_s / step <= target:
            return step
    return math.ceil(span_s / target / 86400) * 86400


@dataclass(frozen=True)
class TimeBin:
    """Frames whose time falls in [start, start + seconds)."""

    start: datetime
    seconds: int
    frames: list[FrameMetrics]


def time_bins(frames: Sequence[FrameMetrics], target: int = TARGET_BINS) -> list[TimeBin]:
    """Consecutive bins from the first frame's time to the last (empty bins kept: they are a throughput of 0).
    The last bin may be cut short by the end of the data, which understates its throughput."""
    if not frames:
        return []
    times = [as_utc(f.time) for f in frames]
    first, last = min(times), max(times)
    step = bin_seconds((last - first).total_seconds(), target)
    count = int((last - first).total_seconds() // step) + 1
    grouped: list[list[FrameMetrics]] = [[] for _ in range(count)]
    for moment, frame in zip(times, frames, strict=True):
        grouped[int((moment - first).total_seconds() // step)].append(frame)
    return [TimeBin(first + timedelta(seconds=i * step), step, group) for i, group in enumerate(grouped)]


# ------------------------------------------------------------------------------------------ plots


def _new_figure() -> tuple[Any, Any]:
    # Figure without pyplot: no global state and no GUI backend, so reports work headless and in threads.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    return figure, figure.subplots()


def _time_axis(axis: Any) -> None:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    # matplotlib.dates leaves these constructors unannotated
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    axis.xaxis.set_major_locator(locator)
    axis.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))  # type: ignore[no-untyped-call]
    axis.set_xlabel("time (UTC)")
    axis.grid(alpha=0.3)


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _centers(bins: Sequence[TimeBin]) -> list[datetime]:
    return [b.start + timedelta(seconds=b.seconds / 2) for b in bins]


def plot_throughput(frames: Sequence[FrameMetrics]) -> str:
    """Frames per second per time bin: overall, and per camera when there are few cameras."""
    bins = time_bins(frames)
    figure, axis = _new_figure()
    centers = _centers(bins)
    axis.plot(centers, [len(b.frames) / b.seconds for b in bins], color="black", linewidth=2, label="all")
    cameras = sorted({f.camera_id for f in frames})
    if 1 < len(cameras) <= MAX_CAMERA_LINES:
        for camera in cameras:
            rates = [sum(f.camera_id == camera for f in b.frames) / b.seconds for b in bins]
            axis.plot(centers, rates, linewidth=1, label=camera)
    axis.set(ylabel="frames / s", title=f"Throughput ({bins[0].seconds if bins else 0} s bins)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8, loc="upper left")
    _time_axis(axis)
    return _png(figure)


def plot_decision_changes(frames: Sequence[FrameMetrics]) -> str:
    """Cumulative frames whose decision changed: naive anonymization vs the published (final) frame."""
    ordered = sorted(frames, key=lambda f: as_utc(f.time))
    times = [as_utc(f.time) for f in ordered]
    naive, final = [], []
    naive_total = final_total = 0
    for frame in ordered:
        naive_total += frame.naive_changed
        final_total += not frame.consistent
        naive.append(naive_total)
        final.append(final_total)
    figure, axis = _new_figure()
    axis.step(times, naive, where="post", label=f"naive (blurred): {naive_total}")
    axis.step(times, final, where="post", label=f"final (published): {final_total}", color="tab:red")
    axis.set(ylabel="frames (cumulative)", title="Decision changes: naive vs final")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8, loc="upper left")
    _time_axis(axis)
    return _png(figure)


def plot_latency(frames: Sequence[FrameMetrics]) -> str:
    """p50/p95/p99 of latency_ms per time bin (bins without frames are left out)."""
    bins = [b for b in time_bins(frames) if b.frames]
    centers = _centers(bins)
    figure, axis = _new_figure()
    for q in (50, 95, 99):
        axis.plot(centers, [percentile([f.latency_ms for f in b.frames], q) for b in bins], marker=".", label=f"p{q}")
    axis.set(ylabel="latency (ms)", title=f"Latency percentiles ({bins[0].seconds if bins else 0} s bins)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8, loc="upper left")
    _time_axis(axis)
    return _png(figure)


def plot_iterations(frames: Sequence[FrameMetrics]) -> str:
    """Histogram of correction iterations over the frames that needed correction (the paper's convention;
    the frames that needed none are counted in the title, their bar would dwarf the rest)."""
    stepped = [f.iterations for f in frames if f.iterations > 0]
    top = max(stepped, default=1)
    figure, axis = _new_figure()
    if stepped:
        # one bar per iteration count while that stays readable; wide budgets get automatic bins
        bins: Any = list(range(1, top + 2)) if top <= 60 else 60
        axis.hist(stepped, bins=bins, align="left" if top <= 60 else "mid", color="tab:blue", edgecolor="white")
    axis.set(
        xlabel="correction iterations",
        ylabel="frames",
        title=f"Iterations per corrected frame ({len(frames) - len(stepped)} frame(s) needed none)",
    )
    axis.grid(alpha=0.3)
    return _png(figure)


# ------------------------------------------------------------------------------------------ tables


def _cell(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


_CAMERA_COLUMNS = (
    "camera",
    "frames",
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


def camera_rows(frames: Sequence[FrameMetrics]) -> list[list[str]]:
    """Per-camera rows, then the overall row ("ALL"), from the monitor's snapshot figures."""
    snapshot = build_snapshot(frames)
    rows = []
    for name, fig in [*snapshot.cameras.items(), ("ALL", snapshot.overall)]:
        rows.append(
            [
                name,
                str(fig.frames),
                _cell(fig.frames_per_second, ".2f"),
                str(fig.naive_changed),
                _percent(fig.naive_change_rate),
                str(fig.final_changed),
                _percent(fig.final_change_rate),
                str(fig.budget_exhausted),
                _cell(fig.mean_iterations, ".2f"),
                _cell(fig.p95_iterations, ".1f"),
                _cell(fig.latency_p50_ms, ".0f"),
                _cell(fig.latency_p95_ms, ".0f"),
                _cell(fig.latency_p99_ms, ".0f"),
                str(fig.residual_detections),
            ]
        )
    return rows


_WORKER_COLUMNS = (
    "worker",
    "windows",
    "frames",
    "dead letters",
    "naive chg",
    "final chg",
    "budget",
    "residual",
    "accuracy original",
    "accuracy published",
)


def worker_rows(aggregates: Sequence[AggregateMetrics]) -> list[list[str]]:
    """Per-worker sums of the aggregate records; accuracies weighted by each window's labelled frames."""
    by_worker: dict[str, list[AggregateMetrics]] = defaultdict(list)
    for aggregate in aggregates:
        by_worker[aggregate.worker].append(aggregate)

    def accuracy(windows: list[AggregateMetrics], pick: str) -> str:
        pairs = [(getattr(w, pick), w.labelled_frames) for w in windows if getattr(w, pick) is not None]
        labelled = sum(n for _, n in pairs)
        return _percent(sum(a * n for a, n in pairs) / labelled if labelled else None)

    return [
        [
            worker,
            str(len(windows)),
            str(sum(w.frames for w in windows)),
            str(sum(w.dead_letters for w in windows)),
            str(sum(w.naive_changed for w in windows)),
            str(sum(w.final_changed for w in windows)),
            str(sum(w.budget_exhausted for w in windows)),
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


def write_report(
    records: Iterable[FrameMetrics | AggregateMetrics], out: Path, title: str = "veilstream metrics"
) -> Path:
    """Write `out/index.html` (plots embedded, no other files) and return its path."""
    frames: list[FrameMetrics] = []
    aggregates: list[AggregateMetrics] = []
    for record in records:
        if isinstance(record, FrameMetrics):
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
            "<p class='meta'>fps: frames over the span of frame times; iterations: mean and p95 over frames "
            "that needed correction; final change: the published decision differs from the original.</p>",
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
