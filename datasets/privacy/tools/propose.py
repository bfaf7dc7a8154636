"""Candidate boxes for the privacy labels: several detectors at high resolution, low thresholds (to be checked by eye).

Usage: PYTHONPATH=<dir with facenet_pytorch> .venv/bin/python datasets/privacy/tools/propose.py OUT.json
The candidates are only proposals: every label in labels.json was accepted, moved or added by a person.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from veilstream.detectors.centerface import CenterFaceDetector
from veilstream.detectors.yolo import YoloDetector

MEDIA = Path(os.environ.get("VEILSTREAM_MEDIA", Path.home() / ".cache" / "veilstream" / "media"))
IMAGES = (
    "bus.jpg",
    "zidane.jpg",
    "grace_hopper.jpg",
    "astronaut.png",
    "licenseplate_motion.jpg",
    "messi5.jpg",
    "basketball1.png",
    "camera.png",
)
SPREAD = tuple(range(0, 795, 20))
RUN = tuple(range(688, 720))


def video_frames(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames, index = {}, 0
    while len(frames) < len(wanted):
        ok, bgr = capture.read()
        if not ok:
            break
        if index in wanted:
            frames[index] = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        index += 1
    return frames


def main(out: Path) -> None:
    from facenet_pytorch import MTCNN

    items: dict[str, np.ndarray] = {}
    for name in IMAGES:
        bgr = cv2.imread(str(MEDIA / name), cv2.IMREAD_COLOR)
        items[name] = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    for index, frame in video_frames(MEDIA / "vtest.avi", set(SPREAD) | set(RUN)).items():
        items[f"vtest.avi#{index}"] = frame
    mtcnn = MTCNN(keep_all=True, device="cpu", min_face_size=12, thresholds=[0.6, 0.7, 0.7])
    plates = YoloDetector(thresholds={"plate": 0.05}, imgsz=1280)
    proposals = {}
    for key, frame in sorted(items.items()):
        height, width = frame.shape[:2]
        boxes = []
        for scale in (1, 2, 3):
            if max(width, height) * scale > 3000:
                continue
            detector = CenterFaceDetector(threshold=0.1, in_size=(width * scale, height * scale), threads=2)
            boxes += [
                {"src": f"cf{scale}x", "kind": "face", "box": [d.x1, d.y1, d.x2, d.y2], "score": d.score}
                for d in detector.detect([frame])[0]
            ]
        up = 2 if max(width, height) < 1000 else 1
        found, scores = mtcnn.detect(cv2.resize(frame, None, fx=up, fy=up, interpolation=cv2.INTER_CUBIC))
        if found is not None:
            boxes += [
                {"src": f"mtcnn{up}x", "kind": "face", "box": [float(v) / up for v in b], "score": float(s)}
                for b, s in zip(found, scores, strict=True)
            ]
        boxes += [
            {"src": "yolo1280", "kind": "plate", "box": [d.x1, d.y1, d.x2, d.y2], "score": d.score}
            for d in plates.detect([frame])[0]
        ]
        proposals[key] = {"width": width, "height": height, "boxes": boxes}
        print(key, len(boxes), flush=True)
    out.write_text(json.dumps(proposals, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
