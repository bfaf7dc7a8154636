"""Builds the pipeline an entry point needs from configuration (loads every model once, on one device)."""

from __future__ import annotations

from typing import Literal

from veilstream.config import VeilstreamConfig, resolve_device
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.correction.loading import build_anonymizer, build_ensemble, correction_settings
from veilstream.detectors.config import build_detector, build_memory
from veilstream.detectors.finders import DetectorRegionFinder, RegionFinder, SalientRegionFinder
from veilstream.detectors.leakcheck import LeakCheck
from veilstream.pipeline import FailurePolicy, Pipeline
from veilstream.publishing.encoding import Encoder

RegionSource = Literal["detect", "salient"]


def build_encoder(config: VeilstreamConfig, device: str = "cpu") -> Encoder:
    """The publish codec on `device` (JPEG through nvJPEG on CUDA where torchvision has it)."""
    return Encoder(config.publish.codec, config.publish.quality, device)


def build_corrector(
    config: VeilstreamConfig, ensemble: Ensemble, device: str, settings: CorrectionSettings | None = None
) -> AdaptiveCorrector:
    settings = settings or correction_settings(config.correction)
    return AdaptiveCorrector(ensemble, settings, device, encoder=build_encoder(config, device))


def build_leak_check(config: VeilstreamConfig, device: str) -> LeakCheck | None:
    """The independent leak check the configuration asks for (loads its model), None when it is off."""
    settings = config.pipeline.leak_check
    if settings.detector == "off":
        return None
    from veilstream.detectors.mtcnn import MtcnnFaces

    padding = config.detectors.padding.get("face", 0.0)
    return LeakCheck(MtcnnFaces(device=device), settings.every, settings.on_leak, padding)


def build_pipeline(
    config: VeilstreamConfig,
    region: RegionSource = "detect",
    salient_size: int = 50,
    paper_blur: bool = False,
    need_classifiers: bool = False,
) -> Pipeline:
    """With `correction.enabled: false` no classifier is loaded or run, unless `need_classifiers` (eval) or the
    salient region (the classifier's own saliency) asks for one."""
    from veilstream.anonymizers.filters import GaussianBlur

    device = resolve_device(config.device)
    correcting = config.correction.enabled or need_classifiers
    ensemble = build_ensemble(config.classifiers, device) if correcting or region == "salient" else None
    anonymizer = GaussianBlur(kernel=9, sigma=10) if paper_blur else build_anonymizer(config.anonymizer)
    finder: RegionFinder
    leak_detector = None
    memory = None
    if region == "salient":
        assert ensemble is not None
        finder = SalientRegionFinder(tuple(ensemble.members), salient_size)
    else:
        detector = build_detector(config.detectors, device)
        finder = DetectorRegionFinder(detector, config.anonymizer.shape)
        if config.pipeline.residual_check != "off":
            # Its own models: with pipeline.overlap the residual check runs while the next batch is detected,
            # and ultralytics' predictors are not thread-safe.
            leak_detector = build_detector(config.detectors, device) if config.pipeline.overlap else detector
        memory = build_memory(config.detectors.memory)
    if config.torch_threads is not None:
        import torch

        # After the detectors: ultralytics sets torch's thread count as a side effect of loading YOLO.
        torch.set_num_threads(config.torch_threads)
    corrector = build_corrector(config, ensemble, device) if correcting and ensemble is not None else None
    policy = FailurePolicy(
        config.pipeline.on_failure,
        config.pipeline.residual_check,
        config.pipeline.residual_scope,
        guard_correction=config.correction.guard,
    )
    return Pipeline(
        finder,
        anonymizer,
        build_encoder(config, device),
        corrector,
        policy,
        leak_detector,
        device,
        memory=memory,
        leak_check=build_leak_check(config, device),
        shape=config.anonymizer.shape,
    )
