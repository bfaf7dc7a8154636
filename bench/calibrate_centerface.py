"""Measure the int8 CenterFace's activation ranges again (detectors/quantize.py `_RANGES`); prints the table.

Run it when the network input changes (pass size, padding) or for other weights: the 8 photos of datasets/privacy
and the vtest.avi frames `CALIBRATION_FRAMES` lists, each prepared exactly as the detector's default pass prepares
it (`network_input` at `pass_sizes`), through onnxruntime's MinMax calibrator on `prepare`'s graph.
Usage: python bench/calibrate_centerface.py [--media DIR] > ranges.txt
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from veilstream.decoding.images import Frame, decode_frame
from veilstream.detectors.centerface import CenterFaceDetector, network_input
from veilstream.detectors.quantize import CALIBRATION_FRAMES, measure_ranges, prepare
from veilstream.detectors.weights import DEFAULT_FACE_WEIGHTS, resolve_weights

PHOTOS = (
    "bus.jpg",
    "zidane.jpg",
    "grace_hopper.jpg",
    "astronaut.png",
    "camera.png",
    "messi5.jpg",
    "basketball1.png",
    "licenseplate_motion.jpg",
)


def video_frames(path: Path, indices: tuple[int, ...]) -> list[Frame]:
    capture = cv2.VideoCapture(str(path))
    wanted, index = set(indices), 0
    frames: list[Frame] = []
    while len(frames) < len(wanted):
        ok, frame = capture.read()
        if not ok:
            break
        if index in wanted:
            frames.append(np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        index += 1
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_media = os.environ.get("VEILSTREAM_MEDIA", str(Path.home() / ".cache" / "veilstream" / "media"))
    parser.add_argument("--media", type=Path, default=Path(default_media))
    args = parser.parse_args()
    detector = CenterFaceDetector(scales=(2.0,), max_input_side=1920)  # the default pass
    frames = [decode_frame((args.media / name).read_bytes()) for name in PHOTOS]
    frames += video_frames(args.media / "vtest.avi", CALIBRATION_FRAMES)

    def blobs() -> Iterator[NDArray[np.float32]]:
        for frame in frames:
            ((width, height),) = detector.pass_sizes(frame.shape[1], frame.shape[0])
            yield network_input([frame], (width, height)).astype(np.float32)

    ranges = measure_ranges(prepare(resolve_weights(DEFAULT_FACE_WEIGHTS).read_bytes()), blobs())
    order = sorted(ranges, key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
    cells = [f"{name} {ranges[name][0]:.9g} {ranges[name][1]:.9g}" for name in order]
    line = ""
    for cell in cells:
        if line and len(line) + 3 + len(cell) > 118:
            print(line)
            line = ""
        line = f"{line}   {cell}" if line else cell
    print(line)


if __name__ == "__main__":
    main()
