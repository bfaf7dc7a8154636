"""How `veilstream monitor` shows a snapshot: plain text, a rich table, or JSON lines, refreshed in place."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from veilstream.monitoring.snapshot import MonitorFigures, Snapshot, Thresholds

Display = Literal["auto", "rich", "plain"]

# short headers keep the 14 columns within 100 terminal columns; the legend line spells them out
HEADERS = (
    "camera",
    "frames",
    "fps",
    "naive",
    "final",
    "budget",
    "it mean",
    "it p95",
    "p50",
    "p95",
    "p99",
    "m/d",
    "DLQ",
    "resid",
)
LEGEND = (
    "naive/final: corrected frames whose decision naive anonymization / the published frame changed "
    "('-': no correction ran); budget: budget exhausted; it: correction iterations of frames that needed "
    "correction; p50-p99: latency ms; m/d: masked/dropped frames; DLQ: dead-letter topic; resid: residual detections"
)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(name: str, figures: MonitorFigures) -> list[str]:
    """One table row; rates as percentages next to the counts they come from. Decision figures are '-' where
    no frame was corrected: a frame without decisions is neither a change nor a kept decision."""
    corrected = figures.corrected > 0
    rate = figures.naive_changed_rate
    percent = "-" if rate is None else f"{100 * rate:.1f}%"
    return [
        name,
        str(figures.frames),
        _number(figures.frames_per_second, ".2f"),
        f"{figures.naive_changed} ({percent})" if corrected else "-",
        str(figures.final_changed) if corrected else "-",
        str(figures.budget_exhausted) if corrected else "-",
        _number(figures.mean_iterations, ".2f"),
        _number(figures.p95_iterations, ".1f"),
        _number(figures.p50_latency_ms, ".0f"),
        _number(figures.p95_latency_ms, ".0f"),
        _number(figures.p99_latency_ms, ".0f"),
        f"{figures.masked}/{figures.dropped}",
        str(figures.dead_letter_messages),
        str(figures.residual_detections),
    ]


def _rows(snapshot: Snapshot) -> list[list[str]]:
    return [_cells(camera, figures) for camera, figures in snapshot.cameras.items()] + [_cells("ALL", snapshot.overall)]


def _moment(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def summary_lines(snapshot: Snapshot, status: str = "") -> list[str]:
    """The lines above the table: window, workers, outcomes, dead-letter reasons, lag."""
    seconds = "" if snapshot.window_seconds is None else f" ({snapshot.window_seconds:.0f} s)"
    lines = [
        f"window {_moment(snapshot.window_start)} -> {_moment(snapshot.window_end)} UTC{seconds}"
        f"   workers: {', '.join(snapshot.workers) or '-'}" + (f"   [{status}]" if status else "")
    ]
    overall = snapshot.overall
    if overall.frames:
        lines.append(
            f"outcomes: {overall.published} published, {overall.masked} masked, {overall.dropped} dropped;"
            f" correction ran on {overall.corrected}"
        )
    reasons = overall.dead_letters_by_reason
    if reasons:
        lines.append("dead letters: " + ", ".join(f"{reason} {count}" for reason, count in reasons.items()))
    if snapshot.invalid_records:
        lines.append(f"invalid records on the metrics topic: {snapshot.invalid_records}")
    if snapshot.lag is not None:
        parts = ", ".join(f"{p.topic}/{p.partition}: {p.lag}" for p in snapshot.lag.partitions)
        lines.append(f"lag of group {snapshot.lag.group}: {snapshot.lag.total}" + (f" ({parts})" if parts else ""))
    return lines


def render_text(snapshot: Snapshot, thresholds: Thresholds | None = None, status: str = "") -> str:
    """The snapshot as plain text: summary lines, an aligned table (cameras, then ALL), violations."""
    rows = [list(HEADERS), *_rows(snapshot)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    table = [
        # names left, numbers right
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines = [*summary_lines(snapshot, status), "", *table, LEGEND]
    if thresholds is not None:
        violations = snapshot.violations(thresholds)
        lines += ["", *(f"VIOLATION: {v}" for v in violations)] if violations else ["", "thresholds: ok"]
    return "\n".join(lines)


def render_rich(snapshot: Snapshot, thresholds: Thresholds | None = None, status: str = "") -> Any:
    """The snapshot as a rich renderable (needs `rich`)."""
    from rich import box  # type: ignore[import-not-found, unused-ignore]
    from rich.console import Group  # type: ignore[import-not-found, unused-ignore]
    from rich.table import Table  # type: ignore[import-not-found, unused-ignore]
    from rich.text import Text  # type: ignore[import-not-found, unused-ignore]

    # no vertical rules, one space between columns: the 14 columns fit a 90-column terminal
    table = Table(
        title="veilstream monitor", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0)
    )
    for index, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if index == 0 else "right", no_wrap=True)
    rows = _rows(snapshot)
    for index, row in enumerate(rows):
        last = index == len(rows) - 1
        table.add_row(*row, style="bold" if last else None, end_section=index == len(rows) - 2)
    parts: list[Any] = [Text("\n".join(summary_lines(snapshot, status))), table, Text(LEGEND, style="dim")]
    if thresholds is not None:
        violations = snapshot.violations(thresholds)
        for violation in violations:
            parts.append(Text(f"VIOLATION: {violation}", style="bold red"))
        if not violations:
            parts.append(Text("thresholds: ok", style="green"))
    return Group(*parts)


def rich_available() -> bool:
    """Whether the optional `rich` package is installed (else the dashboard reprints plain text)."""
    return importlib.util.find_spec("rich") is not None


@contextlib.contextmanager
def display(
    kind: Display, as_json: bool, out: TextIO, refresh_s: float, thresholds: Thresholds
) -> Iterator[Callable[[Snapshot, str], None]]:
    """A function showing one snapshot with a status note: JSON lines, rich Live, or a plain reprint."""
    if kind == "auto":
        kind = "rich" if rich_available() and out.isatty() else "plain"
    if as_json:
        yield lambda snapshot, status: print(json.dumps(snapshot.to_json(thresholds)), file=out, flush=True)
    elif kind == "rich":
        from rich.console import Console  # type: ignore[import-not-found, unused-ignore]
        from rich.live import Live  # type: ignore[import-not-found, unused-ignore]

        with Live(console=Console(file=out), refresh_per_second=max(1.0, 1 / refresh_s)) as live:
            yield lambda snapshot, status: live.update(render_rich(snapshot, thresholds, status))
    else:
        clear = "\x1b[H\x1b[2J" if out.isatty() else ""  # a log file gets one block per refresh instead

        def show(snapshot: Snapshot, status: str) -> None:
            print(clear + render_text(snapshot, thresholds, status) + "\n", file=out, flush=True)

        yield show
