"""`veilstream eval`: the paper's experiment on real frames, with the published-bytes check."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from veilstream.decoding.images import DecodeLimits
from veilstream.config import VeilstreamConfig
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings, StopCriterion
from veilstream.pipeline import FrameOutcome, Pipeline
from veilstream.decoding.files import InputFailure, SourceFrame, iter_frames
from veilstream.stats import json_safe, summarize_frames


@dataclass(frozen=True)
class EvalRun:
    """One setting of a sweep."""

    alpha: float
    stop: StopCriterion

    @property
    def name(self) -> str:
        return f"alpha={self.alpha:g} stop={self.stop}"


def _batches(items: Iterator[SourceFrame | InputFailure], size: int) -> Iterator[list[SourceFrame | InputFailure]]:
    while batch := list(islice(items, size)):
        yield batch


def frame_record(source: SourceFrame, run: EvalRun, outcome: FrameOutcome) -> dict[str, Any]:
    """One line of frames.jsonl."""
    record: dict[str, Any] = {"source": source.source, "index": source.index, "alpha": run.alpha, "stop": run.stop}
    if outcome.found is not None:
        record |= {"faces": outcome.found.faces, "plates": outcome.found.plates, "regions": len(outcome.found.regions)}
    result = outcome.correction
    if result is None:
        assert outcome.error is not None
        return record | {"error": outcome.error.reason, "detail": outcome.error.detail}
    return record | {
        "original": [asdict(d) for d in result.original],
        "naive": [asdict(d) for d in result.naive],
        "final": [asdict(d) for d in result.final],
        "naive_changed": result.naive_changed,
        "corrected_changed": not result.consistent,
        "consistent": result.consistent,
        "budget_exhausted": result.budget_exhausted,
        "stop_reason": result.stop_reason,
        "iterations": result.iterations,
        "ms": result.elapsed_ms,
        "max_pixel_change": result.max_pixel_change,
        "published_bytes": len(result.published),
    }


def run_eval(
    paths: Sequence[Path],
    pipeline: Pipeline,
    config: VeilstreamConfig,
    runs: Sequence[EvalRun],
    report: Path,
    video_step: int = 10,
    parameters: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every setting on the same regions and anonymized frames; write summary.json, frames.jsonl, plots."""
    report.mkdir(parents=True, exist_ok=True)
    base = pipeline.corrector.settings
    correctors = {
        run: AdaptiveCorrector(
            pipeline.corrector.ensemble,
            CorrectionSettings(
                alpha=run.alpha,
                max_iterations=base.max_iterations,
                time_budget_ms=base.time_budget_ms,
                max_change=base.max_change,
                stop=run.stop,
                codec=base.codec,
                quality=base.quality,
            ),
            pipeline.device,
        )
        for run in runs
    }
    records: dict[EvalRun, list[dict[str, Any]]] = {run: [] for run in runs}
    errors: list[dict[str, str]] = []
    limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
    items = iter_frames(paths, video_step=video_step, limits=limits)
    bar = tqdm(desc="eval", unit="frame", disable=not progress)
    with (report / "frames.jsonl").open("w") as out:
        for batch in _batches(items, config.pipeline.batch_size):
            errors.extend(
                {"source": f.source, "reason": f.reason, "detail": f.detail}
                for f in batch
                if isinstance(f, InputFailure)
            )
            frames = [f for f in batch if isinstance(f, SourceFrame)]
            if not frames:
                continue
            prepared = pipeline.prepare([f.frame for f in frames])
            for run in runs:
                for source, outcome in zip(frames, pipeline.correct(prepared, correctors[run]), strict=True):
                    record = frame_record(source, run, outcome)
                    out.write(json.dumps(record) + "\n")
                    if outcome.error is not None:
                        if run == runs[0]:
                            errors.append(
                                {
                                    "source": source.source,
                                    "reason": outcome.error.reason,
                                    "detail": outcome.error.detail,
                                }
                            )
                    else:
                        records[run].append(record)
            bar.update(len(frames))
    bar.close()
    sweep = [{"alpha": run.alpha, "stop": run.stop, **summarize_frames(records[run])} for run in runs]
    summary: dict[str, Any] = {
        **sweep[0],
        "errors": errors,
        "parameters": parameters or {},
        "sweep": sweep,
    }
    (report / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
    _plots(report, runs, records, sweep)
    return summary


def _plots(
    report: Path, runs: Sequence[EvalRun], records: dict[EvalRun, list[dict[str, Any]]], sweep: list[dict[str, Any]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for run in runs:
        steps = [r["iterations"] for r in records[run] if r["iterations"] > 0]
        if steps:
            axis.hist(steps, bins=range(1, max(steps) + 2), alpha=0.6, label=run.name, align="left")
    axis.set(xlabel="correction iterations", ylabel="frames", title="Iterations per corrected frame")
    if any(records[run] for run in runs):
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(report / "iterations.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 2), 4))
    positions = range(len(runs))
    axis.bar([p - 0.2 for p in positions], [s["naive_changed"] for s in sweep], width=0.4, label="naive (blurred)")
    axis.bar([p + 0.2 for p in positions], [s["corrected_changed"] for s in sweep], width=0.4, label="corrected")
    axis.set_xticks(list(positions), [run.name for run in runs], rotation=20, fontsize=7)
    axis.set(ylabel="frames whose published decision changed", title="Decision changes: naive vs corrected")
    axis.legend()
    figure.tight_layout()
    figure.savefig(report / "decision_changes.png", dpi=100)
    plt.close(figure)


_COLUMNS = (
    ("alpha", "alpha", "g"),
    ("stop", "stop", ""),
    ("frames", "frames", ""),
    ("naive chg", "naive_changed", ""),
    ("final chg", "corrected_changed", ""),
    ("budget", "budget_exhausted", ""),
    ("mean it", "mean_iterations", ".2f"),
    ("p95 it", "p95_iterations", ".1f"),
    ("ms/frame", "mean_ms_per_frame", ".0f"),
)


def format_table(sweep: Sequence[dict[str, Any]]) -> str:
    """The sweep as an aligned text table."""
    widths = [max(len(title), 9) for title, _, _ in _COLUMNS]
    lines = [" ".join(f"{title:>{w}}" for (title, _, _), w in zip(_COLUMNS, widths, strict=True))]
    for row in sweep:
        cells = [format(row[key], spec) if row[key] is not None else "-" for _, key, spec in _COLUMNS]
        lines.append(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)
