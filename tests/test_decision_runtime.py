"""Forward-only decisions on onnxruntime (`decision_runtime`), gradient steps in torch: the same decisions and
the same corrections as torch on real frames, an export cache keyed by the model's weights, and clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from veilstream.anonymizers.filters import GaussianBlur, SolidMask
from veilstream.anonymizers.regions import Region, region_mask
from veilstream.config import ClassifierConfig, VeilstreamConfig
from veilstream.correction import onnx_decisions
from veilstream.correction.classifier import Classifier, Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.correction.loading import build_classifier, decision_runtime
from veilstream.correction.saliency import salient_window
from veilstream.decoding.images import Frame
from veilstream.errors import ConfigError, ModelLoadError

from .conftest import noise_frames, read_rgb, video_frame

PHOTOS = ("bus.jpg", "zidane.jpg", "grace_hopper.jpg", "messi5.jpg", "licenseplate_motion.jpg", "astronaut.png")
VTEST_FRAMES = (0, 40, 200, 400, 600, 790)
FACTORY = f"{__name__}:SpectralNet"


class SpectralNet(nn.Module):
    """A small operator-style model; `spectral` adds an FFT feature, which the ONNX exporter cannot export."""

    def __init__(self, seed: int = 0, spectral: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.spectral = spectral
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(8 * 16, 10)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        if self.spectral:
            features = features + torch.fft.rfft2(features, s=features.shape[-2:]).abs()[..., :4, :1]
        return self.head(features.flatten(1))  # type: ignore[no-any-return]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private export cache, so these tests see their own exports only."""
    monkeypatch.setenv("VEILSTREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "classifiers"


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Counts the real exports (the exporter itself still runs)."""
    calls: list[Any] = []
    real = onnx_decisions.export

    def counted(model: nn.Module, input_size: tuple[int, int], target: Any) -> None:
        calls.append(target)
        real(model, input_size, target)

    monkeypatch.setattr(onnx_decisions, "export", counted)
    return calls


def _module_config(labels: Path, seed: int = 0, **extra: Any) -> ClassifierConfig:
    return ClassifierConfig(
        source="module",
        factory=FACTORY,
        factory_kwargs={"seed": seed, **extra},
        input_size=(64, 64),
        labels=str(labels),
        name="spectral",
    )


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(f"class{i}" for i in range(10)))
    return path


def _tensors(frames: list[Frame]) -> list[torch.Tensor]:
    return [torch.from_numpy(f).permute(2, 0, 1).float() for f in frames]


def _frame(tensor: torch.Tensor) -> Frame:
    return np.ascontiguousarray(tensor.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


# --- configuration and choice --------------------------------------------------------------------------------


def test_auto_is_the_default_and_an_ensemble_sets_it_once() -> None:
    assert ClassifierConfig().decision_runtime == "auto"
    config = VeilstreamConfig.model_validate(
        {"classifier_defaults": {"decision_runtime": "torch"}, "classifiers": [{}, {"decision_runtime": "auto"}]}
    )
    assert [c.decision_runtime for c in config.classifiers] == ["torch", "auto"]
    with pytest.raises(ValueError, match="decision_runtime"):
        ClassifierConfig.model_validate({"decision_runtime": "tensorrt"})


@pytest.mark.parametrize(
    ("setting", "device", "cuda_provider", "expected"),
    [
        ("auto", "cpu", False, "onnxruntime"),
        ("auto", "cuda", False, "torch"),
        ("auto", "cuda", True, "onnxruntime"),
        ("torch", "cpu", True, "torch"),
        ("onnxruntime", "cuda", True, "onnxruntime"),
    ],
)
def test_auto_takes_onnxruntime_on_cpu_and_on_cuda_only_with_its_cuda_provider(
    monkeypatch: pytest.MonkeyPatch, setting: Any, device: str, cuda_provider: bool, expected: str
) -> None:
    monkeypatch.setattr(onnx_decisions, "onnxruntime_cuda_available", lambda: cuda_provider)
    assert onnx_decisions.resolve_runtime(setting, device) == expected
    # An operator's ONNX file keeps deciding on onnxruntime under auto, wherever it runs.
    onnx_file = ClassifierConfig(source="onnx", path=Path("model.onnx"), decision_runtime=setting)
    assert decision_runtime(onnx_file, device) == ("onnxruntime" if setting == "auto" else expected)


def test_onnxruntime_on_cuda_without_its_cuda_provider_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_decisions, "onnxruntime_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="needs onnxruntime's CUDA provider"):
        onnx_decisions.resolve_runtime("onnxruntime", "cuda")


def _graph(classifier: Classifier, frames: list[torch.Tensor]) -> torch.Tensor:
    """The torch graph's logits on the decision's own (8-bit resized) input."""
    return classifier.model(classifier.preprocessing.decision_inputs(frames))  # type: ignore[no-any-return]


# --- the export cache ----------------------------------------------------------------------------------------


def test_export_once_then_from_the_cache_and_again_for_changed_weights(
    cache: Path, exports: list[Any], labels: Path
) -> None:
    first = build_classifier(_module_config(labels), "cpu")
    assert first.decision_runtime == "onnxruntime (CPU)"
    assert len(exports) == 1
    (cached,) = cache.glob("spectral-*.onnx")
    again = build_classifier(_module_config(labels), "cpu")
    assert len(exports) == 1, "the second load must use the cached file"
    assert list(cache.glob("*.onnx")) == [cached]
    frames = _tensors(noise_frames(4, 120, 160, seed=3))
    assert torch.equal(first.predict(frames), again.predict(frames))
    # Other weights under the same name: a new file, and decisions of the new weights.
    changed = build_classifier(_module_config(labels, seed=1), "cpu")
    assert len(exports) == 2
    assert len(list(cache.glob("spectral-*.onnx"))) == 2
    with torch.no_grad():
        assert torch.allclose(changed.predict(frames), _graph(changed, frames), atol=1e-4)
        assert not torch.allclose(changed.predict(frames), first.predict(frames), atol=1e-2)
    assert not list(cache.glob("*.tmp")), "no temporary file is left behind"


def test_a_cached_file_onnxruntime_cannot_open_is_exported_again(cache: Path, exports: list[Any], labels: Path) -> None:
    build_classifier(_module_config(labels), "cpu")
    (cached,) = cache.glob("*.onnx")
    cached.write_bytes(b"not an onnx model")
    rebuilt = build_classifier(_module_config(labels), "cpu")
    assert len(exports) == 2
    assert cached.read_bytes().startswith(b"\x08"), "the export replaced the broken file"
    frames = _tensors(noise_frames(3, seed=5))
    with torch.no_grad():
        assert torch.allclose(rebuilt.predict(frames), _graph(rebuilt, frames), atol=1e-4)


def test_a_cache_that_cannot_be_written_costs_an_export_per_start_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exports: list[Any], labels: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache folder's place is taken by a file")
    monkeypatch.setenv("VEILSTREAM_CACHE", str(blocked))
    classifier = build_classifier(_module_config(labels), "cpu")
    assert classifier.decision_runtime == "onnxruntime (CPU)"
    assert [type(target).__name__ for target in exports] == ["BytesIO"]


def test_the_cache_lives_under_veilstream_cache_or_the_xdg_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEILSTREAM_CACHE", "/srv/cache")
    assert onnx_decisions.cache_dir() == Path("/srv/cache/classifiers")
    monkeypatch.delenv("VEILSTREAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/cache")  # what the container image sets
    assert onnx_decisions.cache_dir() == Path("/tmp/cache/veilstream/classifiers")


# --- failures ------------------------------------------------------------------------------------------------


def test_a_model_the_exporter_cannot_export_fails_naming_the_classifier(
    cache: Path, labels: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = _module_config(labels, spectral=True)
    with pytest.raises(ModelLoadError) as caught:
        build_classifier(config, "cpu")
    message = str(caught.value)
    assert "classifier 'spectral': cannot export its torch model to ONNX (opset 17)" in message
    assert "fft" in message
    assert "decision_runtime: torch" in message
    assert not list(cache.glob("*")), "nothing half-written is left in the cache"
    # The way out the message gives works, and decides in torch.
    in_torch = build_classifier(config.model_copy(update={"decision_runtime": "torch"}), "cpu")
    assert (in_torch.decision_runtime, in_torch.inference) == ("torch", None)


def test_a_session_onnxruntime_cannot_create_fails_naming_the_classifier(
    cache: Path, labels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no execution provider could run the graph")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(
        ModelLoadError, match=r"classifier 'spectral': onnxruntime cannot load its exported model: RuntimeError"
    ):
        build_classifier(_module_config(labels), "cpu")


def test_torch_decisions_when_asked(cache: Path, exports: list[Any], labels: Path) -> None:
    classifier = build_classifier(_module_config(labels).model_copy(update={"decision_runtime": "torch"}), "cpu")
    assert (classifier.decision_runtime, classifier.inference, exports) == ("torch", None, [])


# --- real models on real frames ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def lite0_pair(lite0_cache: Path) -> tuple[Classifier, Classifier]:
    """EfficientNet-Lite0 with top-1 decisions, deciding in torch and on onnxruntime."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VEILSTREAM_CACHE", str(lite0_cache))
        in_torch = build_classifier(ClassifierConfig(grouping=None, decision_runtime="torch"), "cpu")
        on_ort = build_classifier(ClassifierConfig(grouping=None), "cpu")
    assert (in_torch.decision_runtime, on_ort.decision_runtime) == ("torch", "onnxruntime (CPU)")
    return in_torch, on_ort


def _real_frames(media: Path) -> list[Frame]:
    return [read_rgb(media / name) for name in PHOTOS] + [video_frame(media / "vtest.avi", i) for i in VTEST_FRAMES]


@pytest.mark.slow
@pytest.mark.parametrize("grouping", [None, "imagenet-vehicles"])
def test_onnxruntime_decides_as_torch_on_real_frames(
    lite0_pair: tuple[Classifier, Classifier],
    lite0_cache: Path,
    media: Path,
    grouping: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    in_torch, on_ort = lite0_pair
    if grouping is not None:  # the default grouped decision (the same export, from the fixture's cache)
        monkeypatch.setenv("VEILSTREAM_CACHE", str(lite0_cache))
        in_torch = build_classifier(ClassifierConfig(grouping=grouping, decision_runtime="torch"), "cpu")
        on_ort = build_classifier(ClassifierConfig(grouping=grouping), "cpu")
        assert on_ort.decision_runtime == "onnxruntime (CPU)"
    frames = _tensors(_real_frames(media))
    torch_decisions, torch_confidences = Ensemble([in_torch]).decide(frames)
    ort_decisions, ort_confidences = Ensemble([on_ort]).decide(frames)
    assert torch.equal(torch_decisions, ort_decisions)
    assert torch.allclose(torch_confidences, ort_confidences, atol=1e-4)
    assert len(set(torch_decisions[0].tolist())) > 2, "the frames should not all get one decision"
    # Batched, as the corrector asks: the same as one frame at a time.
    one_by_one = torch.cat([on_ort.predict([f]) for f in frames[:4]])
    assert torch.allclose(on_ort.predict(frames[:4]), one_by_one, atol=1e-4)


def _faces_masked(media: Path, names: tuple[str, ...], padding: float) -> tuple[list[Frame], list[Frame], list[Any]]:
    """Face photos with every face CenterFace finds masked grey, its box grown by `padding` on each side."""
    from veilstream.detectors.centerface import CenterFaceDetector

    originals = [read_rgb(media / name) for name in names]
    found = CenterFaceDetector().detect(originals)
    anonymized, masks = [], []
    for frame, faces in zip(originals, found, strict=True):
        assert faces, "the photo's faces are the case"
        regions = [Region(f.x1, f.y1, f.x2, f.y2).padded(padding) for f in faces]
        anonymized.append(_frame(SolidMask().anonymize(_tensors([frame])[0], regions)))
        masks.append(region_mask(regions, frame.shape[0], frame.shape[1], torch.device("cpu")).numpy())
    return originals, anonymized, masks


@pytest.mark.slow
def test_the_corrector_does_the_same_with_either_runtime(
    lite0_pair: tuple[Classifier, Classifier], media: Path
) -> None:
    """The masked face in grace_hopper.jpg and vtest.avi frame 40 blurred at the classifier's most salient
    window: both change the top-1 decision, and the correction must take the same steps either way."""
    in_torch, on_ort = lite0_pair
    originals, anonymized, masks = _faces_masked(media, ("grace_hopper.jpg",), padding=0.5)
    street = video_frame(media / "vtest.avi", 40)
    window = salient_window(in_torch, _tensors([street])[0], 50)
    originals.append(street)
    anonymized.append(_frame(GaussianBlur(relative_sigma=0.2).anonymize(_tensors([street])[0], [window])))
    masks.append(region_mask([window], street.shape[0], street.shape[1], torch.device("cpu")).numpy())
    settings = CorrectionSettings(alpha=0.1, step="max", through_codec=False, time_budget_ms=None)

    def run(classifier: Classifier) -> list[Any]:
        return AdaptiveCorrector(Ensemble([classifier]), settings).correct(originals, anonymized, masks)

    by_torch, by_ort = run(in_torch), run(on_ort)
    assert all(r.naive_changed for r in by_torch), "the test needs frames whose decision the anonymization changes"
    assert all(r.consistent for r in by_torch)
    for t, o in zip(by_torch, by_ort, strict=True):
        assert (o.iterations, o.stop_reason) == (t.iterations, t.stop_reason)
        for seen_by_torch, seen_by_ort in ((t.original, o.original), (t.naive, o.naive), (t.final, o.final)):
            assert [d.index for d in seen_by_ort] == [d.index for d in seen_by_torch]
            assert all(abs(a.confidence - b.confidence) < 1e-4 for a, b in zip(seen_by_torch, seen_by_ort, strict=True))
        assert np.array_equal(o.pixels, t.pixels)
        assert o.encoded.data == t.encoded.data
    assert max(r.iterations for r in by_torch) >= 2


@pytest.mark.gpu
@pytest.mark.slow
def test_on_cuda_auto_decides_as_torch(media: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEILSTREAM_CACHE", str(tmp_path))
    in_torch = build_classifier(ClassifierConfig(grouping=None, decision_runtime="torch"), "cuda")
    auto = build_classifier(ClassifierConfig(grouping=None), "cuda")
    expected = "onnxruntime (CUDA)" if onnx_decisions.onnxruntime_cuda_available() else "torch"
    assert auto.decision_runtime == expected
    frames = [t.cuda() for t in _tensors(_real_frames(media))]
    torch_decisions, torch_confidences = Ensemble([in_torch]).decide(frames)
    auto_decisions, auto_confidences = Ensemble([auto]).decide(frames)
    assert auto_decisions.device.type == "cuda"
    assert torch.equal(torch_decisions, auto_decisions)
    assert torch.allclose(torch_confidences, auto_confidences, atol=1e-3)
