"""Builds the pipeline an entry point needs from configuration (loads every model once)."""

from __future__ import annotations

from typing import Literal

from veilstream.config import VeilstreamConfig, resolve_device
from veilstream.correction.corrector import AdaptiveCorrector
from veilstream.correction.loading import build_anonymizer, build_ensemble, correction_settings
from veilstream.detectors.config import build_detector
from veilstream.pipeline import DetectorRegionFinder, Pipeline, RegionFinder, SalientRegionFinder

RegionSource = Literal["detect", "salient"]


def build_pipeline(
    config: VeilstreamConfig, region: RegionSource = "detect", salient_size: int = 50, paper_blur: bool = False
) -> Pipeline:
    from veilstream.correction.anonymizers import GaussianBlur

    device = resolve_device(config.device)
    ensemble = build_ensemble(config.classifiers, device)
    anonymizer = GaussianBlur(kernel=9, sigma=10) if paper_blur else build_anonymizer(config.anonymizer)
    finder: RegionFinder
    residual = None
    if region == "salient":
        finder = SalientRegionFinder(ensemble.members[0], salient_size)
    else:
        detector = build_detector(config.detectors)
        finder = DetectorRegionFinder(detector, config.anonymizer.shape)
        residual = detector if config.residual_check else None
    if config.torch_threads is not None:
        import torch

        # After the detectors: ultralytics sets torch's thread count as a side effect of loading YOLO.
        torch.set_num_threads(config.torch_threads)
    corrector = AdaptiveCorrector(ensemble, correction_settings(config.correction, config.publish), device)
    return Pipeline(finder, anonymizer, corrector, config.pipeline.on_failure, residual)
