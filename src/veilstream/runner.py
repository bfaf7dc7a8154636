"""One runner for every entry point: source items -> batches -> pipeline -> frame records -> sinks.

The worker, `anonymize`, `eval` and the demo differ only in their source and their sinks. A sink has two
verbs, `add` and `flush`; the runner flushes every sink after each batch, and a caller that commits progress
(the worker's offsets) does so only after `flush` returned.

A batch runs in two halves, `prepare` (the pipeline's detect, remember, anonymize) and `complete` (correct,
encode, check, records, sinks). With `overlap`, batch n+1 is prepared on one background thread while batch n is
completed on the caller's (onnxruntime and torch release the GIL): one prepare at a time, in order (the memory
sees each camera's frames in order), one batch ahead at most. Sinks are only ever touched by the caller's thread.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Protocol

from veilstream.correction.corrector import AdaptiveCorrector
from veilstream.decoding.images import Frame
from veilstream.detectors.memory import FrameKey
from veilstream.errors import FrameError, StageError
from veilstream.outcome import Dropped, FrameOutcome
from veilstream.pipeline import Pipeline, Prepared
from veilstream.publishing.records import frame_record
from veilstream.schemas.records import FrameRecord

Headers = tuple[tuple[str, bytes], ...]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaLineage:
    """Where a consumed message came from, with its raw value and headers for the dead letters."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()


@dataclass(frozen=True)
class Origin:
    """Where a frame came from: a camera (Kafka) or a file; carried unchanged to the sinks."""

    camera_id: str
    sequence: int | None = None
    source: str | None = None
    capture_time: datetime | None = None
    ground_truth: str | None = None
    kafka: KafkaLineage | None = None


def frame_key(origin: Origin) -> FrameKey:
    """What the pipeline's memory needs of an origin: the camera, the frame's place in it, where it comes from."""
    partition = None if origin.kafka is None else (origin.kafka.topic, origin.kafka.partition)
    return FrameKey(origin.camera_id, origin.sequence, origin.capture_time, partition)


@dataclass(frozen=True)
class SourceItem:
    """One input: a decoded frame, or the typed error that stopped it from becoming one."""

    origin: Origin
    frame: Frame | None = None
    error: FrameError | None = None
    received_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if (self.frame is None) == (self.error is None):
            raise ValueError("a source item holds exactly one of a frame or an error")


@dataclass(frozen=True)
class Processed:
    """A frame's outcome and its record, as every sink receives it."""

    origin: Origin
    frame: Frame | None
    outcome: FrameOutcome
    record: FrameRecord


class Sink(Protocol):
    def add(self, item: Processed) -> None:
        """Take one processed frame (buffered until `flush`)."""
        ...

    def flush(self) -> None:
        """Make everything added durable; raise if that failed (the caller then retries the batch)."""
        ...


def batched(items: Iterable[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@dataclass(frozen=True)
class PreparedBatch:
    """A batch after the pipeline's first half: its items, those with a frame, and what `Pipeline.prepare`
    returned, or the error it raised (every frame of the batch then fails closed)."""

    items: list[SourceItem]
    decoded: list[SourceItem]
    prepared: Prepared | None
    failure: StageError | None = None


def _pipeline_failed(error: Exception) -> StageError:
    # The pipeline isolates frames; an exception from a whole half is a bug or an OOM: every frame fails closed.
    return StageError("pipeline_failed", f"{type(error).__name__}: {error}")


def models_in_both_halves(pipeline: Pipeline, correctors: Iterable[AdaptiveCorrector] = ()) -> list[str]:
    """The model objects `Pipeline.prepare` and `Pipeline.finish` would both use (compared by identity, at the
    top level only): running the halves on two threads would call them at once, and an ultralytics predictor,
    for one, is not thread-safe."""
    finder = pipeline.finder
    preparing = {
        id(model): name
        for name, model in (
            ("the finder's detector", getattr(finder, "detector", None)),
            ("the finder's classifier", getattr(finder, "classifier", None)),
        )
        if model is not None
    }
    finishing: list[tuple[str, object | None]] = [("the leak detector", pipeline.leak_detector)]
    if pipeline.leak_check is not None:
        finishing.append(("the leak check's detector", pipeline.leak_check.detector))
    for corrector in [c for c in (pipeline.corrector, *correctors) if c is not None]:
        finishing.extend((f"classifier {member.name}", member) for member in corrector.ensemble.members)
    return [f"{preparing[id(m)]} is {name}" for name, m in finishing if m is not None and id(m) in preparing]


class BackgroundPrepare:
    """Runs `prepare` on one background thread, one batch at a time: the caller holds at most one batch ahead
    (submit again only after `take` or `discard`), so memory stays bounded and batches are prepared in order."""

    def __init__(self, prepare: Callable[[Sequence[SourceItem]], PreparedBatch]) -> None:
        self._prepare = prepare
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[PreparedBatch] | None = None
        self._submitted_at = 0.0
        self._last_s: float | None = None  # how long the last prepare took

    @property
    def busy(self) -> bool:
        """A batch was submitted and not yet taken or discarded."""
        return self._pending is not None

    def submit(self, batch: Sequence[SourceItem]) -> None:
        if self._pending is not None:
            raise RuntimeError("one batch ahead at most: take or discard the pending batch first")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="veilstream-prepare")
        self._submitted_at = time.perf_counter()
        self._pending = self._executor.submit(self._timed, list(batch))

    def _timed(self, batch: list[SourceItem]) -> PreparedBatch:
        start = time.perf_counter()
        try:
            return self._prepare(batch)
        finally:
            self._last_s = time.perf_counter() - start

    def expected_wait_s(self) -> float:
        """How much longer the pending prepare should take, judged by the last one (0 when unknown or done)."""
        pending, last = self._pending, self._last_s
        if pending is None or last is None or pending.done():
            return 0.0
        return max(0.0, self._submitted_at + last - time.perf_counter())

    def take(self) -> PreparedBatch:
        """The pending batch, once prepared (an exception other than `Exception` is raised here)."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("no batch is being prepared")
        return pending.result()

    def settle(self) -> None:
        """Wait until the prepare in flight ended (its result is kept for `take`)."""
        if self._pending is not None:
            wait_for([self._pending])

    def discard(self) -> None:
        """Drop the pending batch: cancelled if it has not started, else waited for (the next prepare must not
        overlap it) and its result thrown away."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.cancel():
            wait_for([pending])

    def close(self) -> None:
        self.discard()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class Runner:
    """Runs batches of source items through the pipeline into the sinks.

    `variants` (eval) runs several correctors on the same detected and anonymized frames; each record then
    names its setting. `overlap` prepares the next batch in the background while one is completed; it is
    turned off (with a warning) when both halves of the pipeline would use one model object.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        sinks: Sequence[Sink],
        batch_size: int,
        worker: str | None = None,
        variants: Mapping[str, AdaptiveCorrector] | None = None,
        overlap: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.sinks = list(sinks)
        self.batch_size = batch_size
        self.worker = worker or socket.gethostname()
        self.variants = dict(variants) if variants else None
        shared = models_in_both_halves(pipeline, self.variants.values() if self.variants else ())
        if overlap and shared:
            log.warning("batches run one after the other, not overlapped: %s", "; ".join(shared))
        self.overlap = overlap and not shared

    def run(self, items: Iterable[SourceItem]) -> int:
        """Process every item, flushing the sinks after each batch; returns the number of items."""
        if not self.overlap:
            count = 0
            for batch in batched(items, self.batch_size):
                self.process(batch)
                self.flush()
                count += len(batch)
            return count
        return self._run_overlapped(items)

    def _run_overlapped(self, items: Iterable[SourceItem]) -> int:
        count = 0
        background = BackgroundPrepare(self.prepare)
        try:
            # Reading batch n+1 from the source overlaps batch n's prepare; completing n overlaps n+1's.
            for batch in batched(items, self.batch_size):
                held = background.take() if background.busy else None
                background.submit(batch)
                if held is not None:
                    self.complete(held)
                    self.flush()
                count += len(batch)
            if background.busy:
                self.complete(background.take())
                self.flush()
        finally:
            background.close()
        return count

    def process(self, batch: Sequence[SourceItem]) -> list[Processed]:
        """Run one batch and add its results to the sinks (not flushed)."""
        return self.complete(self.prepare(batch))

    def prepare(self, batch: Sequence[SourceItem]) -> PreparedBatch:
        """The pipeline's first half for the items with a frame; touches no sink (safe on another thread)."""
        decoded = [item for item in batch if item.frame is not None]
        try:
            frames = [item.frame for item in decoded]
            prepared = self.pipeline.prepare(frames, [frame_key(item.origin) for item in decoded])  # type: ignore[arg-type]
        except Exception as error:
            return PreparedBatch(list(batch), decoded, None, _pipeline_failed(error))
        return PreparedBatch(list(batch), decoded, prepared)

    def complete(self, batch: PreparedBatch) -> list[Processed]:
        """The pipeline's second half, the records, and the results added to the sinks (not flushed)."""
        decoded = batch.decoded
        names: list[str | None] = list(self.variants) if self.variants else [None]
        settings: list[tuple[str | None, list[FrameOutcome]]] = []
        failure = batch.failure
        if batch.prepared is not None:
            prepared = batch.prepared
            try:
                if self.variants is None:
                    settings.append((None, self.pipeline.finish(prepared)))
                else:
                    settings.extend((name, self.pipeline.finish(prepared, c)) for name, c in self.variants.items())
            except Exception as error:
                failure = _pipeline_failed(error)
        if failure is not None:
            settings = [(name, [Dropped(error=failure) for _ in decoded]) for name in names]
        results: list[Processed] = []
        for setting, outcomes in settings:
            by_item = dict(zip((id(item) for item in decoded), outcomes, strict=True))
            for item in batch.items:
                outcome = by_item.get(id(item)) or Dropped(error=item.error or StageError("internal", "no outcome"))
                results.append(self._record(item, outcome, setting))
        for processed in results:
            for sink in self.sinks:
                sink.add(processed)
        return results

    def _record(self, item: SourceItem, outcome: FrameOutcome, setting: str | None) -> Processed:
        latency = None if item.origin.kafka is None else (time.perf_counter() - item.received_at) * 1000
        record = frame_record(item.origin, outcome, self.worker, latency, setting)
        return Processed(item.origin, item.frame, outcome, record)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()


@dataclass
class MemorySink:
    """Keeps everything it is given; `flushed` holds what a flush confirmed (for tests and benchmarks)."""

    pending: list[Processed] = field(default_factory=list)
    flushed: list[Processed] = field(default_factory=list)

    def add(self, item: Processed) -> None:
        self.pending.append(item)

    def flush(self) -> None:
        self.flushed.extend(self.pending)
        self.pending.clear()
