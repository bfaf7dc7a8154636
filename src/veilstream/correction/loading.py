"""Builds classifiers, anonymizers and the corrector from configuration."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from veilstream.anonymizers.filters import Anonymizer, GaussianBlur, Pixelate, SolidMask
from veilstream.config import BUILTIN_CLASSIFIERS, AnonymizerConfig, ClassifierConfig, CorrectionConfig
from veilstream.correction.classifier import Classifier, Ensemble, Grouping, Preprocessing
from veilstream.correction.corrector import CorrectionSettings
from veilstream.correction.models import (
    imagenet_labels,
    load_builtin,
    load_module_with_state,
    load_onnx,
    load_torchscript,
    native_input_size,
)
from veilstream.errors import ConfigError, ModelLoadError

BUILTIN_GROUPINGS = {"imagenet-vehicles": "imagenet-vehicles.yaml"}
# alpha when the config leaves it out: the paper's 0.1 for its max-normalised step; 0.03 for sign steps, which
# move every region pixel (measured on real frames: README, "Your own classifier").
DEFAULT_ALPHA = {"max": 0.1, "sign": 0.03}


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
    inference = None
    input_size = config.input_size
    if config.source in BUILTIN_CLASSIFIERS:
        model = load_builtin(config.source)
    elif config.source == "torchscript":
        assert config.path is not None  # checked by the config model
        model = load_torchscript(config.path, device)
    elif config.source == "onnx":
        assert config.path is not None
        exported = load_onnx(config.path, device)
        model, inference = exported.torch_module, exported.run
        if input_size is None:
            input_size = exported.input_size
        elif exported.input_size not in (None, input_size):
            raise ConfigError(
                f"{config.name}: input_size {list(input_size)}, but {config.path} takes {list(exported.input_size)}"
            )
        if input_size is None:
            raise ConfigError(f"{config.name}: {config.path} has a dynamic input size: set input_size [height, width]")
    else:
        assert config.factory is not None
        model = load_module_with_state(config.factory, config.state_dict, config.factory_kwargs)
    assert input_size is not None  # the config model requires it for the other sources
    declared = native_input_size(model)
    if declared is not None and declared != input_size:
        raise ConfigError(
            f"{config.name}: the model declares input size {list(declared)}, configured {list(input_size)}"
        )
    labels = _labels(config.labels)
    preprocessing = Preprocessing(input_size, config.channel_order, config.scale, config.mean, config.std)
    classifier = Classifier(
        config.name, model, preprocessing, labels, _grouping(config.grouping, labels), device, inference
    )
    _probe(classifier, config)
    return classifier


def _probe(classifier: Classifier, config: ClassifierConfig) -> None:
    """One grey frame through the model at its input size: it must run, give one score per label, and (for
    ONNX) its torch conversion must agree with onnxruntime, or gradient steps would aim at another model."""
    height, width = classifier.preprocessing.input_size
    frame = torch.full((3, height, width), 127.0, device=classifier.device)
    where = f"{config.name} ({config.path or config.factory or config.source})"
    try:
        logits = classifier.predict([frame])
        with torch.no_grad():
            graph_logits = classifier.logits([frame])
    except Exception as error:
        raise ModelLoadError(f"{where} fails on a 1 x 3 x {height} x {width} input: {error}") from error
    if logits.ndim != 2 or logits.shape[1] != len(classifier.labels):
        raise ModelLoadError(
            f"{where}: output shape {tuple(logits.shape)}, expected (1, {len(classifier.labels)}) for the "
            f"{len(classifier.labels)} labels of {config.labels!r}"
        )
    gap = float((logits - graph_logits).abs().max())
    if gap > 1e-3 * max(1.0, float(logits.abs().max())):
        raise ModelLoadError(f"{where}: the torch graph used for the gradient differs from onnxruntime by {gap:.3g}")


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
        alpha=correction.alpha or DEFAULT_ALPHA[correction.step],
        max_iterations=correction.max_iterations if correction.enabled else 0,
        time_budget_ms=correction.time_budget_ms,
        max_change=correction.max_change,
        stop=correction.stop,
        step=correction.step,
        through_codec=correction.through_codec,
        members=correction.members,
    )
