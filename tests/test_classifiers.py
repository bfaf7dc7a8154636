"""Configuring classifiers: built-in sources, an operator's own TorchScript or ONNX model, shared defaults and
the errors a new user meets (each naming the file, the format expected and what was found)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from veilstream.config import ClassifierConfig, VeilstreamConfig, load_config
from veilstream.correction.classifier import Ensemble, Preprocessing
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionSettings
from veilstream.correction.loading import build_classifier, build_ensemble
from veilstream.correction.models import describe_file, load_builtin, native_input_size
from veilstream.errors import ConfigError, ModelLoadError

from .conftest import noise_frames
from .test_corrector import masked_case

# An operator traces their model; torch 2.14 marks tracing deprecated but still ships it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace.* is deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
VEHICLES = ["car", "van", "bus", "truck", "motorcycle"]


class VehicleNet(nn.Module):
    """Stands in for an operator's 5-class vehicle model: small, random, deterministic."""

    def __init__(self, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # Global pooling, so the ONNX export may leave the input size dynamic.
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=4, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, classes)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # type: ignore[no-any-return]

    @classmethod
    def for_tolls(cls, classes: int = 5) -> VehicleNet:
        return cls(classes)


def _validate(text: str) -> VeilstreamConfig:
    import yaml

    return VeilstreamConfig.model_validate(yaml.safe_load(text))


def _readme_example() -> str:
    """The YAML of the README's "Your own classifier" worked example."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Your own classifier", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert match, "the README's own-classifier section needs a yaml example"
    return match.group(1)


def _write_operator_files(folder: Path) -> None:
    """What the README tells an operator to prepare: the traced model, its class names and the grouping."""
    (folder / "models").mkdir()
    traced = torch.jit.trace(VehicleNet().eval(), torch.zeros(1, 3, 224, 224))  # type: ignore[no-untyped-call]
    traced.save(str(folder / "models" / "vehicles.pt"))
    (folder / "models" / "vehicle-classes.txt").write_text("\n".join(VEHICLES) + "\n")
    (folder / "models" / "vehicle-tariffs.yaml").write_text(
        "default: light\ngroups:\n  heavy: [bus, truck]\n  two-wheeler: [motorcycle]\n"
    )


# --- configuration ---------------------------------------------------------------------------------------------


def test_three_builtin_models_in_a_few_lines_of_yaml() -> None:
    text = (ROOT / "config" / "ensemble.yaml").read_text()
    config = load_config(ROOT / "config" / "ensemble.yaml", environ={})
    lines = [line for line in text.splitlines() if line.split("#")[0].strip()]
    assert len(lines) < 10, lines
    assert [(c.name, c.input_size, c.grouping) for c in config.classifiers] == [
        ("efficientnet-lite0", (224, 224), None),
        ("efficientnet-lite1", (240, 240), None),
        ("efficientnet-lite2", (260, 260), None),
    ]


def test_a_wrong_input_size_for_a_builtin_is_refused() -> None:
    with pytest.raises(ValueError, match=r"efficientnet-lite2 was trained at 260x260.*\[224, 224\]"):
        _validate("classifiers:\n  - {source: efficientnet-lite2, input_size: [224, 224]}\n")


def test_an_own_model_must_state_its_input_size() -> None:
    with pytest.raises(ValueError, match="needs 'input_size'"):
        _validate("classifiers:\n  - {source: torchscript, path: vehicles.pt}\n")


def test_defaults_are_written_once_and_an_entry_wins() -> None:
    config = _validate(
        "classifier_defaults: {grouping: null, channel_order: bgr}\n"
        "classifiers:\n"
        "  - source: efficientnet-lite0\n"
        "  - {source: efficientnet-lite1, grouping: imagenet-vehicles}\n"
    )
    assert [c.grouping for c in config.classifiers] == [None, "imagenet-vehicles"]
    assert {c.channel_order for c in config.classifiers} == {"bgr"}
    # With no classifiers listed, the defaults apply to the built-in default.
    (only,) = _validate("classifier_defaults: {grouping: null}\n").classifiers
    assert (only.name, only.grouping) == ("efficientnet-lite0", None)


def test_identity_keys_cannot_be_shared() -> None:
    with pytest.raises(ValueError, match=r"\['path'\] cannot be shared"):
        _validate("classifier_defaults: {path: model.pt}\n")


def test_names_and_groupings_follow_the_source() -> None:
    own = ClassifierConfig(source="onnx", path=Path("models/trucks.onnx"), labels="classes.txt")
    assert (own.name, own.grouping) == ("trucks", None)  # own labels: top-1 of its own classes
    assert ClassifierConfig(source="efficientnet-lite1").grouping == "imagenet-vehicles"
    built = ClassifierConfig(source="module", factory="pkg.mod:Net.build", input_size=(64, 64))
    assert built.name == "Net.build"


# --- loading ---------------------------------------------------------------------------------------------------


def test_readme_worked_example_loads_and_corrects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's 5-class TorchScript vehicle model with its own tariff grouping, exactly as written there."""
    _write_operator_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "veilstream.yaml").write_text(_readme_example())
    config = load_config(tmp_path / "veilstream.yaml", environ={})
    (vehicles,) = build_ensemble(config.classifiers, "cpu").members
    assert vehicles.labels == tuple(VEHICLES)
    assert vehicles.decision_names == ("light", "heavy", "two-wheeler")
    # The traced file computes what the module computes, through veilstream's preprocessing.
    frames = [torch.from_numpy(f).permute(2, 0, 1).float() for f in noise_frames(6, 120, 160, seed=4)]
    reference = VehicleNet().eval()(vehicles.preprocessing.decision_inputs(frames))
    assert torch.allclose(vehicles.predict(frames), reference, atol=1e-4)
    # The correction keeps the tariff group (not the fine class) on the published bytes.
    ensemble = Ensemble([vehicles])
    results = AdaptiveCorrector(ensemble, CorrectionSettings(max_change=128, time_budget_ms=None)).correct(
        *masked_case(count=24, seed=8)
    )
    assert any(r.naive_changed for r in results), "the test needs decisions the mask changes"
    assert all(r.consistent for r in results), [r.stop_reason for r in results]
    assert {d.label for r in results for d in r.final} <= {"light", "heavy", "two-wheeler"}


def test_a_state_dict_given_as_torchscript_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "vehicles.pth"
    torch.save(VehicleNet().state_dict(), path)
    config = ClassifierConfig(source="torchscript", path=path, input_size=(224, 224), labels="imagenet")
    with pytest.raises(ModelLoadError) as caught:
        build_classifier(config, "cpu")
    message = str(caught.value)
    assert str(path) in message
    assert "expected a TorchScript archive" in message
    assert "found a torch.save checkpoint" in message


def test_describe_file_tells_formats_apart(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.touch()
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    traced = tmp_path / "traced.pt"
    torch.jit.trace(VehicleNet().eval(), torch.zeros(1, 3, 32, 32)).save(str(traced))  # type: ignore[no-untyped-call]
    jpeg = tmp_path / "photo.onnx"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    assert describe_file(empty) == "an empty file"
    assert describe_file(text).startswith("a text file")
    assert describe_file(traced) == "a TorchScript archive"
    assert describe_file(jpeg) == "a JPEG image"


def test_labels_must_match_the_model_outputs(tmp_path: Path) -> None:
    traced = tmp_path / "vehicles.pt"
    torch.jit.trace(VehicleNet(classes=7).eval(), torch.zeros(1, 3, 64, 64)).save(str(traced))  # type: ignore[no-untyped-call]
    labels = tmp_path / "classes.txt"
    labels.write_text("\n".join(VEHICLES))
    config = ClassifierConfig(source="torchscript", path=traced, input_size=(64, 64), labels=str(labels))
    with pytest.raises(ModelLoadError, match=r"output shape \(1, 7\), expected \(1, 5\)"):
        build_classifier(config, "cpu")


def test_module_factory_may_be_a_classmethod_and_its_errors_are_named(tmp_path: Path) -> None:
    labels = tmp_path / "classes.txt"
    labels.write_text("\n".join(VEHICLES))
    factory = f"{__name__}:VehicleNet.for_tolls"
    state = tmp_path / "vehicles.pth"
    torch.save(VehicleNet().state_dict(), state)
    config = ClassifierConfig(
        source="module", factory=factory, state_dict=state, input_size=(96, 96), labels=str(labels)
    )
    assert build_classifier(config, "cpu").name == "VehicleNet.for_tolls"
    wrong = ClassifierConfig(
        source="module", factory=factory, factory_kwargs={"classes": 3}, state_dict=state, input_size=(96, 96)
    )
    with pytest.raises(ModelLoadError, match=r"vehicles.pth does not fit the model built by .*head"):
        build_classifier(wrong, "cpu")
    bad_kwargs = ClassifierConfig(source="module", factory=factory, factory_kwargs={"wheels": 2}, input_size=(9, 9))
    with pytest.raises(ModelLoadError, match="raised TypeError"):
        build_classifier(bad_kwargs, "cpu")
    missing = ClassifierConfig(source="module", factory=f"{__name__}:VehicleNet.nope", input_size=(9, 9))
    with pytest.raises(ModelLoadError, match="VehicleNet has no attribute 'nope'"):
        build_classifier(missing, "cpu")


def _export_onnx(path: Path, size: int, dynamic: bool = False, opset: int = 17) -> nn.Module:
    model = VehicleNet().eval()
    axes = {"input": {0: "batch", 2: "height", 3: "width"}} if dynamic else {"input": {0: "batch"}}
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=axes,
    )
    return model


def test_onnx_decides_on_onnxruntime_and_corrects_through_its_torch_graph(tmp_path: Path) -> None:
    _write_operator_files(tmp_path)
    path = tmp_path / "models" / "vehicles.onnx"
    module = _export_onnx(path, 224)
    config = ClassifierConfig(
        source="onnx",
        path=path,
        scale=1 / 255,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        labels=str(tmp_path / "models" / "vehicle-classes.txt"),
        grouping=str(tmp_path / "models" / "vehicle-tariffs.yaml"),
    )
    classifier = build_classifier(config, "cpu")
    assert classifier.preprocessing.input_size == (224, 224)  # read from the file
    assert classifier.inference is not None
    frames = [torch.from_numpy(f).permute(2, 0, 1).float() for f in noise_frames(5, seed=2)]
    expected = module(classifier.preprocessing.decision_inputs(frames))
    assert torch.allclose(classifier.predict(frames), expected, atol=1e-4)
    ensemble = Ensemble([classifier])
    results = AdaptiveCorrector(ensemble, CorrectionSettings(max_change=128, time_budget_ms=None)).correct(
        *masked_case(count=24, seed=8)
    )
    assert any(r.naive_changed for r in results)
    assert all(r.consistent for r in results)


def test_onnx_input_size_is_checked(tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.onnx"
    _export_onnx(fixed, 64)
    with pytest.raises(ConfigError, match=r"input_size \[96, 96\], but .*fixed.onnx takes \[64, 64\]"):
        build_classifier(ClassifierConfig(source="onnx", path=fixed, input_size=(96, 96)), "cpu")
    dynamic = tmp_path / "dynamic.onnx"
    _export_onnx(dynamic, 64, dynamic=True)
    with pytest.raises(ConfigError, match="dynamic input size: set input_size"):
        build_classifier(ClassifierConfig(source="onnx", path=dynamic), "cpu")


def test_onnx_errors_name_the_file_and_what_it_is(tmp_path: Path) -> None:
    photo = tmp_path / "model.onnx"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    with pytest.raises(ModelLoadError, match=r"model.onnx: expected an ONNX model; found a JPEG image"):
        build_classifier(ClassifierConfig(source="onnx", path=photo, input_size=(64, 64)), "cpu")


def test_onnx_graph_onnx2torch_cannot_convert_is_refused_with_the_way_out(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    # A valid graph whose operator (opset 21 Shape) onnx2torch 1.5 has no converter for.
    node = helper.make_node("Shape", ["input"], ["shape"])
    cast = helper.make_node("Cast", ["shape"], ["logits"], to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [node, cast],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4])],
    )
    path = tmp_path / "new.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    with pytest.raises(
        ModelLoadError, match=r"new.onnx: cannot convert this ONNX graph \(opset 21\).*opset_version=17"
    ):
        build_classifier(ClassifierConfig(source="onnx", path=path), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "side"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_builtin_weights_load_at_their_own_size(name: str, side: int) -> None:
    model = load_builtin(name)
    assert native_input_size(model) == (side, side)
    classifier = build_classifier(ClassifierConfig(source=name, grouping=None), "cpu")
    assert classifier.preprocessing.input_size == (side, side)
    grey = torch.full((3, 300, 400), 127.0)
    assert classifier.predict([grey]).shape == (1, 1000)
    assert np.isfinite(classifier.predict([grey]).numpy()).all()


def test_decisions_are_made_on_8bit_pixels_resized_to_8bit_pixels() -> None:
    """What an image library hands a classifier: whole levels before normalization, the same for a uint8 frame
    and its float copy, within one level of the unrounded float resize the gradient goes through."""
    preprocessing = Preprocessing(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    rng = np.random.default_rng(7)
    frame = torch.from_numpy(rng.integers(0, 256, (3, 270, 480), dtype=np.uint8))
    pixels = preprocessing.decision_inputs([frame])
    levels = pixels * torch.tensor(preprocessing.std).view(1, 3, 1, 1) + torch.tensor(preprocessing.mean).view(
        1, 3, 1, 1
    )
    levels = levels / preprocessing.scale
    assert torch.allclose(levels, levels.round(), atol=1e-3), "the resized frame is rounded to 8-bit levels"
    assert torch.equal(preprocessing.decision_inputs([frame.float()]), pixels)
    # Sub-level float changes (never published: pixels are rounded) do not reach a decision.
    assert torch.equal(preprocessing.decision_inputs([frame.float() + 0.3]), pixels)
    unrounded = preprocessing([frame.float()])
    level = 1 / 255 / min(preprocessing.std)
    assert float((unrounded - pixels).abs().max()) <= level + 1e-5
    assert not torch.equal(unrounded, pixels)
