"""Classifiers whose decisions veilstream preserves.

Preprocessing is written in torch. Decisions (the reference, every check) are made on the frame's 8-bit pixels
resized to 8-bit pixels; the correction's gradient goes back through the same resize in float, unrounded, to the
full-resolution pixels. Frames are (3, H, W) tensors of RGB values in [0, 255] (uint8, or float for the gradient);
a batch may mix frame sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from veilstream.correction.models import imagenet_labels, load_efficientnet_lite0
from veilstream.errors import ConfigError

__all__ = [
    "Classifier",
    "Decision",
    "Ensemble",
    "Grouping",
    "Preprocessing",
    "imagenet_labels",
    "load_efficientnet_lite0",
]


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
        """The differentiable model input of float frames (the gradient's path): the resize is not rounded."""
        resized = [
            F.interpolate(f.unsqueeze(0), size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
            for f in frames
        ]
        return self._normalize(torch.cat(resized))

    def decision_inputs(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model input a decision is made on: the frame's 8-bit pixels resized to 8-bit pixels, as an image
        library hands them to a classifier, then normalized. Float frames are rounded to 8 bits first, so a
        decision depends only on the pixels that can be published."""
        return self._normalize(torch.cat([self._resize_8bit(f) for f in frames]).float())

    def _resize_8bit(self, frame: torch.Tensor) -> torch.Tensor:
        if frame.dtype != torch.uint8:
            frame = frame.detach().round().clamp(0, 255).to(torch.uint8)
        # (1, 3, H, W) with channels-last strides: torch's vectorized 8-bit antialiased resize (CPU), about 10x
        # faster at 1080p than converting to float and resizing, which also costs a full-frame copy.
        pixels = frame.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        if pixels.device.type == "cpu":
            return F.interpolate(pixels, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        # No 8-bit kernel on other devices: the float resize, rounded the same way (within one level of the CPU's).
        resized = F.interpolate(
            pixels.float(), size=self.input_size, mode="bilinear", align_corners=False, antialias=True
        )
        return resized.round().clamp(0, 255).to(torch.uint8)

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
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
    """A frozen model plus its preprocessing, labels and optional grouping.

    `model` is the torch graph the gradient goes through (`logits`, `Ensemble.loss`). `inference`, when given,
    computes the forward-only decisions instead (`predict`, `Ensemble.decide`): logits from a preprocessed batch,
    e.g. onnxruntime running the model exported by onnx_decisions.py or the operator's own ONNX file.
    `runtime` says what computes the decisions, for reports.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        preprocessing: Preprocessing,
        labels: Sequence[str],
        grouping: Grouping | None = None,
        device: torch.device | str = "cpu",
        inference: Callable[[torch.Tensor], torch.Tensor] | None = None,
        runtime: str | None = None,
    ) -> None:
        self.name = name
        self.inference = inference
        self.decision_runtime = runtime or ("torch" if inference is None else "custom")
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
        """Differentiable logits through the torch graph."""
        return self.model(self.preprocessing(frames))  # type: ignore[no-any-return]

    def predict(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits for a decision, without gradients (on the inference runtime when there is one), on the 8-bit
        resized frames (`Preprocessing.decision_inputs`); uint8 (3, H, W) frames are the fast path."""
        with torch.no_grad():
            batch = self.preprocessing.decision_inputs(frames)
            return self.inference(batch) if self.inference is not None else self.model(batch)

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
            pairs = [m.decide_logits(m.predict(frames)) for m in self.members]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def loss(
        self, frames: Sequence[torch.Tensor], targets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) summed cross-entropy of every member towards its target decision. `weights` (M, B) scales each
        member's term per frame; a member whose weights are all zero is not run at all."""
        total = torch.zeros(len(frames), device=targets.device)
        for m, (member, target) in enumerate(zip(self.members, targets, strict=True)):
            if weights is None:
                total = total + member.loss(member.logits(frames), target)
            elif bool(weights[m].any()):
                total = total + weights[m] * member.loss(member.logits(frames), target)
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
