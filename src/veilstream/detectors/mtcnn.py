"""MTCNN faces (facenet-pytorch): a face detector of another family than CenterFace, for the leak check.

Its weights ship inside the facenet-pytorch wheel and load offline. Install it with
`pip install --no-deps facenet-pytorch==2.6.0` (scripts/setup.sh does): its own pins would replace our torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import cv2

from veilstream.detectors.base import Detection, Frame, Kind, check_frames
from veilstream.errors import ModelLoadError

INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"


class MtcnnFaces:
    """MTCNN faces; frames whose longest side is under `upscale_below` are upscaled 2x first, so faces of about
    6 px become findable (it sees little under 10 px all the same)."""

    kinds: frozenset[Kind] = frozenset({"face"})

    def __init__(
        self, min_face: int = 12, upscale_below: int = 1000, threshold: float = 0.7, device: str = "cpu"
    ) -> None:
        if min_face < 1 or upscale_below < 0 or not 0.0 < threshold < 1.0:
            raise ValueError(
                f"MTCNN needs min_face >= 1, upscale_below >= 0 and threshold in (0, 1); got {min_face},"
                f" {upscale_below}, {threshold}"
            )
        try:
            module = importlib.import_module("facenet_pytorch")
        except ImportError as error:  # optional: only the leak check needs it
            raise ModelLoadError(f"the MTCNN leak check needs facenet-pytorch: {INSTALL}") from error
        self._model: Any = module.MTCNN(keep_all=True, device=device, min_face_size=min_face)
        self.upscale_below = upscale_below
        self.threshold = threshold

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        check_frames(frames)
        results = []
        for frame in frames:
            scale = 2 if max(frame.shape[:2]) < self.upscale_below else 1
            image = frame if scale == 1 else cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            boxes, scores = self._model.detect(image)
            found = []
            # With no face MTCNN answers (None, [None]).
            for box, score in zip([] if boxes is None else boxes, [] if boxes is None else scores, strict=True):
                if score < self.threshold:
                    continue
                x1, y1, x2, y2 = (float(v) / scale for v in box)
                if x2 <= x1 or y2 <= y1:
                    continue
                face = Detection(x1, y1, x2, y2, min(1.0, float(score)), "face").clipped(frame.shape[1], frame.shape[0])
                if face is not None:
                    found.append(face)
            results.append(found)
        return results
