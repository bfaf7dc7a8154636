"""Correction step variants on real frames: iterations (mean, p95), published checks, largest pixel change,
decisions still changed per member, correction time, and faces the detector finds again because of the
correction. For one model (Lite0) and the Lite0+1+2 ensemble (top-1 decisions), at JPEG q90 and q75.

Two cases: `salient` is the paper's setting (the classifier's most salient 50x50 window blurred with sigma
0.2 x its side) on every Nth vtest.avi frame and the photos; `faces` blurs the faces the default detectors find
(the default anonymizer and padding) on every Nth frame of vtest.avi that has one, and counts the faces
CenterFace finds again on the published frame (whole frame, inside an anonymized box) that it did not find
on the uncorrected one. Prints a table and writes bench/results/steps.json."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for the salient case of correction.py

from correction import RealCase, real_case
from veilstream.config import BUILTIN_CLASSIFIERS, ClassifierConfig, VeilstreamConfig
from veilstream.correction.classifier import Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionResult, CorrectionSettings, FoundAgain
from veilstream.correction.loading import build_classifier
from veilstream.decoding.files import iter_video
from veilstream.decoding.images import Frame
from veilstream.detectors.base import Detection
from veilstream.detectors.combined import CombinedDetector
from veilstream.detectors.finders import FoundRegions, residual_detections
from veilstream.factory import build_pipeline
from veilstream.geometry import BoxGeometry
from veilstream.publishing.encoding import Encoded, Encoder, Pixels

RESULTS = Path(__file__).parent / "results"
MEDIA = Path.home() / ".cache" / "veilstream" / "media"

PAPER = CorrectionSettings(alpha=0.1, step="max", through_codec=False, time_budget_ms=None)
SIGN = CorrectionSettings(alpha=0.03, step="sign", through_codec=True, time_budget_ms=None)
VARIANTS: dict[str, CorrectionSettings] = {
    "paper": PAPER,
    "paper, scales 1-2-4": replace(PAPER, step_scales=(1.0, 2.0, 4.0)),
    "paper, scales 1-2-3": replace(PAPER, step_scales=(1.0, 2.0, 3.0)),
    "sign codec": SIGN,
    "sign codec, scales 1-2-4": replace(SIGN, step_scales=(1.0, 2.0, 4.0)),
    "sign codec, scales 1-2-3": replace(SIGN, step_scales=(1.0, 2.0, 3.0)),
    "sign codec, scales 1-1.5-2-3": replace(SIGN, step_scales=(1.0, 1.5, 2.0, 3.0)),
    "sign codec, scales 1-1.5-2": replace(SIGN, step_scales=(1.0, 1.5, 2.0)),
}
# Variants with the correction guard (the faces case only): the name of the unguarded variant + this suffix.
GUARDED = ", guarded"


class CountingEncoder(Encoder):
    """Counts round trips: each is one check of a frame's decisions on published bytes."""

    def __init__(self, codec: str, quality: int) -> None:
        super().__init__(codec, quality)  # type: ignore[arg-type]
        self.roundtrips = 0

    def roundtrip(self, frame: Pixels) -> Encoded:
        self.roundtrips += 1
        return super().roundtrip(frame)


@dataclass
class FacesCase:
    originals: list[Frame]
    anonymized: list[Frame]
    masks: list[npt.NDArray[np.bool_]]
    faces: list[list[Detection]]  # the anonymized face boxes


def faces_case(video: Path, step: int, limit: int) -> tuple[FacesCase, CombinedDetector]:
    config = VeilstreamConfig.model_validate({"correction": {"enabled": False}, "pipeline": {"residual_check": "flag"}})
    pipeline = build_pipeline(config)
    frames = [item.frame for item in iter_video(video, step, limit) if item.frame is not None]
    prepared = pipeline.prepare(frames)
    case = FacesCase([], [], [], [])
    for frame, found, anon, mask in zip(frames, prepared.found, prepared.anonymized, prepared.masks, strict=True):
        if not isinstance(found, FoundRegions) or anon is None or mask is None:
            continue
        faces = [d for d in found.detections if d.kind == "face"]
        if faces:
            case.originals.append(frame)
            case.anonymized.append(anon)
            case.masks.append(mask)
            case.faces.append(faces)
    assert isinstance(pipeline.leak_detector, CombinedDetector)
    return case, pipeline.leak_detector


def found_again(
    detector: CombinedDetector, published: Sequence[Frame], faces: Sequence[list[Detection]]
) -> list[list[Detection]]:
    # Unmerged, as the residual check matches them: two boxes of one face merged can fall out of its anonymized box.
    again = detector.detect_kinds(list(published), [{"face"}] * len(published), merge=False)
    return [residual_detections(f, a) for f, a in zip(faces, again, strict=True)]


def added_by_correction(naive: Sequence[list[Detection]], final: Sequence[list[Detection]]) -> int:
    """Faces found again on the corrected frame with no box found again at that place on the naive one."""
    return sum(1 for n, f in zip(naive, final, strict=True) for box in f if not any(box.iou(o) > 0.3 for o in n))


def run_variant(
    ensemble: Ensemble,
    settings: CorrectionSettings,
    guard: FoundAgain | None,
    quality: int,
    originals: list[Frame],
    anonymized: list[Frame],
    masks: list[npt.NDArray[np.bool_]],
    batch: int,
) -> tuple[list[CorrectionResult], dict[str, float]]:
    encoder = CountingEncoder("jpeg", quality)
    corrector = AdaptiveCorrector(ensemble, settings, encoder=encoder)
    results: list[CorrectionResult] = []
    began = time.perf_counter()
    for start in range(0, len(originals), batch):
        part = slice(start, start + batch)
        guarded = None if guard is None else _shifted(guard, start)
        results += corrector.correct(originals[part], anonymized[part], masks[part], guarded)
    elapsed = (time.perf_counter() - began) * 1000
    stepped = [r.iterations for r in results if r.iterations]
    members = [d.classifier for d in results[0].original]
    row: dict[str, float] = {
        "frames": len(results),
        "frames_stepped": len(stepped),
        "mean_iterations": statistics.fmean(stepped) if stepped else 0.0,
        "p95_iterations": float(np.percentile(stepped, 95)) if stepped else 0.0,
        "checks_per_frame": encoder.roundtrips / len(results),
        "max_pixel_change": max(r.max_pixel_change for r in results),
        "ms_per_frame": elapsed / len(results),
        "inconsistent": sum(not r.consistent for r in results),
    }
    for m, name in enumerate(members):
        row[f"naive_changed {name}"] = sum(r.naive[m].index != r.original[m].index for r in results)
        row[f"final_changed {name}"] = sum(r.final[m].index != r.original[m].index for r in results)
    return results, row


def _shifted(guard: FoundAgain, offset: int) -> FoundAgain:
    """`guard` for a batch that starts at `offset` of the case."""

    def found(positions: Sequence[int], published: Sequence[Frame]) -> list[list[BoxGeometry]]:
        return guard([offset + p for p in positions], published)

    return found


def faces_guard(detector: CombinedDetector, faces: FacesCase) -> FoundAgain:
    """What the pipeline's guard does: the residual check's detection on published pixels (windows first)."""

    def found(positions: Sequence[int], published: Sequence[Frame]) -> list[list[BoxGeometry]]:
        boxes = [faces.faces[p] for p in positions]
        again = detector.detect_kinds(list(published), [{"face"}] * len(published), boxes, merge=False)
        return [list(residual_detections(b, a)) for b, a in zip(boxes, again, strict=True)]

    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--media", type=Path, default=MEDIA)
    parser.add_argument("--video-step", type=int, default=20, help="salient case: every Nth vtest.avi frame")
    parser.add_argument("--faces-step", type=int, default=5, help="faces case: every Nth vtest.avi frame")
    parser.add_argument("--faces-limit", type=int, default=400, help="faces case: frames of vtest.avi read")
    parser.add_argument("--qualities", type=int, nargs="+", default=[90, 75])
    names = [*VARIANTS, *(name + GUARDED for name in VARIANTS)]
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=names)
    parser.add_argument("--cases", nargs="+", default=["salient", "faces"], choices=["salient", "faces"])
    parser.add_argument("--ensembles", nargs="+", default=["lite0", "lite0+1+2"], choices=["lite0", "lite0+1+2"])
    parser.add_argument("--out", type=Path, default=RESULTS / "steps.json")
    args = parser.parse_args()
    members = [build_classifier(ClassifierConfig(source=name, grouping=None), "cpu") for name in BUILTIN_CLASSIFIERS]
    ensembles = {"lite0": Ensemble(members[:1]), "lite0+1+2": Ensemble(members)}
    cases: dict[str, RealCase] = {}
    faces: FacesCase | None = None
    detector: CombinedDetector | None = None
    if "salient" in args.cases:
        cases["salient"] = real_case(args.media, args.video_step, ensembles["lite0"])
    if "faces" in args.cases:
        faces, detector = faces_case(args.media / "vtest.avi", args.faces_step, args.faces_limit)
        cases["faces"] = (faces.originals, faces.anonymized, faces.masks)
    rows: list[dict[str, object]] = []
    header = (
        f"{'case':>8} {'models':>10} {'q':>3} {'variant':>26} {'stepped':>8} {'mean it':>8} {'p95 it':>7}"
        f" {'checks/fr':>9} {'max chg':>8} {'ms/frame':>9} {'changed naive->final per member':>34} {'faces added':>11}"
    )
    print(header)
    for case_name, (originals, anonymized, masks) in cases.items():
        for quality in args.qualities:
            naive_again: list[list[Detection]] | None = None
            if case_name == "faces":
                assert faces is not None and detector is not None
                naive = [Encoder("jpeg", quality).roundtrip(a).decoded for a in anonymized]
                naive_again = found_again(detector, naive, faces.faces)
            for ensemble_name in args.ensembles:
                for variant in args.variants:
                    guard = None
                    if variant.endswith(GUARDED):
                        if faces is None or detector is None or case_name != "faces":
                            continue  # the guard needs detected objects
                        guard = faces_guard(detector, faces)
                    settings = VARIANTS[variant.removesuffix(GUARDED)]
                    results, row = run_variant(
                        ensembles[ensemble_name], settings, guard, quality, originals, anonymized, masks, batch=8
                    )
                    added = None
                    if naive_again is not None and faces is not None and detector is not None:
                        final_again = found_again(detector, [r.encoded.decoded for r in results], faces.faces)
                        row["faces_found_again_naive"] = sum(map(len, naive_again))
                        row["faces_found_again_final"] = sum(map(len, final_again))
                        added = added_by_correction(naive_again, final_again)
                        row["faces_added_by_correction"] = added
                    names = [d.classifier for d in results[0].original]
                    changes = " ".join(f"{row[f'naive_changed {n}']}->{row[f'final_changed {n}']}" for n in names)
                    print(
                        f"{case_name:>8} {ensemble_name:>10} {quality:>3} {variant:>26} {row['frames_stepped']:>8}"
                        f" {row['mean_iterations']:>8.2f} {row['p95_iterations']:>7.1f} {row['checks_per_frame']:>9.2f}"
                        f" {row['max_pixel_change']:>8} {row['ms_per_frame']:>9.1f} {changes:>34}"
                        f" {'-' if added is None else added:>11}",
                        flush=True,
                    )
                    rows.append(
                        {"case": case_name, "models": ensemble_name, "quality": quality, "variant": variant, **row}
                    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "frames": {name: len(case[0]) for name, case in cases.items()},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
