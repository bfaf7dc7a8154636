"""`veilstream eval`: the paper's experiment on real frames, with the published-bytes check.

Files -> the shared pipeline (regions found and anonymized once per batch) -> one corrector per setting -> the
report sink. Every setting sees the same regions and anonymized frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from veilstream.commands.eval_report import EvalSetting, ReportSink, format_table
from veilstream.config import VeilstreamConfig
from veilstream.correction.corrector import AdaptiveCorrector
from veilstream.decoding.files import file_items
from veilstream.decoding.images import DecodeLimits
from veilstream.errors import ConfigError
from veilstream.factory import build_corrector
from veilstream.pipeline import Pipeline
from veilstream.runner import Runner

__all__ = ["EvalSetting", "format_table", "run_eval", "setting_correctors"]


def setting_correctors(
    config: VeilstreamConfig, pipeline: Pipeline, settings: Sequence[EvalSetting]
) -> dict[str, AdaptiveCorrector]:
    """One corrector per setting: the pipeline's correction settings with the setting's alpha and stop."""
    if pipeline.corrector is None:
        raise ConfigError("eval needs the classifiers: build the pipeline with need_classifiers=True")
    base = pipeline.corrector.settings
    ensemble = pipeline.corrector.ensemble
    return {
        s.name: build_corrector(config, ensemble, str(pipeline.device), replace(base, alpha=s.alpha, stop=s.stop))
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
) -> dict[str, Any]:
    """Run every setting on the same frames; write frames.jsonl, summary.json and the plots into `report`."""
    sink = ReportSink(report, settings, parameters or {})
    runner = Runner(
        pipeline,
        [sink],
        config.pipeline.batch_size,
        worker="eval",
        variants=setting_correctors(config, pipeline, settings),
    )
    limits = DecodeLimits(config.decode.min_side, config.decode.max_pixels)
    items = file_items(paths, video_step=video_step, limits=limits)
    runner.run(tqdm(items, desc="eval", unit="frame", disable=not progress))
    return sink.close()
