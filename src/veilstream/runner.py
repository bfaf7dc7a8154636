"""One runner for every entry point: source items -> batches -> pipeline -> frame records -> sinks.

The worker, `anonymize`, `eval` and the demo differ only in their source and their sinks. A sink has two
verbs, `add` and `flush`; the runner flushes every sink after each batch, and a caller that commits progress
(the worker's offsets) does so only after `flush` returned.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Protocol

from veilstream.correction.corrector import AdaptiveCorrector
from veilstream.decoding.images import Frame
from veilstream.detectors.memory import FrameKey
from veilstream.errors import FrameError, StageError
from veilstream.outcome import Dropped, FrameOutcome
from veilstream.pipeline import Pipeline
from veilstream.publishing.records import frame_record
from veilstream.schemas.records import FrameRecord

Headers = tuple[tuple[str, bytes], ...]


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


class Runner:
    """Runs batches of source items through the pipeline into the sinks.

    `variants` (eval) runs several correctors on the same detected and anonymized frames; each record then
    names its setting.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        sinks: Sequence[Sink],
        batch_size: int,
        worker: str | None = None,
        variants: Mapping[str, AdaptiveCorrector] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.sinks = list(sinks)
        self.batch_size = batch_size
        self.worker = worker or socket.gethostname()
        self.variants = dict(variants) if variants else None

    def run(self, items: Iterable[SourceItem]) -> int:
        """Process every item, flushing the sinks after each batch; returns the number of items."""
        count = 0
        for batch in batched(items, self.batch_size):
            self.process(batch)
            self.flush()
            count += len(batch)
        return count

    def process(self, batch: Sequence[SourceItem]) -> list[Processed]:
        """Run one batch and add its results to the sinks (not flushed)."""
        decoded = [item for item in batch if item.frame is not None]
        names: list[str | None] = list(self.variants) if self.variants else [None]
        settings: list[tuple[str | None, list[FrameOutcome]]] = []
        try:
            frames = [item.frame for item in decoded]
            prepared = self.pipeline.prepare(frames, [frame_key(item.origin) for item in decoded])  # type: ignore[arg-type]
            if self.variants is None:
                settings.append((None, self.pipeline.finish(prepared)))
            else:
                settings.extend((name, self.pipeline.finish(prepared, c)) for name, c in self.variants.items())
        except Exception as error:  # the pipeline isolates frames; this is a bug or an OOM: fail closed
            failure = StageError("pipeline_failed", f"{type(error).__name__}: {error}")
            settings = [(name, [Dropped(error=failure) for _ in decoded]) for name in names]
        results: list[Processed] = []
        for setting, outcomes in settings:
            by_item = dict(zip((id(item) for item in decoded), outcomes, strict=True))
            for item in batch:
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
