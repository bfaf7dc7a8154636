"""The paper's simulated anonymization region: the window the classifiers rely on most."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from veilstream.anonymizers.regions import Region
from veilstream.correction.classifier import Classifier


def salient_window(classifiers: Classifier | Sequence[Classifier], frame: torch.Tensor, size: int = 50) -> Region:
    """The `size` x `size` window (at the first classifier's resolution) with the largest summed absolute input
    gradient of the cross-entropy of the top-1 class, mapped back onto the full frame. With several classifiers
    each one's map counts equally (divided by its sum, resampled to the first one's input size)."""
    members = [classifiers] if isinstance(classifiers, Classifier) else list(classifiers)
    maps = [_saliency(member, frame) for member in members]
    saliency = maps[0]
    in_h, in_w = saliency.shape[2:]
    if len(maps) > 1:
        saliency = sum(
            (F.interpolate(m, size=(in_h, in_w), mode="bilinear") / m.sum().clamp_min(1e-12) for m in maps),
            torch.zeros_like(saliency),
        )
    window = min(size, in_h, in_w)
    sums = F.avg_pool2d(saliency, window, stride=1)
    flat = int(sums.flatten().argmax())
    row, col = divmod(flat, sums.shape[3])
    height, width = frame.shape[1:]
    sy, sx = height / in_h, width / in_w
    return Region(col * sx, row * sy, (col + window) * sx, (row + window) * sy)


def _saliency(classifier: Classifier, frame: torch.Tensor) -> torch.Tensor:
    """(1, 1, h, w) absolute input gradient at the classifier's input resolution."""
    model_input = classifier.preprocessing([frame.detach()]).detach().requires_grad_(True)
    logits = classifier.model(model_input)
    loss = F.cross_entropy(logits, logits.argmax(dim=1))
    (gradient,) = torch.autograd.grad(loss, model_input)
    return gradient.abs().sum(dim=1, keepdim=True)
