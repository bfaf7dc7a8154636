"""The residual check in windows against the whole frame: residual boxes missed or added, per anonymizer.

Weak anonymizers leave faces to be found again; each frame is checked twice on the same published pixels, with
`residual_scope: frame` (CenterFace on the whole frame) and `around` (screen and confirmations in windows), and
the boxes are matched at IoU 0.9. Consecutive vtest.avi frames from frame 100 (with the detection memory) and,
at 768x576, the sample photos; `--size 1920x1080` upscales the frames. Prints a table, writes JSON.
Usage: python bench/residual_windows.py [--frames 159] [--size 1920x1080] [--out bench/results/residual_windows.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import Frame, decode_frame
from veilstream.detectors.combined import CONFIRM_MARGIN, CombinedDetector
from veilstream.detectors.memory import FrameKey
from veilstream.detectors.windows import WHOLE_FRAME_SHARE
from veilstream.factory import build_pipeline

ANONYMIZERS: list[dict[str, Any]] = [{"kind": "blur", "relative_sigma": s} for s in (0.5, 0.2, 0.1, 0.04)] + [
    {"kind": "pixelate", "blocks": b} for b in (8, 16)
]
PHOTOS = ("bus.jpg", "zidane.jpg", "grace_hopper.jpg", "astronaut.png", "messi5.jpg", "basketball1.png")
FIRST = 100


def video_frames(path: Path, count: int, size: tuple[int, int] | None) -> list[Frame]:
    capture = cv2.VideoCapture(str(path))
    frames: list[Frame] = []
    index = 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if index >= FIRST:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            frames.append(np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC) if size else rgb))
        index += 1
    return frames


def compare(anonymizer: dict[str, Any], batches: list[tuple[list[Frame], list[FrameKey] | None]]) -> dict[str, Any]:
    pipeline = build_pipeline(
        VeilstreamConfig.model_validate({"correction": {"enabled": False}, "anonymizer": anonymizer})
    )
    assert isinstance(pipeline.leak_detector, CombinedDetector)
    backend = pipeline.leak_detector.detectors[0]
    look = backend.detect_windows  # type: ignore[attr-defined]
    confirmed = 0

    def counting(frames: Any, windows: Any, threshold: float | None = None) -> Any:
        nonlocal confirmed
        confirmed += len(frames) if threshold is None else 0  # a confirmation runs at the detector's threshold
        return look(frames, windows, threshold)

    backend.detect_windows = counting  # type: ignore[attr-defined]
    counts = {"checks": 0, "whole_residuals": 0, "missed": 0, "added": 0}
    for frames, keys in batches:
        prepared = pipeline.prepare(frames, keys)
        pipeline.residual_scope = "frame"
        whole = [o.residual for o in pipeline.finish(prepared)]
        pipeline.residual_scope = "around"
        around = [o.residual for o in pipeline.finish(prepared)]
        for by_frame, by_windows in zip(whole, around, strict=True):
            counts["checks"] += 1
            counts["whole_residuals"] += len(by_frame)
            counts["missed"] += sum(1 for b in by_frame if not any(b.iou(x) >= 0.9 for x in by_windows))
            counts["added"] += sum(1 for b in by_windows if not any(b.iou(x) >= 0.9 for x in by_frame))
    return {"anonymizer": anonymizer, **counts, "confirmed_in_windows": confirmed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--media", type=Path, default=Path(os.environ.get("VEILSTREAM_MEDIA", "~/.cache/veilstream/media"))
    )
    parser.add_argument("--frames", type=int, default=159)
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT to upscale the video frames to (no photos then)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/residual_windows.json"))
    args = parser.parse_args()
    media = args.media.expanduser()
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    frames = video_frames(media / "vtest.avi", args.frames, size)  # type: ignore[arg-type]
    batches: list[tuple[list[Frame], list[FrameKey] | None]] = [
        (frames[k : k + 8], [FrameKey("vtest", FIRST + k + j) for j in range(len(frames[k : k + 8]))])
        for k in range(0, len(frames), 8)
    ]
    if size is None:
        batches += [([decode_frame((media / name).read_bytes())], None) for name in PHOTOS]
    print(f"confirm margin {CONFIRM_MARGIN} network px, windows up to {WHOLE_FRAME_SHARE:.0%} of the frame")
    print(f"{'anonymizer':<34}{'checks':>8}{'in windows':>12}{'residuals':>11}{'missed':>8}{'added':>7}")
    rows = []
    for anonymizer in ANONYMIZERS:
        row = compare(anonymizer, batches)
        rows.append(row)
        name = ", ".join(f"{k} {v}" for k, v in anonymizer.items())
        print(
            f"{name:<34}{row['checks']:>8}{row['confirmed_in_windows']:>12}{row['whole_residuals']:>11}"
            f"{row['missed']:>8}{row['added']:>7}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "size": args.size or "768x576",
        "confirm_margin": CONFIRM_MARGIN,
        "share": WHOLE_FRAME_SHARE,
        "rows": rows,
    }
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
