"""Adaptive correction: nudge only the anonymized pixels until every classifier decides on the PUBLISHED
frame (rounded, encoded, decoded) as it did on the original.

The method of Shvai et al.: x(k+1) = clip(x(k) - alpha * g / max|g|), g the gradient of the cross-entropy
towards the original decision, zero outside the anonymized region. Added for real use: the stop check on
published bytes, a count and time budget per frame, a bound on how far any pixel moves from its anonymized
value, and batches where each frame stops on its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from veilstream.correction.classifier import Decision, Ensemble
from veilstream.correction.steps import GradientPoint, seen_by_classifier
from veilstream.decoding.images import Frame
from veilstream.publishing.encoding import Encoded, Encoder

StopCriterion = Literal["published", "float"]
StepKind = Literal["sign", "max"]
StopReason = Literal["already_consistent", "corrected", "iteration_budget", "time_budget", "no_region"]


@dataclass(frozen=True)
class CorrectionSettings:
    """`alpha` is a step on the classifier's input scale (the paper: 0.1 for inputs in [-1, 1]).

    `step`: "max" is the paper's g / max|g| (the most sensitive pixel moves alpha); "sign" moves every region
    pixel by alpha (the steepest step under a bound on the largest change). `through_codec`: the gradient goes
    through a differentiable JPEG at the publish quality, so a step aims at what survives encoding.
    `members`: "changed" lets only the members whose published decision differs steer a step (the others are
    not even run); "all" sums every member's loss. The defaults are what won on real frames (README)."""

    alpha: float = 0.03
    max_iterations: int = 100
    time_budget_ms: float | None = 5000.0
    max_change: int = 48
    stop: StopCriterion = "published"
    step: StepKind = "sign"
    through_codec: bool = True
    members: Literal["changed", "all"] = "changed"

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0, got {self.max_iterations}")
        if self.time_budget_ms is not None and self.time_budget_ms <= 0:
            raise ValueError(f"time_budget_ms must be positive, got {self.time_budget_ms}")
        if not 0 <= self.max_change <= 255:
            raise ValueError(f"max_change must be within 0..255, got {self.max_change}")


@dataclass(frozen=True)
class CorrectionResult:
    """What happened to one frame. `final` is the decision on `encoded`, the bytes the publish stage sends.

    `elapsed_ms` is this frame's share of the batch's correction time (each check and step split evenly among
    the frames still in it), so per-frame times add up to the batch's.
    """

    original: tuple[Decision, ...]
    naive: tuple[Decision, ...]
    final: tuple[Decision, ...]
    iterations: int
    elapsed_ms: float
    max_pixel_change: int
    stop_reason: StopReason
    pixels: Frame
    encoded: Encoded

    @property
    def consistent(self) -> bool:
        return not _changed(self.original, self.final)

    @property
    def naive_changed(self) -> bool:
        return _changed(self.original, self.naive)

    @property
    def budget_exhausted(self) -> bool:
        return self.stop_reason in ("iteration_budget", "time_budget")


def _changed(a: tuple[Decision, ...], b: tuple[Decision, ...]) -> bool:
    return any(x.index != y.index for x, y in zip(a, b, strict=True))


def _check_frame(frame: Frame) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 RGB, got shape {frame.shape} dtype {frame.dtype}")


def _to_tensor(frame: Frame, device: torch.device) -> torch.Tensor:
    _check_frame(frame)
    return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1).float()


def _to_frame(tensor: torch.Tensor) -> Frame:
    array: npt.NDArray[np.uint8] = tensor.detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(array)


class AdaptiveCorrector:
    def __init__(
        self,
        ensemble: Ensemble,
        settings: CorrectionSettings,
        device: torch.device | str = "cpu",
        *,
        encoder: Encoder | None = None,
    ) -> None:
        self.ensemble = ensemble
        self.settings = settings
        self.encoder = encoder or Encoder()
        self.device = torch.device(device)
        self.step = settings.alpha * ensemble.pixels_per_unit

    def reference(self, originals: Sequence[Frame]) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, B) decisions and confidences on the original frames."""
        return self.ensemble.decide([_to_tensor(f, self.device) for f in originals])

    def correct(
        self,
        originals: Sequence[Frame],
        anonymized: Sequence[Frame],
        masks: Sequence[npt.NDArray[np.bool_]],
    ) -> list[CorrectionResult]:
        """Correct a batch. `anonymized[i]` differs from `originals[i]` only where `masks[i]` is True."""
        if not len(originals) == len(anonymized) == len(masks):
            raise ValueError("originals, anonymized and masks must have the same length")
        if not originals:
            return []
        settings = self.settings
        start = time.perf_counter()
        reference, reference_confidence = self.reference(originals)
        for a, m in zip(anonymized, masks, strict=True):
            _check_frame(a)
            if a.shape[:2] != m.shape[:2]:
                raise ValueError(f"mask shape {tuple(m.shape[:2])} does not match frame {tuple(a.shape[:2])}")
        # Tensors of a frame are made only once it needs a step: most frames are consistent at the first check,
        # which then runs on the anonymized uint8 pixels as they are (no float round trip, no copies).
        stepping: dict[int, _Stepping] = {}
        decoded: list[Frame] = list(anonymized)  # the decoded published pixels, from the latest check
        changed_members: list[list[bool]] = [[True] * len(self.ensemble.members) for _ in anonymized]
        iterations = [0] * len(anonymized)
        spent_ms = [(time.perf_counter() - start) * 1000 / len(anonymized)] * len(anonymized)  # the reference
        results: dict[int, CorrectionResult] = {}
        naive: dict[int, tuple[Decision, ...]] = {}
        active = list(range(len(anonymized)))
        last_step_ms = 0.0

        def share(indices: Sequence[int], since: float) -> None:
            each = (time.perf_counter() - since) * 1000 / len(indices)
            for i in indices:
                spent_ms[i] += each

        def pixels(i: int) -> Frame:
            return _to_frame(stepping[i].current) if i in stepping else anonymized[i]

        def finish(i: int, reason: StopReason, checked: tuple[Encoded, tuple[Decision, ...]], frame: Frame) -> None:
            encoded, final = checked
            state = stepping.get(i)
            results[i] = CorrectionResult(
                original=self.ensemble.describe(reference, reference_confidence, i),
                naive=naive[i],
                final=final,
                iterations=iterations[i],
                elapsed_ms=spent_ms[i],
                max_pixel_change=0 if state is None else int((state.current.round() - state.anon).abs().max()),
                stop_reason=reason,
                pixels=frame,
                encoded=encoded,
            )

        while active:
            check_start = time.perf_counter()
            frames = [pixels(i) for i in active]
            checked = self._check(frames)
            for i, (encoded, seen) in zip(active, checked, strict=True):
                decoded[i] = encoded.decoded
                original = self.ensemble.describe(reference, reference_confidence, i)
                changed_members[i] = [a.index != b.index for a, b in zip(original, seen, strict=True)]
            if not naive:
                naive = {i: c[1] for i, c in zip(active, checked, strict=True)}
            if settings.stop == "published":
                agree = [
                    not _changed(self.ensemble.describe(reference, reference_confidence, i), c[1])
                    for i, c in zip(active, checked, strict=True)
                ]
            else:
                floats = [
                    stepping[i].current if i in stepping else _to_tensor(anonymized[i], self.device) for i in active
                ]
                decisions, _ = self.ensemble.decide(floats)
                agree = [bool((decisions[:, k] == reference[:, i]).all()) for k, i in enumerate(active)]
            share(active, check_start)
            elapsed_ms = (time.perf_counter() - start) * 1000
            out_of_time = settings.time_budget_ms is not None and elapsed_ms + last_step_ms > settings.time_budget_ms
            still: list[int] = []
            for i, ok, c, frame in zip(active, agree, checked, frames, strict=True):
                if ok:
                    finish(i, "already_consistent" if iterations[i] == 0 else "corrected", c, frame)
                elif not masks[i].any():
                    finish(i, "no_region", c, frame)  # nothing may change, so nothing can be corrected
                elif iterations[i] >= settings.max_iterations:
                    finish(i, "iteration_budget", c, frame)
                elif out_of_time:
                    finish(i, "time_budget", c, frame)
                else:
                    still.append(i)
            active = still
            if not active:
                break
            step_start = time.perf_counter()
            for i in active:
                if i not in stepping:
                    stepping[i] = _Stepping.start(anonymized[i], masks[i], settings.max_change, self.device)
            self._step(active, stepping, decoded, reference, changed_members)
            for i in active:
                iterations[i] += 1
            share(active, step_start)
            last_step_ms = (time.perf_counter() - step_start) * 1000
        return [results[i] for i in range(len(anonymized))]

    def _check(self, frames: Sequence[Frame]) -> list[tuple[Encoded, tuple[Decision, ...]]]:
        """Encode each frame as the publish stage will; the decisions are on the decoded bytes."""
        encoded = [self.encoder.roundtrip(f) for f in frames]
        decisions, confidences = self.ensemble.decide([_to_tensor(e.decoded, self.device) for e in encoded])
        return [(e, self.ensemble.describe(decisions, confidences, k)) for k, e in enumerate(encoded)]

    def _step(
        self,
        active: Sequence[int],
        stepping: dict[int, _Stepping],
        decoded: Sequence[Frame],
        reference: torch.Tensor,
        changed_members: Sequence[Sequence[bool]],
    ) -> None:
        settings = self.settings
        inputs = [stepping[i].current.detach().requires_grad_(True) for i in active]
        # The codec view models JPEG; for PNG and WebP the gradient is taken at the published pixels.
        point: GradientPoint = (
            "float" if not settings.through_codec else "codec" if self.encoder.codec == "jpeg" else "published"
        )
        seen = [
            x
            if point == "float"
            else seen_by_classifier(
                x, _to_tensor(decoded[i], self.device), stepping[i].region, point, self.encoder.quality
            )
            for x, i in zip(inputs, active, strict=True)
        ]
        weights = None
        if settings.members == "changed":
            weights = torch.tensor([list(changed_members[i]) for i in active], device=self.device).T.float()
        loss = self.ensemble.loss(seen, reference[:, list(active)], weights).sum()
        gradients = torch.autograd.grad(loss, inputs)
        with torch.no_grad():
            for i, gradient in zip(active, gradients, strict=True):
                state = stepping[i]
                masked = gradient * state.region
                direction = masked.sign() if settings.step == "sign" else masked
                peak = direction.abs().max()
                if peak > 0:
                    moved = state.current - self.step * direction / peak
                    state.current = torch.minimum(torch.maximum(moved, state.low), state.high)


@dataclass
class _Stepping:
    """A frame being stepped: its anonymized pixels, region, bounds and current float pixels, on the device."""

    anon: torch.Tensor
    region: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    current: torch.Tensor

    @classmethod
    def start(cls, anonymized: Frame, mask: npt.NDArray[np.bool_], max_change: int, device: torch.device) -> _Stepping:
        anon = _to_tensor(anonymized, device)
        region = torch.from_numpy(np.ascontiguousarray(mask)).to(device).unsqueeze(0)
        low, high = (anon - max_change).clamp_min(0), (anon + max_change).clamp_max(255)
        return cls(anon, region, low, high, anon.clone())
