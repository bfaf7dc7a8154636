"""Watching running workers: the metrics topic folded into figures (`snapshot`), shown live or checked once
against thresholds (`monitor`, `veilstream monitor`), and written up as an HTML report (`report`,
`veilstream report`)."""

from veilstream.monitoring.monitor import measure_lag, render_text, run_monitor
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
    Figures,
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
    "Figures",
    "MetricsFileError",
    "MetricsRecord",
    "MetricsSourceError",
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
