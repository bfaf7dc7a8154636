"""Shared fixtures: real sample media, the shipped EfficientNet-Lite0, and a tiny deterministic classifier."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from veilstream.correction.classifier import Classifier, Preprocessing, imagenet_labels, load_efficientnet_lite0
from veilstream.decoding.images import Frame

MEDIA = Path(os.environ.get("VEILSTREAM_MEDIA", Path.home() / ".cache" / "veilstream" / "media"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA is present; elsewhere they are skipped, so never counted as passed."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="not run: CUDA not present"))


@pytest.fixture(scope="session")
def media() -> Path:
    if not (MEDIA / "vtest.avi").is_file():
        pytest.fail(f"sample media missing in {MEDIA}: run `make media` (make test does it)")
    return MEDIA


def read_rgb(path: Path) -> Frame:
    bgr = cv2.imread(str(path))
    assert bgr is not None, path
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def video_frame(path: Path, index: int) -> Frame:
    capture = cv2.VideoCapture(str(path))
    capture.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, bgr = capture.read()
    capture.release()
    assert ok, f"{path} frame {index}"
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="session")
def lite0() -> Classifier:
    """EfficientNet-Lite0 with top-1 ImageNet decisions (the paper's setting)."""
    return Classifier("efficientnet-lite0", load_efficientnet_lite0(), Preprocessing(), imagenet_labels())


class TinyNet(nn.Module):
    """A small random CNN: fast, deterministic, and sensitive to the pixels we change."""

    def __init__(self, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16 * 16 * 16, classes)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # type: ignore[no-any-return]


def tiny_classifier(name: str = "tiny", seed: int = 0, classes: int = 10) -> Classifier:
    preprocessing = Preprocessing(input_size=(32, 32), scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return Classifier(name, TinyNet(classes, seed), preprocessing, [f"class{i}" for i in range(classes)])


def noise_frames(count: int, height: int = 64, width: int = 96, seed: int = 0) -> list[Frame]:
    """Smooth random images (JPEG-friendly, unlike white noise)."""
    rng = np.random.default_rng(seed)
    frames: list[Frame] = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        smooth = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        frames.append(np.ascontiguousarray(smooth, dtype=np.uint8))
    return frames
