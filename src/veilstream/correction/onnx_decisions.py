"""Forward-only decisions on onnxruntime for classifiers built in torch.

The reference decision and the checks on the published bytes need no gradient, and onnxruntime computes them
several times faster than torch on the CPU (EfficientNet-Lite0, 8 frames at 224x224 on 2 cores: about 3 ms a
frame against 15). The torch model is exported to ONNX once, cached under `$VEILSTREAM_CACHE/classifiers`
with a hash of its weights and code in the name (a changed model is exported again), and the gradient steps
keep using the torch model itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from veilstream.detectors.weights import cache_root, move_into_place
from veilstream.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

DecisionRuntime = Literal["auto", "onnxruntime", "torch"]

EXPORT_OPSET = 17
# Bumped whenever the export itself changes (names, axes, opset), so that cached files are made again.
EXPORT_FORMAT = 1
# onnxruntime intra-op threads for decisions. Measured with 8 frames at 224x224 on 2 cores (medians,
# interleaved): 1 thread 5.2 ms a frame, 2 threads 3.0; with another process spinning on one core 11.0 vs 8.9.
# More would only compete with the detectors on larger machines: the decisions are a small share of a frame.
DECISION_THREADS = 2


def cache_dir() -> Path:
    """Where exported models are kept: `classifiers/` in the cache folder of every derived model file
    ($VEILSTREAM_CACHE, else $XDG_CACHE_HOME/veilstream (the container image points that at /tmp), else
    ~/.cache/veilstream)."""
    return cache_root() / "classifiers"


def onnxruntime_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_runtime(setting: DecisionRuntime, device: torch.device | str) -> Literal["onnxruntime", "torch"]:
    """`auto`: onnxruntime on the CPU; on CUDA, onnxruntime when it has the CUDA provider, else torch.
    An explicit `onnxruntime` on CUDA needs that provider (decisions would otherwise leave the device)."""
    on_cuda = torch.device(device).type == "cuda"
    if setting == "torch":
        return "torch"
    if setting == "auto":
        return "onnxruntime" if not on_cuda or onnxruntime_cuda_available() else "torch"
    if on_cuda and not onnxruntime_cuda_available():
        raise ConfigError(
            "decision_runtime: onnxruntime on device cuda needs onnxruntime's CUDA provider (onnxruntime-gpu); "
            "use decision_runtime: auto or torch"
        )
    return "onnxruntime"


def providers(device: torch.device | str) -> list[Any]:
    """onnxruntime execution providers for a torch device: CUDA (that device) when offered, then the CPU."""
    where = torch.device(device)
    if where.type == "cuda" and onnxruntime_cuda_available():
        return [("CUDAExecutionProvider", {"device_id": where.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int = DECISION_THREADS) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle onnxruntime workers busy-wait by default and starve torch running next in the process (the gradient
    # steps, YOLO), as measured for CenterFace (detectors/centerface.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return options


def model_digest(model: nn.Module, input_size: tuple[int, int]) -> str:
    """A hash of everything the exported file depends on: weights and buffers, the code of every module class
    (or the TorchScript graph), the input size, torch's version and the export settings."""
    hasher = hashlib.sha256()
    hasher.update(f"{EXPORT_FORMAT}|{EXPORT_OPSET}|{torch.__version__}|{input_size}".encode())
    if isinstance(model, torch.jit.ScriptModule):
        hasher.update(str(model.inlined_graph).encode())
    else:
        for kind in sorted({type(m) for m in model.modules()}, key=lambda t: f"{t.__module__}.{t.__qualname__}"):
            hasher.update(f"{kind.__module__}.{kind.__qualname__}".encode())
            # A class without source (compiled or dynamic) still counts by its name and its weights.
            with contextlib.suppress(OSError, TypeError):
                hasher.update(inspect.getsource(kind).encode())
    hasher.update(repr(model).encode())
    for key, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        hasher.update(flat.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def export(model: nn.Module, input_size: tuple[int, int], target: Path | io.BytesIO) -> None:
    """TorchScript-based export (opset 17, dynamic batch axis): the exporter onnx2torch's files also use."""
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.zeros(1, 3, *input_size, device=device)
    with warnings.catch_warnings():
        # The legacy-exporter notice and one constant-folding note per Slice: nothing the operator can act on.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            cast(Any, target),  # the TorchScript-based exporter writes to a path or a binary buffer
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=EXPORT_OPSET,
        )


def cached_file(name: str, digest: str) -> Path:
    return cache_dir() / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{digest[:24]}.onnx"


def export_to_cache(model: nn.Module, input_size: tuple[int, int], path: Path) -> None:
    """Export next to `path` and rename into place durably, so a reader never sees a half-written file (two
    processes exporting at once both write whole files; the last rename wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".onnx.tmp", dir=path.parent)
    os.close(handle)
    try:
        export(model, input_size, Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the cache is shared like any other
        move_into_place(Path(temporary), path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class OnnxDecisions:
    """Logits from a preprocessed (N, 3, H, W) batch on an onnxruntime session, back on the batch's device."""

    def __init__(self, session: Any, description: str) -> None:
        self.session = session
        self.description = description
        self._input = session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run(None, {self._input: array})
        return torch.from_numpy(np.asarray(logits)).to(batch.device)


def onnx_decisions(
    name: str, model: nn.Module, input_size: tuple[int, int], device: torch.device | str
) -> OnnxDecisions:
    """The classifier `name`'s torch model as an onnxruntime session, from the cache or exported now.

    Every failure is a ModelLoadError naming the classifier: decisions never fall back to torch unnoticed.
    A cached file onnxruntime cannot open is exported again once; a cache folder that cannot be written only
    costs the export at every start (logged)."""
    import onnxruntime as ort

    chosen = providers(device)

    def open_session(source: str | bytes) -> Any:
        return ort.InferenceSession(source, sess_options=session_options(), providers=chosen)

    def failed(what: str, error: BaseException) -> ModelLoadError:
        return ModelLoadError(
            f"classifier {name!r}: {what}: {type(error).__name__}: {error}. Set decision_runtime: torch on this "
            "classifier to take its decisions in torch instead"
        )

    try:
        path = cached_file(name, model_digest(model, input_size))
    except Exception as error:
        raise failed("cannot hash its model for the ONNX cache", error) from error
    session = None
    if path.is_file():
        try:
            session = open_session(str(path))
        except Exception as error:
            log.warning("classifier %r: cached %s is unusable (%s); exporting it again", name, path, error)
    if session is None:
        source: str | bytes = str(path)
        try:
            export_to_cache(model, input_size, path)
        except OSError as error:
            log.warning("classifier %r: cannot write the ONNX cache %s (%s); exporting in memory", name, path, error)
            source = _export_in_memory(model, input_size, failed)
        except Exception as error:
            raise failed(f"cannot export its torch model to ONNX (opset {EXPORT_OPSET})", error) from error
        try:
            session = open_session(source)
        except Exception as error:
            raise failed("onnxruntime cannot load its exported model", error) from error
    used = session.get_providers()[0].removesuffix("ExecutionProvider")
    return OnnxDecisions(session, f"onnxruntime ({used})")


def _export_in_memory(
    model: nn.Module, input_size: tuple[int, int], failed: Callable[[str, BaseException], ModelLoadError]
) -> bytes:
    buffer = io.BytesIO()
    try:
        export(model, input_size, buffer)
    except Exception as error:
        raise failed(f"cannot export its torch model to ONNX (opset {EXPORT_OPSET})", error) from error
    return buffer.getvalue()
