"""Correction-stage costs on CPU: classify-only, blur-only, the corrector with nothing to correct (reference +
published check) and one correction iteration, at 224x224 and at full frame resolution, for EfficientNet-Lite0
alone and for the Lite0+1+2 ensemble. Then the whole correction on real frames (the paper's salient window
blurred), one model against the ensemble, in interleaved rounds. Medians of repeated runs; prints tables and
writes bench/results/correction.json."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from veilstream.anonymizers.filters import GaussianBlur
from veilstream.anonymizers.regions import Region, region_mask
from veilstream.config import BUILTIN_CLASSIFIERS, ClassifierConfig, CorrectionConfig
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.correction.loading import build_classifier, correction_settings
from veilstream.correction.saliency import salient_window
from veilstream.decoding.files import file_items
from veilstream.decoding.images import Frame
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


def bench(height: int, width: int, repeats: int, ensemble: Ensemble) -> dict[str, float]:
    rng = np.random.default_rng(0)
    frame = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)).float()
    region = Region(width * 0.4, height * 0.4, width * 0.6, height * 0.6)
    mask = region_mask([region], height, width, torch.device("cpu"))
    blur = GaussianBlur()
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


RealCase = tuple[list[Frame], list[Frame], list[npt.NDArray[np.bool_]]]


def real_case(media: Path, video_step: int, lite0: Ensemble) -> RealCase:
    """Every `video_step`-th frame of vtest.avi plus the photos, the Lite0-salient 50x50 window blurred as in
    config/paper.yaml (sigma 0.2 x the window's side)."""
    originals, anonymized, masks = [], [], []
    blur = GaussianBlur(relative_sigma=0.2)
    for item in file_items([media], video_step=video_step):
        if item.frame is None:
            continue
        frame = torch.from_numpy(np.ascontiguousarray(item.frame)).permute(2, 0, 1).float()
        region = salient_window(lite0.members[0], frame, 50)
        blurred = blur.anonymize(frame, [region]).round().to(torch.uint8).permute(1, 2, 0)
        anonymized.append(np.ascontiguousarray(blurred.numpy()))
        masks.append(region_mask([region], frame.shape[1], frame.shape[2], torch.device("cpu")).numpy())
        originals.append(item.frame)
    return originals, anonymized, masks


def bench_real(
    case: RealCase, correctors: dict[str, AdaptiveCorrector], rounds: int, batch: int
) -> dict[str, dict[str, float]]:
    """Correction time per frame on real frames; within a round each corrector runs on a batch before any runs on
    the next (the machine's load changes within seconds), and each round's totals give one sample."""
    originals, anonymized, masks = case
    totals: dict[str, list[float]] = {name: [] for name in correctors}
    iterations: dict[str, list[int]] = {name: [] for name in correctors}
    for _ in range(rounds):
        spent = dict.fromkeys(correctors, 0.0)
        for start in range(0, len(originals), batch):
            part = slice(start, start + batch)
            for name, corrector in correctors.items():
                began = time.perf_counter()
                results = corrector.correct(originals[part], anonymized[part], masks[part])
                spent[name] += (time.perf_counter() - began) * 1000
                if len(totals[name]) == 0:
                    iterations[name] += [r.iterations for r in results]
        for name in correctors:
            totals[name].append(spent[name] / len(originals))
    # Each row against Lite0 alone with the same step (the name's part after the classifiers).
    single = {name.split(" ", 1)[1]: statistics.median(totals[name]) for name in totals if name.startswith("lite0 ")}
    return {
        name: {
            "ms_per_frame": statistics.median(samples),
            "vs_lite0": statistics.median(samples) / single[name.split(" ", 1)[1]],
            "mean_iterations": float(np.mean([n for n in iterations[name] if n] or [0])),
        }
        for name, samples in totals.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--media", type=Path, default=Path.home() / ".cache" / "veilstream" / "media")
    parser.add_argument("--video-step", type=int, default=40, help="real frames: every Nth vtest.avi frame")
    parser.add_argument("--rounds", type=int, default=3, help="real frames: timing rounds")
    parser.add_argument("--out", type=Path, default=RESULTS / "correction.json")
    args = parser.parse_args()
    members = [build_classifier(ClassifierConfig(source=name, grouping=None), "cpu") for name in BUILTIN_CLASSIFIERS]
    ensembles = {"lite0": Ensemble(members[:1]), "lite0+1+2": Ensemble(members)}
    rows = {
        f"{h}x{w} {name}": bench(h, w, args.repeats, ensemble)
        for h, w in ((224, 224), (1080, 1920))
        for name, ensemble in ensembles.items()
    }
    print(
        f"{'frame':>20} {'classify ms':>12} {'blur ms':>9} {'correct, no step ms':>20} {'1 iteration ms':>15}"
        f" {'iteration/classify':>19}"
    )
    for name, row in rows.items():
        ratio = row["iteration_ms"] / row["classify_ms"]
        print(
            f"{name:>20} {row['classify_ms']:>12.1f} {row['blur_ms']:>9.1f} {row['correct_no_step_ms']:>20.1f}"
            f" {row['iteration_ms']:>15.1f} {ratio:>19.2f}"
        )
    case = real_case(args.media, args.video_step, ensembles["lite0"])
    steps = {
        "default step": replace(correction_settings(CorrectionConfig()), time_budget_ms=None),
        "paper step": CorrectionSettings(
            alpha=0.1, step="max", through_codec=False, members="all", time_budget_ms=None
        ),
    }
    correctors = {
        f"{name} {step}": AdaptiveCorrector(e, settings, encoder=Encoder("jpeg", 90))
        for step, settings in steps.items()
        for name, e in ensembles.items()
    }
    real = bench_real(case, correctors, args.rounds, batch=8)
    print(
        f"\ncorrection on {len(case[0])} real frames (salient 50x50 window, JPEG q90), medians of {args.rounds} rounds"
    )
    print(f"{'classifiers, step':>26} {'ms per frame':>13} {'vs lite0':>9} {'mean iterations':>16}")
    for name, row in real.items():
        print(f"{name:>26} {row['ms_per_frame']:>13.1f} {row['vs_lite0']:>9.2f} {row['mean_iterations']:>16.2f}")
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
                "real_frames": {"frames": len(case[0]), "rounds": args.rounds, "results": real},
            },
            indent=2,
        )
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
