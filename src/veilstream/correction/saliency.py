"""The paper's simulated anonymization region: the window the classifier relies on most."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from veilstream.anonymizers.regions import Region
from veilstream.correction.classifier import Classifier


def salient_window(classifier: Classifier, frame: torch.Tensor, size: int = 50) -> Region:
    """The `size` x `size` window (at classifier resolution) with the largest summed absolute input
    gradient of the cross-entropy of the top-1 class, mapped back onto the full frame."""
    frame = frame.detach().requires_grad_(True)
    model_input = classifier.preprocessing([frame]).detach().requires_grad_(True)
    logits = classifier.model(model_input)
    target = logits.argmax(dim=1)
    loss = F.cross_entropy(logits, target)
    (gradient,) = torch.autograd.grad(loss, model_input)
    saliency = gradient.abs().sum(dim=1, keepdim=True)
    in_h, in_w = saliency.shape[2:]
    window = min(size, in_h, in_w)
    sums = F.avg_pool2d(saliency, window, stride=1)
    flat = int(sums.flatten().argmax())
    row, col = divmod(flat, sums.shape[3])
    height, width = frame.shape[1:]
    sy, sx = height / in_h, width / in_w
    return Region(col * sx, row * sy, (col + window) * sx, (row + window) * sy)
