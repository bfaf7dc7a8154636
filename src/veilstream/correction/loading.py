"""Builds classifiers, anonymizers and the corrector from configuration."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

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
from veilstream.correction.onnx_decisions import onnx_decisions, resolve_runtime
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


def decision_runtime(config: ClassifierConfig, device: str) -> Literal["onnxruntime", "torch"]:
    """Where `predict` runs. An operator's ONNX file keeps deciding exactly as exported under `auto`, on the
    CPU when onnxruntime has no CUDA provider (as before decision_runtime existed)."""
    if config.source == "onnx" and config.decision_runtime == "auto":
        return "onnxruntime"
    return resolve_runtime(config.decision_runtime, device)


def build_classifier(config: ClassifierConfig, device: str) -> Classifier:
    inference: Callable[[torch.Tensor], torch.Tensor] | None = None
    runtime = decision_runtime(config, device)
    described = "torch"
    input_size = config.input_size
    if config.source in BUILTIN_CLASSIFIERS:
        model = load_builtin(config.source)
    elif config.source == "torchscript":
        assert config.path is not None  # checked by the config model
        model = load_torchscript(config.path, device)
    elif config.source == "onnx":
        assert config.path is not None
        exported = load_onnx(config.path, device)
        model = exported.torch_module
        if runtime == "onnxruntime":
            inference, described = exported.run, exported.runtime
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
    grouping = _grouping(config.grouping, labels)
    model = model.to(device).eval()
    if runtime == "onnxruntime" and inference is None:
        # After the checks above, so a wrong input size or labels file is reported as such, not as an export error.
        _check_outputs(model, input_size, labels, config)
        exported_here = onnx_decisions(config.name, model, input_size, device)
        inference, described = exported_here, exported_here.description
    classifier = Classifier(config.name, model, preprocessing, labels, grouping, device, inference, described)
    _probe(classifier, config)
    return classifier


def _check_outputs(model: nn.Module, input_size: tuple[int, int], labels: list[str], config: ClassifierConfig) -> None:
    """The torch model runs at its input size and gives one score per label (before exporting it)."""
    parameter = next(iter(model.parameters()), None)
    frame = torch.zeros(1, 3, *input_size, device=parameter.device if parameter is not None else "cpu")
    where = f"{config.name} ({config.path or config.factory or config.source})"
    try:
        with torch.no_grad():
            logits = model(frame)
    except Exception as error:
        raise ModelLoadError(f"{where} fails on a 1 x 3 x {input_size[0]} x {input_size[1]} input: {error}") from error
    _check_shape(where, tuple(logits.shape), labels, config)


def _check_shape(where: str, shape: tuple[int, ...], labels: Sequence[str], config: ClassifierConfig) -> None:
    if len(shape) != 2 or shape[1] != len(labels):
        raise ModelLoadError(
            f"{where}: output shape {shape}, expected ({shape[0] if shape else 1}, {len(labels)}) for the "
            f"{len(labels)} labels of {config.labels!r}"
        )


def _probe_frames(height: int, width: int, device: torch.device) -> list[torch.Tensor]:
    """A grey frame and a smooth seeded random one: the decision runtime and the torch graph must agree on both."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand((1, 3, max(1, height // 16), max(1, width // 16)), generator=generator) * 255
    # Whole levels: decisions are made on 8-bit pixels, the graph on floats; on these both see the same input.
    textured = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0].round()
    return [torch.full((3, height, width), 127.0, device=device), textured.to(device)]


def _probe(classifier: Classifier, config: ClassifierConfig) -> None:
    """Two frames through the model at its input size: it must run, give one score per label, and its decision
    runtime (onnxruntime, for an ONNX file or an export) must agree with the torch graph the gradient steps go
    through, or the steps would aim at another model."""
    height, width = classifier.preprocessing.input_size
    frames = _probe_frames(height, width, classifier.device)
    where = f"{config.name} ({config.path or config.factory or config.source})"
    try:
        logits = classifier.predict(frames)
        with torch.no_grad():
            graph_logits = classifier.logits(frames)
    except Exception as error:
        raise ModelLoadError(f"{where} fails on a 2 x 3 x {height} x {width} input: {error}") from error
    _check_shape(where, tuple(logits.shape), classifier.labels, config)
    gap = float((logits - graph_logits).abs().max())
    if gap > 1e-3 * max(1.0, float(logits.abs().max())):
        raise ModelLoadError(
            f"{where}: the torch graph used for the gradient differs from its decisions on "
            f"{classifier.decision_runtime} by {gap:.3g}"
        )


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
        step_scales=tuple(correction.step_scales),
    )
