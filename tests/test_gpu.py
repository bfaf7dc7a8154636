"""One `device` for every stage: backend selection on any machine; `gpu` tests check on CUDA that each stage's
tensors and sessions are there and that the GPU encoder publishes exactly what its check decoded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from veilstream.correction.classifier import Preprocessing
from veilstream.decoding.images import Frame, decode_frame, sniff_codec
from veilstream.detectors.base import Detection
from veilstream.detectors.centerface import CenterFaceDetector, torch_runner
from veilstream.detectors.onnx_shapes import dynamic_shapes
from veilstream.errors import ModelLoadError
from veilstream.publishing.encoding import (
    Encoder,
    encode_frame,
    select_backend,
    torchvision_encode,
    torchvision_roundtrip,
)

from .conftest import noise_frames, read_rgb, video_frame

# --- on any machine ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "device", "nvjpeg", "backend"),
    [
        ("jpeg", "cpu", True, "opencv"),
        ("jpeg", "cuda", True, "nvjpeg"),
        ("jpeg", "cuda:1", True, "nvjpeg"),
        ("jpeg", "cuda", False, "opencv"),  # a torchvision without nvJPEG
        ("png", "cuda", True, "opencv"),  # torchvision has no PNG/WebP on CUDA
        ("webp", "cuda", True, "opencv"),
    ],
)
def test_backend_follows_codec_device_and_torchvision(codec: Any, device: str, nvjpeg: bool, backend: str) -> None:
    assert select_backend(codec, device, nvjpeg) == backend


@pytest.mark.parametrize("device", ["gpu", "cuda0", "CUDA", ""])
def test_unknown_devices_are_refused(device: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        Encoder(device=device)


def test_cuda_encoder_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        Encoder(device="cuda")


def test_cpu_encoder_batches_like_single_frames() -> None:
    encoder = Encoder("jpeg", 80)
    assert encoder.backend == "opencv"
    frames = [*noise_frames(2, seed=3), *noise_frames(1, 48, 40, seed=4)]
    batch = encoder.roundtrip_batch(frames)
    assert [e.data for e in batch] == [encoder.roundtrip(f).data for f in frames]
    assert encoder.encode_batch(frames) == [encode_frame(f, "jpeg", 80) for f in frames]
    for encoded in batch:
        assert np.array_equal(encoded.decoded, decode_frame(encoded.data))
        assert encoded.on_device is None


def test_tensor_frames_encode_like_arrays() -> None:
    frame = noise_frames(1, seed=5)[0]
    tensor = torch.from_numpy(frame).permute(2, 0, 1)
    encoder = Encoder("png")
    assert encoder.encode(tensor) == encoder.encode(frame)
    with pytest.raises(ValueError, match="3xHxW uint8"):
        encoder.encode(tensor.float())


def test_torchvision_path_publishes_the_bytes_it_decoded() -> None:
    """The nvJPEG path's plumbing (batching, bytes, decoding the published bytes, layout) run through
    torchvision on the CPU, where its libjpeg-turbo makes the same bytes as OpenCV's."""
    frames = [*noise_frames(2, seed=6), *noise_frames(1, 72, 56, seed=7)]
    tensors = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    encoded = torchvision_roundtrip(tensors, 85, "cpu")
    assert [e.data for e in encoded] == torchvision_encode(tensors, 85)
    for frame, result in zip(frames, encoded, strict=True):
        assert sniff_codec(result.data) == "jpeg"
        assert result.data == encode_frame(frame, "jpeg", 85)
        assert np.array_equal(result.decoded, decode_frame(result.data))
        assert result.on_device is not None
        assert np.array_equal(result.on_device.permute(1, 2, 0).numpy(), result.decoded)


def test_centerface_on_cuda_without_cuda_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        CenterFaceDetector(device="cuda")


def test_centerface_through_torch_finds_what_onnxruntime_finds(media: Path) -> None:
    """The runner a CUDA device gets when onnxruntime has no CUDA provider, run on the CPU."""
    detector = CenterFaceDetector(scales=(1.0,))
    assert detector.runtime == "onnxruntime-cpu"
    frames = [read_rgb(media / "zidane.jpg"), read_rgb(media / "bus.jpg"), video_frame(media / "vtest.avi", 0)]
    reference = detector.detect(frames)
    assert sum(len(found) for found in reference) >= 3
    detector._torch_run = torch_runner(dynamic_shapes(detector.path.read_bytes()), detector._session, "cpu")
    _assert_same_faces(reference, detector.detect(frames), min_score=0.0)


# --- on CUDA -------------------------------------------------------------------------------------------


def _iou(a: Detection, b: Detection) -> float:
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - w * h
    return w * h / union if union > 0 else 0.0


def _assert_same_faces(expected: list[list[Detection]], got: list[list[Detection]], min_score: float) -> None:
    """Every face scored >= min_score in one list has a counterpart (IoU >= 0.9) in the other, both ways."""
    for a_frames, b_frames in ((expected, got), (got, expected)):
        for a_faces, b_faces in zip(a_frames, b_frames, strict=True):
            for face in a_faces:
                if face.score >= min_score:
                    assert any(_iou(face, other) >= 0.9 for other in b_faces), (face, b_faces)


@pytest.fixture(scope="module")
def sample_frames(media: Path) -> list[Frame]:
    """Two vtest frames, a plate on a car, and faces at another size."""
    return [
        video_frame(media / "vtest.avi", 0),
        video_frame(media / "vtest.avi", 40),
        read_rgb(media / "licenseplate_motion.jpg"),
        read_rgb(media / "zidane.jpg"),
    ]


@pytest.mark.gpu
def test_nvjpeg_encoder_publishes_what_its_check_decoded(sample_frames: list[Frame]) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    encoder = Encoder("jpeg", 90, device="cuda")
    assert encoder.backend == "nvjpeg"
    encoded = encoder.roundtrip_batch(sample_frames)
    assert [e.data for e in encoded] == encoder.encode_batch(sample_frames)  # the encoder is deterministic
    for frame, result in zip(sample_frames, encoded, strict=True):
        assert sniff_codec(result.data) == "jpeg"
        assert result.decoded.shape == frame.shape
        assert result.on_device is not None and result.on_device.is_cuda
        # The check saw exactly what these bytes decode to on the device...
        again = decode_jpeg(torch.frombuffer(bytearray(result.data), dtype=torch.uint8), ImageReadMode.RGB, "cuda")
        assert torch.equal(again, result.on_device)
        assert np.array_equal(result.on_device.permute(1, 2, 0).cpu().numpy(), result.decoded)
        # ...and a consumer decoding them on the CPU (libjpeg-turbo) sees nearly the same pixels.
        on_cpu = decode_frame(result.data).astype(np.int16)
        gap = np.abs(on_cpu - result.decoded.astype(np.int16))
        print(f"{frame.shape}: nvJPEG vs CPU decode of the published bytes: mean {gap.mean():.3f}, max {gap.max()}")
        assert gap.mean() < 2.0
        assert np.abs(on_cpu - frame.astype(np.int16)).mean() < 8.0


@pytest.mark.gpu
def test_centerface_on_cuda_finds_what_the_cpu_finds(sample_frames: list[Frame]) -> None:
    on_cuda = CenterFaceDetector(device="cuda")
    assert on_cuda.runtime in ("onnxruntime-cuda", "torch-cuda")
    if on_cuda.runtime == "onnxruntime-cuda":
        assert on_cuda._session.get_providers()[0] == "CUDAExecutionProvider"
    print(f"CenterFace runtime on cuda: {on_cuda.runtime}")
    reference = CenterFaceDetector().detect(sample_frames)
    assert sum(len(found) for found in reference) >= 3
    # Convolutions in TF32 or another algorithm move scores slightly: compare the clear faces.
    _assert_same_faces(reference, on_cuda.detect(sample_frames), min_score=0.3)


class _CpuCompute(TorchFunctionMode):
    """Records convolutions and matrix products that run on CPU tensors: model work left on the CPU."""

    NAMES = ("conv", "linear", "matmul", "addmm", "bmm", "einsum")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = getattr(func, "__name__", str(func))
        if any(key in name for key in self.NAMES):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
            if shapes:
                self.found.append(f"{name}{shapes[:2]}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def cuda_pipeline() -> Any:
    from veilstream.config import VeilstreamConfig
    from veilstream.factory import build_pipeline

    return build_pipeline(VeilstreamConfig(device="cuda"))


@pytest.mark.gpu
def test_every_model_stage_loads_on_cuda(cuda_pipeline: Any) -> None:
    pipeline = cuda_pipeline
    assert pipeline.device.type == "cuda"
    detectors = pipeline.finder.detector.detectors
    for detector in detectors:
        if isinstance(detector, CenterFaceDetector):
            assert detector.runtime in ("onnxruntime-cuda", "torch-cuda")
        elif getattr(detector, "onnx_session", None) is not None:
            assert "CUDAExecutionProvider" in detector.onnx_session.get_providers()
        else:
            assert torch.device(detector._model.predictor.device).type == "cuda", type(detector).__name__
    assert pipeline.corrector is not None and pipeline.corrector.device.type == "cuda"
    for member in pipeline.corrector.ensemble.members:
        assert next(member.model.parameters()).is_cuda, member.name  # the gradient's graph
        # Decisions: torch on that graph, or onnxruntime, whose provider the runtime's description names.
        assert "CPU" not in getattr(member, "decision_runtime", "torch"), (member.name, member.decision_runtime)


@pytest.mark.gpu
def test_publish_encoders_use_nvjpeg(cuda_pipeline: Any) -> None:
    assert cuda_pipeline.encoder.backend == "nvjpeg", "factory.build_encoder does not pass the device"
    assert cuda_pipeline.corrector.encoder.backend == "nvjpeg", "the corrector's encoder stays on the CPU"


@pytest.mark.gpu
def test_no_model_work_on_the_cpu_with_device_cuda(cuda_pipeline: Any, sample_frames: list[Frame]) -> None:
    """The whole pipeline on frames with faces and a plate: it publishes, and no convolution or matrix
    product of any stage (detectors, plate check, classifiers, correction) runs on CPU tensors."""
    from veilstream.outcome import Published

    cuda_pipeline.process(sample_frames[:1])  # warm-up: first-run autotuning and allocations
    outcomes = []
    with _CpuCompute() as recorder:
        for frame in sample_frames:  # one at a time: the frames differ in size
            outcomes.extend(cuda_pipeline.process([frame]))
    for outcome in outcomes:
        assert isinstance(outcome, Published), getattr(outcome, "error", outcome)
        print({stage: round(ms, 1) for stage, ms in outcome.timings_ms.items()})
    assert not recorder.found, f"model work on the CPU: {sorted(set(recorder.found))[:20]}"


@pytest.mark.gpu
def test_decision_inputs_on_cuda_are_within_one_level_of_the_cpus(sample_frames: list[Frame]) -> None:
    """No 8-bit resize kernel on CUDA: the float resize rounded, within one grey level of the CPU's 8-bit one."""
    preprocessing = Preprocessing()
    for frame in sample_frames:
        pixels = torch.from_numpy(frame).permute(2, 0, 1)
        on_cpu = preprocessing.decision_inputs([pixels])
        on_cuda = preprocessing.decision_inputs([pixels.to("cuda")]).cpu()
        level = 1 / min(preprocessing.std) / preprocessing.scale
        assert float((on_cuda - on_cpu).abs().max()) <= level + 1e-5
