"""The report's plots: frame records cut into time bins, drawn as PNG images (base64, for embedding).

Every figure a plot shows per bin is `stats.figures` of that bin's records (plus the monitor's p99), so a
plot and the tables cannot disagree on what a decision change or a latency percentile is.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from typing import Any

from veilstream.monitoring.snapshot import as_utc, p99_latency_ms
from veilstream.schemas import FrameRecord
from veilstream.stats import figures

NICE_BIN_SECONDS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
TARGET_BINS = 60
MAX_CAMERA_LINES = 8
"""Throughput is drawn per camera up to this many cameras; beyond, only the overall line stays readable."""


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
    frames: list[FrameRecord]

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.seconds)

    @property
    def center(self) -> datetime:
        return self.start + timedelta(seconds=self.seconds / 2)


def time_bins(frames: Sequence[FrameRecord], target: int = TARGET_BINS) -> list[TimeBin]:
    """Consecutive bins from the first frame's time to the last (empty bins kept: they are a throughput of 0).
    The last bin may be cut short by the end of the data, which understates its throughput."""
    if not frames:
        return []
    times = [as_utc(f.time) for f in frames]
    first, last = min(times), max(times)
    step = bin_seconds((last - first).total_seconds(), target)
    count = int((last - first).total_seconds() // step) + 1
    grouped: list[list[FrameRecord]] = [[] for _ in range(count)]
    for moment, frame in zip(times, frames, strict=True):
        grouped[int((moment - first).total_seconds() // step)].append(frame)
    return [TimeBin(first + timedelta(seconds=i * step), step, group) for i, group in enumerate(grouped)]


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


def _time_series_png(figure: Any, axis: Any) -> str:
    """Finish a plot of counts or times over time (from zero, legend top left) and encode it."""
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8, loc="upper left")
    _time_axis(axis)
    return _png(figure)


def _throughput(frames: Sequence[FrameRecord], seconds: int) -> float:
    return figures(frames, seconds).frames_per_second or 0.0


def plot_throughput(frames: Sequence[FrameRecord]) -> str:
    """Frames per second per time bin: overall, and per camera when there are few cameras."""
    bins = time_bins(frames)
    figure, axis = _new_figure()
    centers = [b.center for b in bins]
    axis.plot(centers, [_throughput(b.frames, b.seconds) for b in bins], color="black", linewidth=2, label="all")
    cameras = sorted({f.camera_id for f in frames})
    if 1 < len(cameras) <= MAX_CAMERA_LINES:
        for camera in cameras:
            rates = [_throughput([f for f in b.frames if f.camera_id == camera], b.seconds) for b in bins]
            axis.plot(centers, rates, linewidth=1, label=camera)
    axis.set(ylabel="frames / s", title=f"Throughput ({bins[0].seconds if bins else 0} s bins)")
    return _time_series_png(figure, axis)


def plot_decision_changes(frames: Sequence[FrameRecord]) -> str:
    """Cumulative corrected frames whose decision changed, per time bin: naive anonymization vs the published
    (final) frame. Frames the correction did not run on have no decisions and count for neither."""
    bins = time_bins(frames)
    per_bin = [figures(b.frames) for b in bins]
    naive = list(accumulate(f.naive_changed for f in per_bin))
    final = list(accumulate(f.final_changed for f in per_bin))
    # each bin's cumulative count spans the bin: the first point opens it
    ends = [bins[0].start, *(b.end for b in bins)] if bins else []
    figure, axis = _new_figure()
    axis.step(ends, naive[:1] + naive, where="pre", label=f"naive (blurred): {naive[-1] if naive else 0}")
    axis.step(
        ends, final[:1] + final, where="pre", label=f"final (published): {final[-1] if final else 0}", color="tab:red"
    )
    corrected = sum(f.corrected for f in per_bin)
    axis.set(ylabel="frames (cumulative)", title=f"Decision changes of {corrected} corrected frame(s): naive vs final")
    return _time_series_png(figure, axis)


def plot_latency(frames: Sequence[FrameRecord]) -> str:
    """p50/p95/p99 of latency_ms per time bin (bins without frames are left out)."""
    bins = [b for b in time_bins(frames) if b.frames]
    centers = [b.center for b in bins]
    per_bin = [figures(b.frames) for b in bins]
    figure, axis = _new_figure()
    axis.plot(centers, [f.p50_latency_ms for f in per_bin], marker=".", label="p50")
    axis.plot(centers, [f.p95_latency_ms for f in per_bin], marker=".", label="p95")
    axis.plot(centers, [p99_latency_ms(b.frames) for b in bins], marker=".", label="p99")
    axis.set(ylabel="latency (ms)", title=f"Latency percentiles ({bins[0].seconds if bins else 0} s bins)")
    return _time_series_png(figure, axis)


def plot_iterations(frames: Sequence[FrameRecord]) -> str:
    """Histogram of correction iterations over the frames that needed correction (the paper's convention;
    the corrected frames that needed none are counted in the title, their bar would dwarf the rest)."""
    stepped = [f.iterations for f in frames if f.corrected and f.iterations > 0]
    summary = figures(frames)
    top = max(stepped, default=1)
    figure, axis = _new_figure()
    if stepped:
        # one bar per iteration count while that stays readable; wide budgets get automatic bins
        bins: Any = list(range(1, top + 2)) if top <= 60 else 60
        axis.hist(stepped, bins=bins, align="left" if top <= 60 else "mid", color="tab:blue", edgecolor="white")
    axis.set(
        xlabel="correction iterations",
        ylabel="frames",
        title=f"Iterations per corrected frame ({summary.corrected - summary.frames_stepped} of "
        f"{summary.corrected} corrected frame(s) needed none)",
    )
    axis.grid(alpha=0.3)
    return _png(figure)
