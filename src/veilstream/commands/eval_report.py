"""`eval`'s report sink: frames.jsonl, summary.json with one `Figures` per setting, two plots, and the text table.

Eval-specific (settings of a sweep, the paper's table and plots), so it lives beside the command; the frame log
and the error list are the ones `anonymize` writes (publishing/files.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veilstream.correction.corrector import StopCriterion
from veilstream.publishing.files import FrameLog, error_entries, write_json
from veilstream.runner import Processed
from veilstream.schemas.records import FrameRecord
from veilstream.stats import figures


@dataclass(frozen=True)
class EvalSetting:
    """One setting of a sweep; its name is the `setting` of its frame records."""

    alpha: float
    stop: StopCriterion

    @property
    def name(self) -> str:
        return f"alpha={self.alpha:g} stop={self.stop}"


class ReportSink:
    """Writes every setting's frame records to frames.jsonl as they come; `close` writes summary.json (the
    first setting's figures at the top level, every setting's in `sweep`, the failed inputs of the first
    setting in `errors`, and `parameters`) and the plots iterations.png and decision_changes.png."""

    def __init__(self, folder: Path, settings: Sequence[EvalSetting], parameters: Mapping[str, Any]) -> None:
        if not settings:
            raise ValueError("an eval report needs at least one setting")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.settings = list(settings)
        self.parameters = dict(parameters)
        self.log = FrameLog(folder / "frames.jsonl")
        self.pending: list[FrameRecord] = []
        self.records: dict[str, list[FrameRecord]] = {s.name: [] for s in self.settings}

    def add(self, item: Processed) -> None:
        if item.record.setting not in self.records:
            raise ValueError(f"a record of an unknown setting: {item.record.setting!r}")
        self.pending.append(item.record)

    def flush(self) -> None:
        self.log.write(self.pending)
        for record in self.pending:
            self.records[record.setting].append(record)  # type: ignore[index]  # checked in `add`
        self.pending.clear()

    def close(self) -> dict[str, Any]:
        self.flush()
        sweep = [
            {"setting": s.name, "alpha": s.alpha, "stop": s.stop, **figures(self.records[s.name]).model_dump()}
            for s in self.settings
        ]
        summary: dict[str, Any] = {
            **sweep[0],
            "errors": error_entries(self.records[self.settings[0].name]),
            "parameters": self.parameters,
            "sweep": sweep,
        }
        write_json(self.folder / "summary.json", summary)
        _plots(self.folder, self.settings, self.records, sweep)
        return summary


def _plots(
    folder: Path,
    settings: Sequence[EvalSetting],
    records: Mapping[str, Sequence[FrameRecord]],
    sweep: Sequence[Mapping[str, Any]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    drawn = False
    for setting in settings:
        steps = [r.iterations for r in records[setting.name] if r.iterations > 0]
        if steps:
            axis.hist(steps, bins=range(1, max(steps) + 2), alpha=0.6, label=setting.name, align="left")
            drawn = True
    axis.set(xlabel="correction iterations", ylabel="frames", title="Iterations per corrected frame")
    if drawn:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "iterations.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(settings) + 2), 4))
    positions = range(len(settings))
    axis.bar([p - 0.2 for p in positions], [s["naive_changed"] for s in sweep], width=0.4, label="naive (blurred)")
    axis.bar([p + 0.2 for p in positions], [s["final_changed"] for s in sweep], width=0.4, label="corrected")
    axis.set_xticks(list(positions), [s.name for s in settings], rotation=20, fontsize=7)
    axis.set(ylabel="frames whose published decision changed", title="Decision changes: naive vs corrected")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "decision_changes.png", dpi=100)
    plt.close(figure)


# ms/frame is each frame's own time in the stages (its share of every batched stage), not its batch's time.
_COLUMNS = (
    ("alpha", "alpha", "g"),
    ("stop", "stop", ""),
    ("frames", "frames", ""),
    ("naive chg", "naive_changed", ""),
    ("final chg", "final_changed", ""),
    ("budget", "budget_exhausted", ""),
    ("mean it", "mean_iterations", ".2f"),
    ("p95 it", "p95_iterations", ".1f"),
    ("ms/frame", "mean_latency_ms", ".0f"),
)


def format_table(sweep: Sequence[Mapping[str, Any]]) -> str:
    """The sweep as an aligned text table."""
    widths = [max(len(title), 9) for title, _, _ in _COLUMNS]
    lines = [" ".join(f"{title:>{w}}" for (title, _, _), w in zip(_COLUMNS, widths, strict=True))]
    for row in sweep:
        cells = [format(row[key], spec) if row[key] is not None else "-" for _, key, spec in _COLUMNS]
        lines.append(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)
