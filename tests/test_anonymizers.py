from __future__ import annotations

import pytest
import torch

from veilstream.anonymizers.filters import GaussianBlur, Pixelate, SolidMask
from veilstream.anonymizers.regions import Region, region_mask

from .conftest import noise_frames


def _frame() -> torch.Tensor:
    return torch.from_numpy(noise_frames(1, 120, 160)[0]).permute(2, 0, 1).float()


@pytest.mark.parametrize(
    "anonymizer", [GaussianBlur(), GaussianBlur(kernel=9, sigma=10), Pixelate(), SolidMask(value=0)]
)
@pytest.mark.parametrize("shape", ["box", "ellipse"])
def test_only_the_region_changes(anonymizer: GaussianBlur | Pixelate | SolidMask, shape: str) -> None:
    frame = _frame()
    region = Region(30, 20, 110, 90, shape)  # type: ignore[arg-type]
    out = anonymizer.anonymize(frame, [region])
    mask = region_mask([region], 120, 160, frame.device)
    assert torch.equal(out[:, ~mask], frame[:, ~mask])
    assert (out[:, mask] - frame[:, mask]).abs().mean() > 5
    assert torch.equal(frame, _frame()), "the input must not be modified"


def test_default_blur_scales_with_the_region() -> None:
    blur = GaussianBlur()
    small_sigma, _ = blur.parameters_for(Region(0, 0, 20, 20))
    large_sigma, large_kernel = blur.parameters_for(Region(0, 0, 400, 300))
    assert large_sigma == pytest.approx(150.0)
    assert large_sigma > small_sigma
    assert large_kernel >= 6 * large_sigma


def test_blur_removes_detail_inside_a_region() -> None:
    frame = _frame()
    region = Region(0, 0, 160, 120)
    out = GaussianBlur().anonymize(frame, [region])
    detail_before = (frame[:, :, 1:] - frame[:, :, :-1]).abs().mean()
    detail_after = (out[:, :, 1:] - out[:, :, :-1]).abs().mean()
    assert detail_after < detail_before / 5


def test_ellipse_mask_is_inside_its_box() -> None:
    region = Region(10, 10, 50, 30, "ellipse")
    mask = region_mask([region], 40, 60, torch.device("cpu"))
    box = region_mask([Region(10, 10, 50, 30)], 40, 60, torch.device("cpu"))
    assert mask.sum() < box.sum()
    assert not (mask & ~box).any()
    assert mask[20, 30] and not mask[10, 10]


def test_regions_outside_the_frame_are_ignored_and_clipped() -> None:
    frame = _frame()
    out = SolidMask().anonymize(frame, [Region(500, 500, 600, 600), Region(-20, -20, 10, 10)])
    assert torch.all(out[:, :10, :10] == 128)
    assert torch.equal(out[:, 10:, 10:], frame[:, 10:, 10:])


def test_invalid_regions_are_refused() -> None:
    with pytest.raises(ValueError, match="positive size"):
        Region(10, 10, 5, 20)
    with pytest.raises(ValueError, match="finite"):
        Region(float("nan"), 0, 1, 1)


def test_padding_grows_each_side() -> None:
    padded = Region(10, 10, 30, 20).padded(0.5)
    assert (padded.x1, padded.y1, padded.x2, padded.y2) == (0, 5, 40, 25)


def test_wide_blur_matches_a_direct_gaussian() -> None:
    """The shrink-blur-enlarge path stays close to the exact (slow) wide Gaussian."""
    from veilstream.anonymizers.filters import separable_gaussian

    frame = _frame()
    region = Region(0, 0, 160, 120)
    blur = GaussianBlur(relative_sigma=0.1)
    sigma, size = blur.parameters_for(region)
    assert sigma > 8
    fast = blur.anonymize(frame, [region])
    exact = separable_gaussian(frame, sigma, size)
    assert (fast - exact).abs().mean() < 3.0


@pytest.mark.parametrize("anonymizer", [GaussianBlur(), GaussianBlur(kernel=9, sigma=10), Pixelate(), SolidMask()])
def test_a_uint8_frame_is_hidden_as_its_float_copy_rounded(anonymizer: GaussianBlur | Pixelate | SolidMask) -> None:
    """The pipeline hands uint8 frames over (only the regions become float): the pixels must be the same."""
    frame = torch.from_numpy(noise_frames(1, height=120, width=160, seed=3)[0]).permute(2, 0, 1)
    regions = [Region(10, 10, 70, 90, "box"), Region(50, 40, 150, 110, "ellipse"), Region(150, 100, 170, 130, "box")]
    as_float = anonymizer.anonymize(frame.float(), regions).round().clamp(0, 255).to(torch.uint8)
    as_uint8 = anonymizer.anonymize(frame, regions)
    assert as_uint8.dtype == torch.uint8
    assert torch.equal(as_uint8, as_float)
    assert not torch.equal(as_uint8, frame)
