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
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from veilstream.correction.classifier import Decision, Ensemble
from veilstream.correction.steps import SAME_PLACE_IOU, GradientPoint, Stepping, seen_by_classifier
from veilstream.decoding.images import Frame
from veilstream.geometry import BoxGeometry
from veilstream.publishing.encoding import Encoded, Encoder

StopCriterion = Literal["published", "float"]
StepKind = Literal["sign", "max"]
StopReason = Literal["already_consistent", "corrected", "iteration_budget", "time_budget", "no_region", "found_again"]
BUDGET_STOPS: tuple[StopReason, ...] = ("iteration_budget", "time_budget")


class FoundAgain(Protocol):
    """Anonymized objects a detector finds again on published pixels: per frame, the boxes (frame pixels) that
    land on an anonymized one. `positions` are the frames' places in the batch given to `correct`."""

    def __call__(self, positions: Sequence[int], published: Sequence[Frame]) -> list[list[BoxGeometry]]: ...


@dataclass(frozen=True)
class CorrectionSettings:
    """`alpha` is a step on the classifier's input scale (the paper: 0.1 for inputs in [-1, 1]).

    `step`: "max" is the paper's g / max|g| (the most sensitive pixel moves alpha); "sign" moves every region
    pixel by alpha (the steepest step under a bound on the largest change). `through_codec`: the gradient goes
    through a differentiable JPEG at the publish quality, so a step aims at what survives encoding.
    `members`: "changed" lets only the members whose published decision differs steer a step (the others are
    not even run); "all" sums every member's loss. `step_scales`: a line search along each gradient step: the
    step times each scale is tried on the published bytes (one batched check) and the smallest that leaves the
    fewest decisions changed is kept; one gradient, so one iteration. The defaults are what won on real
    frames (README)."""

    alpha: float = 0.03
    max_iterations: int = 100
    time_budget_ms: float | None = 5000.0
    max_change: int = 48
    stop: StopCriterion = "published"
    step: StepKind = "sign"
    through_codec: bool = True
    members: Literal["changed", "all"] = "changed"
    step_scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if not self.step_scales or any(s <= 0 for s in self.step_scales):
            raise ValueError(f"step_scales must be positive numbers, got {list(self.step_scales)}")
        if len(self.step_scales) > 1 and self.stop != "published":
            raise ValueError("step_scales with several scales needs stop: published (they are tried on the bytes)")
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
        return self.stop_reason in BUDGET_STOPS


def _changed(a: tuple[Decision, ...], b: tuple[Decision, ...]) -> bool:
    return _changed_count(a, b) > 0


def _changed_count(a: tuple[Decision, ...], b: tuple[Decision, ...]) -> int:
    return sum(x.index != y.index for x, y in zip(a, b, strict=True))


def _check_frame(frame: Frame) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8 RGB, got shape {frame.shape} dtype {frame.dtype}")


def _to_tensor(frame: Frame, device: torch.device) -> torch.Tensor:
    _check_frame(frame)
    return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1).float()


def _to_pixels(frame: Frame, device: torch.device) -> torch.Tensor:
    """(3, H, W) uint8 view of a frame, for decisions: no float copy of the whole frame."""
    _check_frame(frame)
    return torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)


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
        return self.ensemble.decide([_to_pixels(f, self.device) for f in originals])

    def correct(
        self,
        originals: Sequence[Frame],
        anonymized: Sequence[Frame],
        masks: Sequence[npt.NDArray[np.bool_]],
        found_again: FoundAgain | None = None,
    ) -> list[CorrectionResult]:
        """Correct a batch. `anonymized[i]` differs from `originals[i]` only where `masks[i]` is True.

        With `found_again`, a correction may not make an anonymized object detectable: a stepped frame about to
        finish is looked at again, and where something is found that the uncorrected frame did not show, those
        pixels go back to their anonymized values and leave the region; the frame then goes on without them (or,
        out of budget or region, finishes on the reverted pixels, "found_again" when its decision stays changed).
        """
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
        stepping: dict[int, Stepping] = {}
        decoded: list[Frame] = list(anonymized)  # the decoded published pixels, from the latest check
        changed_members: list[list[bool]] = [[True] * len(self.ensemble.members) for _ in anonymized]
        iterations = [0] * len(anonymized)
        spent_ms = [(time.perf_counter() - start) * 1000 / len(anonymized)] * len(anonymized)  # the reference
        results: dict[int, CorrectionResult] = {}
        naive: dict[int, tuple[Decision, ...]] = {}
        active = list(range(len(anonymized)))
        last_step_ms = 0.0
        # A line search checks the step it keeps already: that check is the next round's.
        prechecked: dict[int, tuple[Encoded, tuple[Decision, ...]]] = {}
        uncorrected: dict[int, Frame] = {}  # the published pixels before any step, of the frames stepped
        seen_before: dict[int, list[BoxGeometry]] = {}  # found on the uncorrected pixels (looked at when needed)
        reverted: set[int] = set()  # frames with pixels put back because something was found again there

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
            unchecked = [k for k, i in enumerate(active) if i not in prechecked]
            fresh = iter(self._check([frames[k] for k in unchecked]) if unchecked else [])
            checked = [prechecked.pop(i) if i in prechecked else next(fresh) for i in active]
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
                unpublished = [
                    stepping[i].current if i in stepping else _to_pixels(anonymized[i], self.device) for i in active
                ]
                decisions, _ = self.ensemble.decide(unpublished)
                agree = [bool((decisions[:, k] == reference[:, i]).all()) for k, i in enumerate(active)]
                # The members that steer a step are those changed where the stop looks, here before the codec.
                for k, i in enumerate(active):
                    changed_members[i] = (decisions[:, k] != reference[:, i]).tolist()
            share(active, check_start)
            elapsed_ms = (time.perf_counter() - start) * 1000
            out_of_time = settings.time_budget_ms is not None and elapsed_ms + last_step_ms > settings.time_budget_ms
            still: list[int] = []
            ending: list[tuple[int, StopReason, tuple[Encoded, tuple[Decision, ...]], Frame]] = []
            for i, ok, c, frame in zip(active, agree, checked, frames, strict=True):
                if ok:
                    ending.append((i, "already_consistent" if iterations[i] == 0 else "corrected", c, frame))
                elif not (stepping[i].region.any() if i in stepping else masks[i].any()):
                    # nothing (more) may change, so nothing can be corrected
                    ending.append((i, "found_again" if i in reverted else "no_region", c, frame))
                elif iterations[i] >= settings.max_iterations:
                    ending.append((i, "iteration_budget", c, frame))
                elif out_of_time:
                    ending.append((i, "time_budget", c, frame))
                else:
                    still.append(i)
            held: set[int] = set()  # reverted just now: checked again before any further step
            if found_again is not None:
                guard_start = time.perf_counter()
                looked = [e for e in ending if e[0] in stepping]
                ending = [e for e in ending if e[0] not in stepping]
                news = self._new_finds(looked, found_again, uncorrected, seen_before)
                for (i, reason, c, frame), new in zip(looked, news, strict=True):
                    if not new:
                        ending.append((i, reason, c, frame))
                        continue
                    stepping[i].put_back(new)
                    reverted.add(i)
                    held.add(i)
                    still.append(i)  # checked again next round: finishes there when out of budget or region
                if looked:
                    share([e[0] for e in looked], guard_start)
            for i, reason, c, frame in ending:
                finish(i, reason, c, frame)
            active = still
            if not active:
                break
            stepped = [i for i in active if i not in held]
            if not stepped:
                continue
            step_start = time.perf_counter()
            fresh_frames = [i for i in stepped if i not in stepping]
            for i in fresh_frames:
                region = torch.from_numpy(np.array(masks[i], dtype=bool)).to(self.device).unsqueeze(0)  # may shrink
                stepping[i] = Stepping.start(_to_tensor(anonymized[i], self.device), region, settings.max_change)
            uncorrected.update((i, decoded[i]) for i in fresh_frames)
            moves = self._step(stepped, stepping, decoded, reference, changed_members)
            if len(settings.step_scales) > 1:
                prechecked = self._search(stepped, stepping, moves, reference, reference_confidence)
            else:
                for i, move in zip(stepped, moves, strict=True):
                    stepping[i].move(move)
            for i in stepped:
                iterations[i] += 1
            share(stepped, step_start)
            last_step_ms = (time.perf_counter() - step_start) * 1000
        return [results[i] for i in range(len(anonymized))]

    @staticmethod
    def _new_finds(
        ending: Sequence[tuple[int, StopReason, tuple[Encoded, tuple[Decision, ...]], Frame]],
        found_again: FoundAgain,
        uncorrected: dict[int, Frame],
        seen_before: dict[int, list[BoxGeometry]],
    ) -> list[list[BoxGeometry]]:
        """Per ending stepped frame, what is found again on its published pixels and was not on its uncorrected
        ones (the anonymizer's doing); those are looked at only for frames where something is found. A box found
        at a place already put back counts again (`Stepping.put_back` then widens what goes back)."""
        if not ending:
            return []
        found = found_again([e[0] for e in ending], [e[2][0].decoded for e in ending])
        unknown = [e[0] for e, boxes in zip(ending, found, strict=True) if boxes and e[0] not in seen_before]
        if unknown:
            seen_before.update(zip(unknown, found_again(unknown, [uncorrected[i] for i in unknown]), strict=True))
        return [
            [box for box in boxes if not any(box.iou(old) > SAME_PLACE_IOU for old in seen_before.get(e[0], []))]
            for e, boxes in zip(ending, found, strict=True)
        ]

    def _check(self, frames: Sequence[Frame]) -> list[tuple[Encoded, tuple[Decision, ...]]]:
        """Encode each frame as the publish stage will; the decisions are on the decoded bytes."""
        encoded = [self.encoder.roundtrip(f) for f in frames]
        decisions, confidences = self.ensemble.decide([_to_pixels(e.decoded, self.device) for e in encoded])
        return [(e, self.ensemble.describe(decisions, confidences, k)) for k, e in enumerate(encoded)]

    def _step(
        self,
        active: Sequence[int],
        stepping: dict[int, Stepping],
        decoded: Sequence[Frame],
        reference: torch.Tensor,
        changed_members: Sequence[Sequence[bool]],
    ) -> list[torch.Tensor | None]:
        """One step per active frame: the change to add to its pixels (before bounds), None when the gradient
        is zero in the region."""
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
        moves: list[torch.Tensor | None] = []
        with torch.no_grad():
            for i, gradient in zip(active, gradients, strict=True):
                masked = gradient * stepping[i].region
                direction = masked.sign() if settings.step == "sign" else masked
                peak = direction.abs().max()
                moves.append(-self.step * direction / peak if peak > 0 else None)
        return moves

    def _search(
        self,
        active: Sequence[int],
        stepping: dict[int, Stepping],
        moves: Sequence[torch.Tensor | None],
        reference: torch.Tensor,
        reference_confidence: torch.Tensor,
    ) -> dict[int, tuple[Encoded, tuple[Decision, ...]]]:
        """Try each step scale on the published bytes in one check; keep the smallest that leaves the fewest
        decisions changed (none, when one restores them all). Returns the kept candidates' checks."""
        scales = sorted(self.settings.step_scales)
        tries: list[tuple[int, torch.Tensor]] = []
        for i, move in zip(active, moves, strict=True):
            state = stepping[i]
            tries += [(i, state.bounded(move * scale if move is not None else None)) for scale in scales]
        checked = self._check([_to_frame(candidate) for _, candidate in tries])
        kept: dict[int, tuple[Encoded, tuple[Decision, ...]]] = {}
        for k, i in enumerate(active):
            original = self.ensemble.describe(reference, reference_confidence, i)
            options = range(k * len(scales), (k + 1) * len(scales))
            # The smallest scale among those leaving the fewest decisions changed: the step that restores all
            # when one does, and no needless jump (pixels drift further with every large step) when none does.
            chosen = min(options, key=lambda j: _changed_count(original, checked[j][1]))
            stepping[i].current = tries[chosen][1]
            kept[i] = checked[chosen]
        return kept
