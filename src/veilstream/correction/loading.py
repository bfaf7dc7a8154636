"""Builds classifiers, anonymizers and the corrector from configuration."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from veilstream.anonymizers.filters import Anonymizer, GaussianBlur, Pixelate, SolidMask
from veilstream.config import AnonymizerConfig, ClassifierConfig, CorrectionConfig
from veilstream.correction.classifier import (
    Classifier,
    Ensemble,
    Grouping,
    Preprocessing,
    imagenet_labels,
    load_efficientnet_lite0,
    load_module_with_state,
    load_torchscript,
)
from veilstream.correction.corrector import CorrectionSettings
from veilstream.errors import ConfigError

BUILTIN_GROUPINGS = {"imagenet-vehicles": "imagenet-vehicles.yaml"}


def _labels(spec: str) -> list[str]:
    if spec == "imagenet":
        return imagenet_labels()
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _grouping(spec: str | None, labels: list[str]) -> Grouping | None:
    if spec is None:
        return None
    if spec in BUILTIN_GROUPINGS:
        with resources.as_file(resources.files("veilstream.data") / BUILTIN_GROUPINGS[spec]) as path:
            return Grouping.from_yaml(path, labels)
    return Grouping.from_yaml(Path(spec), labels)


def build_classifier(config: ClassifierConfig, device: str) -> Classifier:
    if config.source == "efficientnet-lite0":
        model = load_efficientnet_lite0()
    elif config.source == "torchscript":
        assert config.path is not None  # checked by the config model
        model = load_torchscript(config.path, device)
    else:
        assert config.factory is not None
        model = load_module_with_state(config.factory, config.state_dict, config.factory_kwargs)
    labels = _labels(config.labels)
    preprocessing = Preprocessing(config.input_size, config.channel_order, config.scale, config.mean, config.std)
    return Classifier(config.name, model, preprocessing, labels, _grouping(config.grouping, labels), device)


def build_ensemble(configs: tuple[ClassifierConfig, ...], device: str) -> Ensemble:
    return Ensemble([build_classifier(c, device) for c in configs])


def build_anonymizer(config: AnonymizerConfig) -> Anonymizer:
    if config.kind == "blur":
        return GaussianBlur(kernel=config.kernel, sigma=config.sigma, relative_sigma=config.relative_sigma)
    if config.kind == "pixelate":
        return Pixelate(blocks=config.blocks)
    return SolidMask(value=config.value)


def correction_settings(correction: CorrectionConfig) -> CorrectionSettings:
    return CorrectionSettings(
        alpha=correction.alpha,
        max_iterations=correction.max_iterations if correction.enabled else 0,
        time_budget_ms=correction.time_budget_ms,
        max_change=correction.max_change,
        stop=correction.stop,
    )
