"""Watching running workers: the metrics topic folded into figures (`snapshot`: `stats.figures` per camera),
shown live or checked once against thresholds (`monitor`, `dashboard`, `veilstream monitor`), and written up
as an HTML report (`report`, `plots`, `veilstream report`)."""

from veilstream.monitoring.dashboard import render_text
from veilstream.monitoring.monitor import measure_lag, run_monitor
from veilstream.monitoring.records import (
    MetricsFileError,
    MetricsRecord,
    MetricsSourceError,
    load_jsonl,
    parse_record,
)
from veilstream.monitoring.report import load_kafka, load_records, parse_time, write_report
from veilstream.monitoring.snapshot import (
    ConsumerLag,
    DeadLetter,
    MonitorFigures,
    PartitionLag,
    Snapshot,
    SnapshotBuilder,
    Thresholds,
    build_snapshot,
    compute_lag,
    dead_letter_from_headers,
)

__all__ = [
    "ConsumerLag",
    "DeadLetter",
    "MetricsFileError",
    "MetricsRecord",
    "MetricsSourceError",
    "MonitorFigures",
    "PartitionLag",
    "Snapshot",
    "SnapshotBuilder",
    "Thresholds",
    "build_snapshot",
    "compute_lag",
    "dead_letter_from_headers",
    "load_jsonl",
    "load_kafka",
    "load_records",
    "measure_lag",
    "parse_record",
    "parse_time",
    "render_text",
    "run_monitor",
    "write_report",
]
