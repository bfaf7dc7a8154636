"""`veilstream eval`: the paper's experiment on real frames, with the published-bytes check.

Files -> the shared pipeline (regions found and anonymized once per batch) -> one corrector per setting -> the
report sink. Every setting sees the same regions and anonymized frames.

`--check-with`: classifiers that are NOT corrected against decide on the original and on every setting's
published bytes (and on the naive blur's, encoded alike): the transfer report, per model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from veilstream.commands.eval_report import EvalSetting, ReportSink, format_table
from veilstream.commands.eval_transfer import NAIVE, OnlySettings, TransferSink, format_models, model_rows
from veilstream.config import VeilstreamConfig
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector
from veilstream.decoding.files import file_items
from veilstream.decoding.images import DecodeLimits
from veilstream.errors import ConfigError
from veilstream.factory import build_corrector
from veilstream.pipeline import Pipeline
from veilstream.publishing.files import write_json
from veilstream.runner import Runner

__all__ = ["EvalSetting", "format_models", "format_table", "run_eval", "setting_correctors"]


def setting_correctors(
    config: VeilstreamConfig, pipeline: Pipeline, settings: Sequence[EvalSetting]
) -> dict[str, AdaptiveCorrector]:
    """One corrector per setting: the pipeline's correction settings with the setting's alpha and stop (one step
    at a time for the float stop: a line search tries its steps on the published bytes)."""
    if pipeline.corrector is None:
        raise ConfigError("eval needs the classifiers: build the pipeline with need_classifiers=True")
    base = pipeline.corrector.settings
    ensemble = pipeline.corrector.ensemble
    return {
        s.name: build_corrector(
            config,
            ensemble,
            str(pipeline.device),
            replace(
                base, alpha=s.alpha, stop=s.stop, step_scales=base.step_scales if s.stop == "published" else (1.0,)
            ),
        )
        for s in settings
    }


def run_eval(
    paths: Sequence[Path],
    pipeline: Pipeline,
    config: VeilstreamConfig,
    settings: Sequence[EvalSetting],
    report: Path,
    video_step: int = 10,
    parameters: Mapping[str, Any] | None = None,
    progress: bool = True,
    checkers: Ensemble | None = None,
) -> dict[str, Any]:
    """Run every setting on the same frames; write frames.jsonl, summary.json and the plots into `report`.
    With `checkers`, summary.json also has `models`: per classifier, corrected against or only checked, the
    frames whose decision changed on the naive and on the first setting's published bytes; and each `sweep` row
    the checked classifiers' changes under `checked_final_changed`."""
    sink = ReportSink(report, settings, parameters or {})
    variants = setting_correctors(config, pipeline, settings)
    sinks: list[Any] = [sink]
    transfer = None
    if checkers is not None:
        assert pipeline.corrector is not None  # setting_correctors checked it
        uncorrected = replace(pipeline.corrector.settings, max_iterations=0)
        variants[NAIVE] = build_corrector(config, pipeline.corrector.ensemble, str(pipeline.device), uncorrected)
        transfer = TransferSink(checkers, [NAIVE, *(s.name for s in settings)])
        sinks = [OnlySettings(sink, {s.name for s in settings}), transfer]
    runner = Runner(pipeline, sinks, config.pipeline.batch_size, worker="eval", variants=variants)
    limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
    items = file_items(paths, video_step=video_step, limits=limits)
    runner.run(tqdm(items, desc="eval", unit="frame", disable=not progress))
    summary = sink.close()
    if transfer is not None:
        _add_transfer(summary, sink, transfer, settings)
        write_json(report / "summary.json", summary)
    return summary


def _add_transfer(
    summary: dict[str, Any], sink: ReportSink, transfer: TransferSink, settings: Sequence[EvalSetting]
) -> None:
    summary["models"] = model_rows(sink.records[settings[0].name], transfer, settings[0].name)
    for row in summary["sweep"]:
        row["checked_final_changed"] = transfer.changed[row["setting"]]
