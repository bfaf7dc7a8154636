"""`veilstream check`: probes for container health checks and build-time smoke tests.

`check_http` asks a running worker's /healthz and /readyz (the Docker HEALTHCHECK); `check_models` loads every
model the configuration names and runs one synthetic frame through the full pipeline (the image build runs it
so that a missing weight file, a download attempted at run time or a broken wheel fails the build, not the
first deployment). Both print what they found and return a process exit code: 0 healthy, 1 not.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the HTTP probe runs every few seconds: it must not import torch, cv2 or the models
    from veilstream.config import VeilstreamConfig
    from veilstream.decoding.images import Frame
    from veilstream.detectors.finders import FoundRegions

DEFAULT_URL = "http://127.0.0.1:8080"
ENDPOINTS = ("/healthz", "/readyz")
_BODY_LIMIT = 200


def _fail(message: str) -> int:
    print(f"veilstream check: {message}", file=sys.stderr)
    return 1


def _get(url: str, timeout: float) -> tuple[int | None, str]:
    """(HTTP status, short body or error text); status None when no HTTP answer came back."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # the caller checked the scheme
            return int(response.status), response.read(_BODY_LIMIT).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as error:  # 4xx/5xx: an answer, not a transport failure
        body = error.read(_BODY_LIMIT).decode("utf-8", "replace").strip() if error.fp is not None else ""
        return int(error.code), body or str(error.reason)
    except urllib.error.URLError as error:
        return None, f"cannot connect: {error.reason}"
    except (TimeoutError, OSError) as error:
        return None, f"{type(error).__name__}: {error}"


def check_http(url: str = DEFAULT_URL, timeout: float = 3.0) -> int:
    """0 when both GET <url>/healthz and GET <url>/readyz answer 200, else 1 (printing why).

    `url` is the worker's base address (scheme, host, port); a path, query or trailing slash is dropped.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return _fail(f"expected an http(s)://host:port URL, got {url!r}")
    if timeout <= 0:
        return _fail(f"timeout must be positive, got {timeout}")
    base = f"{parsed.scheme}://{parsed.netloc}"
    failures: list[str] = []
    for endpoint in ENDPOINTS:
        status, detail = _get(base + endpoint, timeout)
        if status == 200:
            print(f"{endpoint}: 200 {detail}")
        else:
            failures.append(f"{endpoint}: {status if status is not None else 'no answer'} {detail}".rstrip())
    if failures:
        return _fail(f"{base} unhealthy: " + "; ".join(failures))
    return 0


def smoke_frame(height: int = 480, width: int = 640, seed: int = 0) -> Frame:
    """A deterministic smooth RGB frame (JPEG-friendly, unlike white noise) for a smoke run."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    resized = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(resized, dtype=np.uint8)


@dataclass(frozen=True)
class _CentreRegion:
    """A region finder that always returns the central quarter of the frame, so that the smoke run anonymizes
    something and the correction (gradients on the configured device) runs even on a frame without faces."""

    def find(self, frames: Sequence[Frame]) -> list[FoundRegions]:
        from veilstream.anonymizers.regions import Region
        from veilstream.detectors.finders import FoundRegions

        return [
            FoundRegions((Region(f.shape[1] / 4, f.shape[0] / 4, f.shape[1] * 3 / 4, f.shape[0] * 3 / 4),))
            for f in frames
        ]


def _resolve_config(config: VeilstreamConfig | Path | str | None) -> VeilstreamConfig:
    from veilstream.config import VeilstreamConfig, load_config

    if isinstance(config, VeilstreamConfig):
        return config
    return load_config(Path(config) if config is not None else None)


def check_models(config: VeilstreamConfig | Path | str | None = None) -> int:
    """0 when every configured model loads and one synthetic frame goes through the pipeline, else 1.

    `config` is a loaded configuration, or the path of a YAML file (None: built-in defaults); either way the
    `VEILSTREAM__...` environment overrides apply when it is read here. The worker's budget rule
    (`check_budgets`) is checked too, since the worker refuses to start without it.
    """
    from veilstream.config import check_budgets
    from veilstream.decoding.images import decode_frame
    from veilstream.errors import VeilstreamError
    from veilstream.factory import build_pipeline
    from veilstream.outcome import Published
    from veilstream.pipeline import FailurePolicy, Pipeline

    try:
        resolved = _resolve_config(config)
        check_budgets(resolved)
        start = time.perf_counter()
        pipeline = build_pipeline(resolved)
        loaded = time.perf_counter()
        frame = smoke_frame()
        outcome = pipeline.process([frame])[0]  # the configured detectors, then the rest of the pipeline
        detected = time.perf_counter()
        centre = Pipeline(
            _CentreRegion(), pipeline.anonymizer, pipeline.encoder, pipeline.corrector, FailurePolicy("drop", "off")
        )
        corrected = centre.process([frame])[0]
        done = time.perf_counter()
    except VeilstreamError as error:
        return _fail(f"models: {error}")
    except Exception as error:  # any failure to load or run is what this check exists to report
        return _fail(f"models: {type(error).__name__}: {error}")
    published: dict[str, Published] = {}
    for name, result in (("detected", outcome), ("corrected", corrected)):
        if not isinstance(result, Published):
            return _fail(f"models: the {name} smoke frame was {result.kind}: {result.error}")
        try:
            pixels = decode_frame(result.data)
        except VeilstreamError as error:
            return _fail(f"models: the {name} smoke frame's output does not decode: {error}")
        if pixels.shape != frame.shape:
            return _fail(f"models: the {name} smoke frame's output is {pixels.shape}, not {frame.shape}")
        published[name] = result
    correction = published["corrected"].correction
    if correction is None:
        summary = "anonymized without correction (correction.enabled: false)"
    else:
        decisions = ", ".join(f"{d.classifier}={d.label}" for d in correction.final)
        summary = f"corrected ({correction.iterations} iterations, {correction.stop_reason}, {decisions})"
    print(
        f"models: ok on {pipeline.device}: loaded in {loaded - start:.1f} s; a {frame.shape[1]}x{frame.shape[0]} "
        f"frame detected in {detected - loaded:.2f} s ({len(outcome.detections)} detections) and {summary} "
        f"in {done - detected:.2f} s"
    )
    return 0
