"""Contact sheets of every labelled box in labels.json, to check the labels by eye.

Usage: .venv/bin/python datasets/privacy/tools/sheets.py datasets/privacy/labels.json OUT_DIR [--difficult]
Each tile is the box's neighbourhood enlarged: green a face, yellow a difficult object, blue a plate.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np

from veilstream.evaluation.labels import load_labels

MEDIA = Path(os.environ.get("VEILSTREAM_MEDIA", Path.home() / ".cache" / "veilstream" / "media"))
TILE = 150
COLUMNS = 8
ROWS = 6


def frames_of(media: Path, name: str, wanted: set[int | None]) -> dict[int | None, np.ndarray]:
    if None in wanted:
        return {None: cv2.imread(str(media / name), cv2.IMREAD_COLOR)}
    capture, frames, index = cv2.VideoCapture(str(media / name)), {}, 0
    while len(frames) < len(wanted):
        ok, bgr = capture.read()
        if not ok:
            break
        if index in wanted:
            frames[index] = bgr
        index += 1
    return frames


def tile(
    bgr: np.ndarray, box: tuple[float, float, float, float], colour: tuple[int, int, int], text: str
) -> np.ndarray:
    height, width = bgr.shape[:2]
    x1, y1, x2, y2 = box
    side = max(40.0, 4 * max(x2 - x1, y2 - y1))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    crop = bgr[top : int(min(height, cy + side / 2)), left : int(min(width, cx + side / 2))]
    scale = TILE / max(crop.shape[:2])
    big = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    canvas = np.zeros((TILE + 16, TILE, 3), np.uint8)
    canvas[: big.shape[0], : big.shape[1]] = big
    corners = [round((v - o) * scale) for v, o in zip(box, (left, top, left, top), strict=True)]
    cv2.rectangle(canvas, (corners[0], corners[1]), (corners[2], corners[3]), colour, 1)
    cv2.putText(canvas, text, (2, TILE + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("labels", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--difficult", action="store_true", help="also draw difficult objects")
    args = parser.parse_args()
    labels = load_labels(args.labels)
    args.out.mkdir(parents=True, exist_ok=True)
    tiles = []
    for name, frames in labels.by_media().items():
        pixels = frames_of(MEDIA, name, {f.frame for f in frames})
        for frame in frames:
            for item in frame.objects:
                if item.difficult and not args.difficult:
                    continue
                colour = (255, 0, 0) if item.kind == "plate" else (0, 255, 255) if item.difficult else (0, 255, 0)
                where = name.split(".")[0][:8] + ("" if frame.frame is None else f"#{frame.frame}")
                text = f"{where} {item.track or ''} h{item.height:g}"
                tiles.append(tile(pixels[frame.frame], item.box, colour, text))
    per_sheet = COLUMNS * ROWS
    for start in range(0, len(tiles), per_sheet):
        chunk = tiles[start : start + per_sheet]
        chunk += [np.zeros_like(tiles[0])] * (-len(chunk) % COLUMNS)
        rows = [np.hstack(chunk[i : i + COLUMNS]) for i in range(0, len(chunk), COLUMNS)]
        cv2.imwrite(str(args.out / f"labels_{start // per_sheet:02d}.png"), np.vstack(rows))
    print(f"{len(tiles)} boxes on {(len(tiles) + per_sheet - 1) // per_sheet} sheets in {args.out}")


if __name__ == "__main__":
    main()
