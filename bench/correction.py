"""Correction-stage costs on CPU: classify-only, blur-only, the corrector with nothing to correct (reference +
published check) and one correction iteration, at 224x224 and at full frame resolution. Medians of repeated runs;
prints a table and writes bench/results/correction.json."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from veilstream.anonymizers.filters import GaussianBlur
from veilstream.anonymizers.regions import Region, region_mask
from veilstream.correction.classifier import (
    Classifier,
    Ensemble,
    Preprocessing,
    imagenet_labels,
    load_efficientnet_lite0,
)
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.publishing.encoding import Encoder

RESULTS = Path(__file__).parent / "results"


def _median_ms(run: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def bench(height: int, width: int, repeats: int, classifier: Classifier) -> dict[str, float]:
    rng = np.random.default_rng(0)
    frame = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)).float()
    region = Region(width * 0.4, height * 0.4, width * 0.6, height * 0.6)
    mask = region_mask([region], height, width, torch.device("cpu"))
    blur = GaussianBlur()
    ensemble = Ensemble([classifier])
    target = ensemble.decide([frame])[0]
    encoder = Encoder("jpeg", 90)
    # No step allowed: the reference classification and one published check, what a frame costs that needs none.
    corrector = AdaptiveCorrector(ensemble, CorrectionSettings(max_iterations=0), encoder=encoder)
    original = frame.round().to(torch.uint8).permute(1, 2, 0).numpy()
    anonymized = blur.anonymize(frame, [region]).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    region_pixels = mask.numpy()

    def classify() -> object:
        return ensemble.decide([frame])

    def anonymize() -> object:
        return blur.anonymize(frame, [region])

    def correct_without_step() -> object:
        (result,) = corrector.correct([original], [np.ascontiguousarray(anonymized)], [region_pixels])
        return result.encoded.data

    def iteration() -> object:
        # One step as the corrector does it: forward + backward to full-resolution pixels, masked step,
        # then the published check (uint8, JPEG q90 encode + decode, classify).
        x = frame.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(ensemble.loss([x], target).sum(), [x])
        masked = gradient * mask
        stepped = (frame - corrector.step * masked / masked.abs().max().clamp_min(1e-12)).clamp(0, 255)
        pixels = stepped.round().to(torch.uint8).permute(1, 2, 0).numpy()
        published = encoder.roundtrip(np.ascontiguousarray(pixels))
        return ensemble.decide([torch.from_numpy(published.decoded).permute(2, 0, 1).float()])

    return {
        "classify_ms": _median_ms(classify, repeats),
        "blur_ms": _median_ms(anonymize, repeats),
        "correct_no_step_ms": _median_ms(correct_without_step, repeats),
        "iteration_ms": _median_ms(iteration, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "correction.json")
    args = parser.parse_args()
    classifier = Classifier("efficientnet-lite0", load_efficientnet_lite0(), Preprocessing(), imagenet_labels())
    rows = {f"{h}x{w}": bench(h, w, args.repeats, classifier) for h, w in ((224, 224), (1080, 1920))}
    print(
        f"{'frame':>10} {'classify ms':>12} {'blur ms':>9} {'correct, no step ms':>20} {'1 iteration ms':>15}"
        f" {'iteration/classify':>19}"
    )
    for name, row in rows.items():
        ratio = row["iteration_ms"] / row["classify_ms"]
        print(
            f"{name:>10} {row['classify_ms']:>12.1f} {row['blur_ms']:>9.1f} {row['correct_no_step_ms']:>20.1f}"
            f" {row['iteration_ms']:>15.1f} {ratio:>19.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "repeats": args.repeats,
                "statistic": "median",
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
