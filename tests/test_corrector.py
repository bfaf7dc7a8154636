from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from veilstream.anonymizers.filters import GaussianBlur, SolidMask
from veilstream.anonymizers.regions import Region, region_mask
from veilstream.correction.classifier import Classifier, Decision, Ensemble, Grouping
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.correction.saliency import salient_window
from veilstream.correction.steps import GradientPoint, seen_by_classifier
from veilstream.decoding.images import Frame
from veilstream.geometry import BoxGeometry
from veilstream.publishing.encoding import Encoded, Encoder, Pixels

from .conftest import noise_frames, tiny_classifier, video_frame

Case = tuple[list[Frame], list[Frame], list[npt.NDArray[np.bool_]]]


def _tensor(frame: Frame) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1).float()


def _frame(tensor: torch.Tensor) -> Frame:
    return np.ascontiguousarray(tensor.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def masked_case(count: int = 24, seed: int = 0) -> Case:
    """Frames with a grey box over their centre, and the box masks."""
    originals = noise_frames(count, seed=seed)
    region = Region(24, 16, 72, 48)
    anonymized = [_frame(SolidMask().anonymize(_tensor(f), [region])) for f in originals]
    masks = [region_mask([region], 64, 96, torch.device("cpu")).numpy() for _ in originals]
    return originals, anonymized, masks


def _flipped(ensemble: Ensemble, case: Case) -> Case:
    """Only the frames whose decision the anonymization changed (so correction has work to do)."""
    originals, anonymized, masks = case
    before, _ = ensemble.decide([_tensor(f) for f in originals])
    after, _ = ensemble.decide([_tensor(f) for f in anonymized])
    changed = [i for i in range(len(originals)) if bool((before[:, i] != after[:, i]).any())]
    assert changed, "the test needs frames whose decision the mask changes"
    return [originals[i] for i in changed], [anonymized[i] for i in changed], [masks[i] for i in changed]


def test_correction_restores_every_decision_on_published_bytes() -> None:
    ensemble = Ensemble([tiny_classifier()])
    case = _flipped(ensemble, masked_case())
    results = AdaptiveCorrector(ensemble, CorrectionSettings(max_change=96, time_budget_ms=None)).correct(*case)
    assert any(r.naive_changed for r in results)
    assert all(r.consistent for r in results), [r.stop_reason for r in results]
    assert all(r.iterations >= 1 for r in results if r.naive_changed)
    # `final` is the decision on the decoded published bytes: check it independently.
    from veilstream.decoding.images import decode_frame

    reference, _ = ensemble.decide([_tensor(f) for f in case[0]])
    published, _ = ensemble.decide([_tensor(decode_frame(r.encoded.data)) for r in results])
    assert torch.equal(reference, published)


def test_pixels_outside_the_region_are_untouched_and_the_bound_holds() -> None:
    ensemble = Ensemble([tiny_classifier()])
    originals, anonymized, masks = _flipped(ensemble, masked_case())
    settings = CorrectionSettings(max_change=6, max_iterations=20, time_budget_ms=None)
    results = AdaptiveCorrector(ensemble, settings).correct(originals, anonymized, masks)
    moved = False
    for result, anon, mask in zip(results, anonymized, masks, strict=True):
        change = np.abs(result.pixels.astype(int) - anon.astype(int))
        assert np.array_equal(result.pixels[~mask], anon[~mask]), "outside the region must be bit-identical"
        assert change.max() <= 6
        assert result.max_pixel_change == change.max()
        moved |= bool(change.max() > 0)
    assert moved, "the correction should have moved some pixels"


def test_iteration_budget_is_respected_and_reported() -> None:
    ensemble = Ensemble([tiny_classifier()])
    case = _flipped(ensemble, masked_case())
    settings = CorrectionSettings(alpha=0.001, max_iterations=2, time_budget_ms=None)
    results = AdaptiveCorrector(ensemble, settings).correct(*case)
    assert all(r.iterations <= 2 for r in results)
    exhausted = [r for r in results if not r.consistent]
    assert exhausted, "a tiny step cannot fix every frame in two iterations"
    assert all(r.stop_reason == "iteration_budget" and r.budget_exhausted for r in exhausted)


def test_time_budget_stops_a_batch() -> None:
    ensemble = Ensemble([tiny_classifier()])
    case = _flipped(ensemble, masked_case())
    unbounded = AdaptiveCorrector(
        ensemble, CorrectionSettings(alpha=0.0005, max_iterations=10_000, time_budget_ms=None)
    )
    bounded = AdaptiveCorrector(ensemble, CorrectionSettings(alpha=0.0005, max_iterations=10_000, time_budget_ms=60))
    slow = unbounded.correct(*case)
    assert max(r.iterations for r in slow) > 50, "the slow setting must need many steps"
    start = time.perf_counter()
    results = bounded.correct(*case)
    wall_ms = (time.perf_counter() - start) * 1000
    stopped = [r for r in results if r.stop_reason == "time_budget"]
    assert stopped
    # The check predicts the next step's cost, so the overrun is at most about one step.
    # Generous: this machine is shared; the point is that the run stops near the budget, not at 10,000 steps.
    assert wall_ms < 60 + 1000
    assert all(r.iterations < 10_000 for r in stopped)


def test_per_frame_times_are_shares_of_the_batch() -> None:
    """Each frame's `elapsed_ms` is its own share: they add up to the batch's time, and a frame that stops
    early costs less than one that needs many steps (not the time since the batch started)."""
    ensemble = Ensemble([tiny_classifier()])
    originals, anonymized, masks = _flipped(ensemble, masked_case())
    untouched = noise_frames(1, seed=11)
    empty = np.zeros(untouched[0].shape[:2], dtype=bool)
    corrector = AdaptiveCorrector(ensemble, CorrectionSettings(alpha=0.01, max_iterations=30, time_budget_ms=None))
    start = time.perf_counter()
    results = corrector.correct([*untouched, *originals], [*untouched, *anonymized], [empty, *masks])
    wall_ms = (time.perf_counter() - start) * 1000
    assert sum(r.elapsed_ms for r in results) == pytest.approx(wall_ms, rel=0.2)
    quick, slowest = results[0], max(results[1:], key=lambda r: r.iterations)
    assert quick.iterations == 0 and slowest.iterations > 0
    assert quick.elapsed_ms < slowest.elapsed_ms


def test_an_ensemble_keeps_every_members_decision() -> None:
    ensemble = Ensemble([tiny_classifier("a", seed=1), tiny_classifier("b", seed=2)])
    originals, anonymized, masks = masked_case(count=32, seed=3)
    results = AdaptiveCorrector(ensemble, CorrectionSettings(max_change=128, time_budget_ms=None)).correct(
        originals, anonymized, masks
    )
    assert any(r.naive_changed for r in results)
    for result in results:
        assert result.consistent, result.stop_reason
        assert [d.index for d in result.final] == [d.index for d in result.original]
        assert [d.classifier for d in result.final] == ["a", "b"]


def test_grouped_decisions(tmp_path: Path) -> None:
    spec = tmp_path / "groups.yaml"
    spec.write_text("default: other\ngroups:\n  low: [class0, class1, class2, class3, class4]\n")
    base = tiny_classifier()
    grouping = Grouping.from_yaml(spec, base.labels)
    grouped = Classifier("grouped", base.model, base.preprocessing, base.labels, grouping)
    frames = noise_frames(16, seed=5)
    with torch.no_grad():
        logits = grouped.logits([_tensor(f) for f in frames])
    decision, confidence = grouped.decide_logits(logits)
    expected = [1 if int(c) < 5 else 0 for c in logits.argmax(1)]
    assert decision.tolist() == expected
    assert grouped.decision_names == ("other", "low")
    # The confidence is the group's probability mass.
    mass = torch.softmax(logits, 1)[:, :5].sum(1)
    assert torch.allclose(confidence, torch.where(decision == 1, mass, 1 - mass), atol=1e-5)
    originals, anonymized, masks = masked_case(count=32, seed=6)
    results = AdaptiveCorrector(Ensemble([grouped]), CorrectionSettings(max_change=128, time_budget_ms=None)).correct(
        originals, anonymized, masks
    )
    assert all(r.consistent for r in results)


def test_unknown_class_in_grouping_is_an_error(tmp_path: Path) -> None:
    from veilstream.errors import ConfigError

    spec = tmp_path / "groups.yaml"
    spec.write_text("default: other\ngroups:\n  car: [class0, spaceship]\n")
    with pytest.raises(ConfigError, match="spaceship"):
        Grouping.from_yaml(spec, [f"class{i}" for i in range(10)])


def test_frames_without_a_region_are_reported_not_looped() -> None:
    ensemble = Ensemble([tiny_classifier()])
    frames = noise_frames(4)
    masks = [np.zeros((64, 96), dtype=bool) for _ in frames]
    results = AdaptiveCorrector(ensemble, CorrectionSettings(), encoder=Encoder(quality=5)).correct(
        frames, frames, masks
    )
    for result in results:
        assert result.iterations == 0
        assert result.stop_reason in ("already_consistent", "no_region")
        assert result.consistent == (result.stop_reason == "already_consistent")


@pytest.mark.slow
def test_published_check_catches_what_the_float_check_misses(lite0: Classifier, media: Path) -> None:
    """vtest.avi frame 40: corrected on the float frame, its JPEG q90 still flips; the published check fixes it."""
    original = video_frame(media / "vtest.avi", 40)
    tensor = _tensor(original)
    region = salient_window(lite0, tensor, 50)
    anonymized = _frame(GaussianBlur(relative_sigma=0.2).anonymize(tensor, [region]))
    mask = region_mask([region], original.shape[0], original.shape[1], torch.device("cpu")).numpy()
    ensemble = Ensemble([lite0])
    float_stop = AdaptiveCorrector(ensemble, CorrectionSettings(stop="float", time_budget_ms=None))
    published_stop = AdaptiveCorrector(ensemble, CorrectionSettings(stop="published", time_budget_ms=None))
    (by_float,) = float_stop.correct([original], [anonymized], [mask])
    (by_published,) = published_stop.correct([original], [anonymized], [mask])
    assert by_float.naive_changed
    assert by_float.iterations >= 1
    assert not by_float.consistent, "JPEG re-encoding should undo the float-only correction here"
    assert by_published.consistent
    assert by_published.iterations > by_float.iterations


def test_a_float_stop_steps_by_the_members_changed_before_the_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float stop looks before the codec: where the published bytes happen to keep every decision but the
    rounded pixels do not, the members changed there steer the step (none steering was a crash)."""
    ensemble = Ensemble([tiny_classifier()])
    originals, anonymized, masks = _flipped(ensemble, masked_case())
    case = [originals[0]], [anonymized[0]], [masks[0]]
    corrector = AdaptiveCorrector(ensemble, CorrectionSettings(stop="float", time_budget_ms=None, max_change=96))
    reference, confidence = corrector.reference(case[0])
    checked = corrector._check

    def published_keeps_every_decision(frames: Sequence[Frame]) -> list[tuple[Encoded, tuple[Decision, ...]]]:
        return [(encoded, ensemble.describe(reference, confidence, 0)) for encoded, _ in checked(frames)]

    monkeypatch.setattr(corrector, "_check", published_keeps_every_decision)
    (result,) = corrector.correct(*case)
    assert result.iterations >= 1
    assert result.stop_reason == "corrected"


class _CountingNet(nn.Module):
    """Wraps a model and counts forward passes that build a graph (the gradient steps)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.graph_passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.graph_passes += 1
        return self.inner(x)  # type: ignore[no-any-return]


def test_only_members_whose_decision_changed_steer_a_step() -> None:
    """members="changed": a member that agrees on the published frame is not run in the step at all."""
    moving = tiny_classifier("moving", seed=1)
    steady_net = _CountingNet(_ConstantNet())  # decides class 0 whatever the pixels: never changes
    steady = Classifier("steady", steady_net, moving.preprocessing, moving.labels)
    ensemble = Ensemble([moving, steady])
    case = _flipped(ensemble, masked_case(count=24, seed=3))
    settings = CorrectionSettings(max_change=128, time_budget_ms=None, members="changed")
    results = AdaptiveCorrector(ensemble, settings).correct(*case)
    assert all(r.consistent for r in results), [r.stop_reason for r in results]
    assert any(r.iterations > 0 for r in results)
    assert steady_net.graph_passes == 0
    AdaptiveCorrector(ensemble, replace(settings, members="all")).correct(*case)
    assert steady_net.graph_passes > 0


class _ConstantNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros((x.shape[0], 10), device=x.device)
        logits[:, 0] = 5.0
        return logits + self.scale * x.mean()


def test_ensemble_loss_skips_members_with_zero_weight() -> None:
    first, second = tiny_classifier("a", seed=1), tiny_classifier("b", seed=2)
    counter = _CountingNet(second.model)
    ensemble = Ensemble([first, Classifier("b", counter, second.preprocessing, second.labels)])
    frames = [_tensor(f).requires_grad_(True) for f in noise_frames(3)]
    targets = torch.zeros((2, 3), dtype=torch.long)
    weights = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    loss = ensemble.loss(frames, targets, weights)
    assert counter.graph_passes == 0
    assert loss[1] == 0
    full = ensemble.loss(frames, targets)
    assert counter.graph_passes == 1
    assert torch.allclose(loss[0], first.loss(first.logits(frames[:1]), targets[0, :1])[0])
    assert full[0] > loss[0]


@pytest.mark.parametrize("point", ["published", "codec"])
def test_gradient_point_sees_the_published_pixels(point: GradientPoint) -> None:
    """Both views have the published pixels as their value; `codec` routes the gradient through a
    differentiable JPEG inside the region's 16-pixel blocks (none outside), `published` passes it straight."""
    (frame,) = noise_frames(1)
    region = torch.zeros((1, 64, 96), dtype=torch.bool)
    region[:, 20:40, 30:60] = True
    published = _tensor(Encoder(quality=75).roundtrip(frame).decoded)
    current = _tensor(frame).requires_grad_(True)
    seen = seen_by_classifier(current, published, region, point, 75)
    assert torch.allclose(seen, published)
    weights = torch.randn(seen.shape, generator=torch.Generator().manual_seed(0))
    (gradient,) = torch.autograd.grad((seen * weights).sum(), [current])
    if point == "published":
        assert torch.equal(gradient, weights)
    else:
        assert not torch.allclose(gradient[:, 16:48, 16:64], weights[:, 16:48, 16:64], atol=1e-3)
        assert torch.count_nonzero(gradient[:, :, 80:]) == 0, "outside the region's JPEG blocks nothing moves"


@pytest.mark.parametrize(
    "bad",
    [{"alpha": 0.0}, {"max_change": 300}, {"max_iterations": -1}, {"step_scales": ()}, {"step_scales": (1.0, -2.0)}],
)
def test_settings_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        CorrectionSettings(**bad)  # type: ignore[arg-type]


def test_several_step_scales_need_the_published_check() -> None:
    with pytest.raises(ValueError, match="stop: published"):
        CorrectionSettings(step_scales=(1.0, 2.0), stop="float")


def test_a_line_search_needs_fewer_steps_and_keeps_the_smallest_scale_that_works() -> None:
    """step_scales tries each multiple of the step on the published bytes and keeps the smallest that restores
    the decision: frames one plain step fixes come out identical, the others need fewer gradient steps."""
    ensemble = Ensemble([tiny_classifier()])
    case = _flipped(ensemble, masked_case(count=48, seed=5))
    plain = CorrectionSettings(alpha=0.05, step="max", through_codec=False, max_change=128, time_budget_ms=None)
    encoder = _CountingEncoder()
    searched = AdaptiveCorrector(ensemble, replace(plain, step_scales=(1.0, 2.0, 4.0)), encoder=encoder)
    one = AdaptiveCorrector(ensemble, plain).correct(*case)
    many = searched.correct(*case)
    assert all(r.consistent for r in many), [r.stop_reason for r in many]
    reference, _ = ensemble.decide([_tensor(f) for f in case[0]])
    published, _ = ensemble.decide([_tensor(r.encoded.decoded) for r in many])
    assert torch.equal(reference, published)
    single_step = [k for k, r in enumerate(one) if r.iterations == 1]
    assert single_step, "the test needs frames one plain step fixes"
    for k in single_step:
        assert many[k].iterations == 1 and np.array_equal(many[k].pixels, one[k].pixels)
    assert sum(r.iterations for r in many) < sum(r.iterations for r in one)
    # One batched check of three candidates per step, and no second check of the kept one.
    steps = sum(r.iterations for r in many)
    assert encoder.roundtrips == len(many) + 3 * steps


class _CountingEncoder(Encoder):
    def __init__(self) -> None:
        super().__init__()
        self.roundtrips = 0

    def roundtrip(self, frame: Pixels) -> Encoded:
        self.roundtrips += 1
        return super().roundtrip(frame)


class _FindsWhatMoved:
    """A fake detector: finds `box` on a published frame whenever its pixels there differ from the uncorrected
    frame's published pixels (`always`: on every frame, the uncorrected ones too)."""

    def __init__(self, naive: list[Frame], box: Region, always: bool = False) -> None:
        self.naive, self.box, self.always = naive, box, always
        self.calls = 0

    def __call__(self, positions: Sequence[int], published: Sequence[Frame]) -> list[list[BoxGeometry]]:
        self.calls += 1
        x1, y1, x2, y2 = int(self.box.x1), int(self.box.y1), int(self.box.x2), int(self.box.y2)
        return [
            [self.box] if self.always or not np.array_equal(p[y1:y2, x1:x2], self.naive[k][y1:y2, x1:x2]) else []
            for k, p in zip(positions, published, strict=True)
        ]


def test_what_the_correction_makes_detectable_goes_back_to_its_anonymized_pixels() -> None:
    ensemble = Ensemble([tiny_classifier()])
    originals, anonymized, masks = _flipped(ensemble, masked_case())
    naive = [Encoder().roundtrip(a).decoded for a in anonymized]
    left_half = Region(24, 16, 48, 48)  # of the masked box (24, 16, 72, 48)
    finder = _FindsWhatMoved(naive, left_half)
    settings = CorrectionSettings(max_change=128, time_budget_ms=None)
    results = AdaptiveCorrector(ensemble, settings).correct(originals, anonymized, masks, finder)
    assert finder.calls > 0
    for result, anon in zip(results, anonymized, strict=True):
        assert np.array_equal(result.pixels[16:48, 24:48], anon[16:48, 24:48]), "the found box was put back"
        assert result.consistent or result.stop_reason in ("found_again", "iteration_budget")
    assert any(r.consistent and r.iterations > 0 for r in results), "the rest of the region still corrects"
    # Without the guard the correction moves pixels in that box.
    unguarded = AdaptiveCorrector(ensemble, settings).correct(originals, anonymized, masks)
    assert any(
        not np.array_equal(r.pixels[16:48, 24:48], a[16:48, 24:48]) for r, a in zip(unguarded, anonymized, strict=True)
    )


class _SeesAnyChange(_FindsWhatMoved):
    """A fake detector whose score depends on context: finds `box` whenever any pixel of `context` differs from
    the uncorrected frame's, so putting back `box` alone does not hide it."""

    def __init__(self, naive: list[Frame], box: Region, context: Region) -> None:
        super().__init__(naive, box)
        self.context = context

    def __call__(self, positions: Sequence[int], published: Sequence[Frame]) -> list[list[BoxGeometry]]:
        self.calls += 1
        x1, y1, x2, y2 = int(self.context.x1), int(self.context.y1), int(self.context.x2), int(self.context.y2)
        return [
            [self.box] if not np.array_equal(p[y1:y2, x1:x2], self.naive[k][y1:y2, x1:x2]) else []
            for k, p in zip(positions, published, strict=True)
        ]


def test_a_box_found_again_where_it_went_back_goes_back_with_more_until_it_is_not_found() -> None:
    """Putting back the found box is not enough when the detection depends on pixels around it: the guard widens
    what goes back (the box grown, then the whole frame), and no frame is published with the detection."""
    ensemble = Ensemble([tiny_classifier()])
    originals, anonymized, masks = _flipped(ensemble, masked_case())
    naive = [Encoder().roundtrip(a).decoded for a in anonymized]
    finder = _SeesAnyChange(naive, Region(24, 16, 32, 24), context=Region(24, 16, 72, 48))  # the whole masked box
    settings = CorrectionSettings(max_change=128, time_budget_ms=None)
    results = AdaptiveCorrector(ensemble, settings).correct(originals, anonymized, masks, finder)
    assert any(r.iterations > 0 for r in results)
    published = [r.encoded.decoded for r in results]
    assert finder(list(range(len(results))), published) == [[] for _ in results], "a detection was published"
    for result, anon in zip(results, anonymized, strict=True):
        assert np.array_equal(result.pixels, anon), "only the uncorrected pixels hide it here"
        assert result.stop_reason in ("found_again", "already_consistent", "corrected")


def test_a_box_found_again_where_it_went_back_goes_back_with_its_surroundings_first() -> None:
    """When the surroundings are enough (here the context lies in the box grown by its size), the rest of the
    region keeps its correction."""
    ensemble = Ensemble([tiny_classifier()])
    originals, anonymized, masks = _flipped(ensemble, masked_case())
    naive = [Encoder().roundtrip(a).decoded for a in anonymized]
    # The box alone going back leaves JPEG blocks beside it changed; grown by its size it covers them.
    box = Region(24, 16, 40, 32)
    finder = _SeesAnyChange(naive, box, context=box)
    settings = CorrectionSettings(max_change=128, time_budget_ms=None)
    results = AdaptiveCorrector(ensemble, settings).correct(originals, anonymized, masks, finder)
    published = [r.encoded.decoded for r in results]
    assert finder(list(range(len(results))), published) == [[] for _ in results], "a detection was published"
    for result, anon in zip(results, anonymized, strict=True):
        assert np.array_equal(result.pixels[0:48, 8:56], anon[0:48, 8:56]), "the grown box went back"
    assert any(r.consistent and r.iterations > 0 for r in results), "the rest of the region still corrects"


def test_what_was_found_before_the_correction_is_not_its_doing() -> None:
    """A box found on the uncorrected frame too is the anonymizer's: the correction keeps its pixels there."""
    ensemble = Ensemble([tiny_classifier()])
    originals, anonymized, masks = _flipped(ensemble, masked_case())
    finder = _FindsWhatMoved([], Region(24, 16, 48, 48), always=True)
    settings = CorrectionSettings(max_change=128, time_budget_ms=None)
    guarded = AdaptiveCorrector(ensemble, settings).correct(originals, anonymized, masks, finder)
    plain = AdaptiveCorrector(ensemble, settings).correct(originals, anonymized, masks)
    assert finder.calls > 0
    for g, p in zip(guarded, plain, strict=True):
        assert np.array_equal(g.pixels, p.pixels) and g.stop_reason == p.stop_reason


def test_the_salient_window_of_several_classifiers_counts_each_of_them() -> None:
    """One classifier: its own window. Several: each one's map counts equally, so their order does not matter
    (the window used to come from the first one only)."""
    first, second = tiny_classifier("a", seed=1), tiny_classifier("b", seed=2)
    frames = [_tensor(f) for f in noise_frames(6, seed=8)]
    for frame in frames:
        assert salient_window([first, first], frame, 12) == salient_window(first, frame, 12)
        assert salient_window([first, second], frame, 12) == salient_window([second, first], frame, 12)
    alone = [salient_window(first, f, 12) for f in frames]
    assert alone != [salient_window([first, second], f, 12) for f in frames], "the second classifier must count"
