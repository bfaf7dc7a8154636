"""Stages overlapping across batches: batch n+1 prepared (detect, remember, anonymize) on a background thread while
batch n is finished (correct, encode, residual check), in `Runner.run` and in the Kafka worker's loop.

In-memory fakes: scripted detectors that record which thread calls them and when, the fake Kafka of
tests/fake_kafka.py. The real-broker worker tests are tests/integration/test_worker.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from kafka import TopicPartition
from kafka.errors import NotEnoughReplicasError

from veilstream.anonymizers.filters import SolidMask
from veilstream.config import VeilstreamConfig
from veilstream.decoding.images import Frame
from veilstream.detectors.base import Detection
from veilstream.detectors.finders import DetectorRegionFinder
from veilstream.detectors.memory import DetectionMemory, FrameKey
from veilstream.outcome import Dropped, Published
from veilstream.pipeline import FailurePolicy, Pipeline, Prepared, ResidualCheck
from veilstream.publishing.encoding import Encoder
from veilstream.runner import BackgroundPrepare, MemorySink, Origin, PreparedBatch, Processed, Runner, SourceItem
from veilstream.worker.lifecycle import Lifecycle
from veilstream.worker.loop import Worker

from .conftest import noise_frames
from .fake_kafka import FakeKafka
from .test_worker_delivery import DLQ, INPUT, OUTPUT, feed, metric, refuse, run, sources
from .test_worker_delivery import config as delivery_config

WAIT_S = 5.0  # how long a test waits for the other thread before it fails


class Abort(BaseException):
    """Not an `Exception`: must reach the caller, as it would without overlap."""


@dataclass
class RecordingDetector:
    """A face on every `every`-th frame (by the frame's number, see `frames`). Records each call (thread, frame
    numbers, start, end) and notes when two threads are inside it at once; `delay_s` makes each call last."""

    delay_s: float = 0.0
    every: int = 1
    calls: list[tuple[str, list[int], float, float]] = field(default_factory=list)
    overlapped: list[str] = field(default_factory=list)
    _inside: threading.Lock = field(default_factory=threading.Lock)
    _started: threading.Condition = field(default_factory=threading.Condition)
    _starts: int = 0

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        if not self._inside.acquire(blocking=False):
            self.overlapped.append(threading.current_thread().name)
            self._inside.acquire()
        try:
            start = time.perf_counter()
            with self._started:
                self._starts += 1
                self._started.notify_all()
            time.sleep(self.delay_s)
            numbers = [int(f[1, 1, 0]) for f in frames]
            self.calls.append((threading.current_thread().name, numbers, start, time.perf_counter()))
            return [[Detection(8, 8, 40, 40, 0.9, "face")] if n % self.every == 0 else [] for n in numbers]
        finally:
            self._inside.release()

    def wait_for_call(self, number: int) -> bool:
        """Whether call `number` (1-based) began within WAIT_S."""
        with self._started:
            return self._started.wait_for(lambda: self._starts >= number, WAIT_S)

    def threads(self) -> set[str]:
        return {name for name, *_ in self.calls}


def frames(count: int) -> list[Frame]:
    """Frames numbered by their pixel (1, 1) (the face box starts at 8, so it survives the mask)."""
    out = noise_frames(count, seed=1)
    for index, frame in enumerate(out):
        frame[1, 1, 0] = index
    return out


def items(count: int, camera: str = "cam") -> list[SourceItem]:
    return [SourceItem(Origin(camera, sequence=i), f) for i, f in enumerate(frames(count))]


def pipeline(
    finder: RecordingDetector | None = None,
    leak: RecordingDetector | None = None,
    memory: DetectionMemory | None = None,
) -> Pipeline:
    """Finder and leak detector are distinct objects unless the same one is passed twice."""
    finder = finder or RecordingDetector()
    residual: ResidualCheck = "flag" if leak is not None else "off"
    return Pipeline(
        DetectorRegionFinder(finder),
        SolidMask(value=0),
        Encoder("jpeg", 90),
        policy=FailurePolicy("drop", residual),
        leak_detector=leak,
        memory=memory,
    )


def summary(processed: Sequence[Processed]) -> list[tuple[object, ...]]:
    """What a run produced, without its timings."""
    return [
        (p.origin.sequence, type(p.outcome).__name__, p.record.reason, p.record.faces, p.record.remembered)
        for p in processed
    ]


def prepare_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("veilstream-prepare")]


# -- Runner.run ---------------------------------------------------------------------------------------------


class AddWaits(MemorySink):
    """A sink whose first `add` (batch 1 being completed) waits for the finder's second call (batch 2's
    prepare): it comes only if batch 2 is prepared while batch 1 is completed."""

    def __init__(self, finder: RecordingDetector) -> None:
        super().__init__()
        self.finder = finder
        self.saw_next: bool | None = None

    def add(self, item: Processed) -> None:
        if self.saw_next is None:
            self.saw_next = self.finder.wait_for_call(2)
        super().add(item)


def test_the_next_batch_is_prepared_on_a_background_thread_while_one_is_completed() -> None:
    finder, leak = RecordingDetector(), RecordingDetector()
    sink = AddWaits(finder)
    runner = Runner(pipeline(finder, leak), [sink], batch_size=2, worker="test", overlap=True)
    assert runner.overlap
    assert runner.run(items(6)) == 6

    assert sink.saw_next, "batch 2 was not prepared while batch 1 was completed"
    (thread,) = finder.threads()
    assert thread.startswith("veilstream-prepare"), "every prepare on the one background thread"
    assert leak.threads() == {threading.current_thread().name}, "finish stays on the caller's thread"
    assert finder.overlapped == [] and leak.overlapped == []
    assert [p.origin.sequence for p in sink.flushed] == list(range(6))
    assert all(isinstance(p.outcome, Published) and p.record.faces == 1 for p in sink.flushed)
    assert prepare_threads() == [], "the background thread ends with the run"


def test_without_overlap_nothing_runs_in_the_background() -> None:
    finder = RecordingDetector()
    runner = Runner(pipeline(finder), [MemorySink()], batch_size=2, worker="test")
    assert not runner.overlap
    runner.run(items(4))
    assert finder.threads() == {threading.current_thread().name} and len(finder.calls) == 2


def test_batches_are_prepared_one_at_a_time_in_order_and_the_results_match_a_sequential_run() -> None:
    results = {}
    for overlap in (False, True):
        finder = RecordingDetector(delay_s=0.01, every=3)  # the memory fills the frames in between
        memory = DetectionMemory(frames=3, seconds=None)
        sink = MemorySink()
        cameras = [SourceItem(Origin(f"cam-{i % 2}", sequence=i // 2), item.frame) for i, item in enumerate(items(14))]
        Runner(pipeline(finder, RecordingDetector(), memory), [sink], batch_size=3, overlap=overlap).run(cameras)
        assert finder.overlapped == []
        assert [numbers for _, numbers, *_ in finder.calls] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13]]
        starts, ends = [call[2] for call in finder.calls], [call[3] for call in finder.calls]
        assert all(start >= end for start, end in zip(starts[1:], ends, strict=False)), "one prepare at a time"
        results[overlap] = summary(sink.flushed)
    assert results[True] == results[False]
    assert any(remembered for *_, remembered in results[True]), "the memory filled frames (so order mattered)"


def test_at_most_one_batch_is_read_ahead_of_the_one_being_completed() -> None:
    pulled = 0
    ahead: list[int] = []

    def source() -> Iterator[SourceItem]:
        nonlocal pulled
        for item in items(20):
            pulled += 1
            yield item

    class Counting(MemorySink):
        def add(self, item: Processed) -> None:
            ahead.append(pulled - len(self.pending) - len(self.flushed))
            super().add(item)

    Runner(pipeline(RecordingDetector(delay_s=0.005)), [Counting()], batch_size=4, overlap=True).run(source())
    assert max(ahead) <= 2 * 4, "the batch being completed and one batch ahead, never more"
    assert max(ahead) > 4, "the next batch was read while one was completed"

    background = BackgroundPrepare(lambda batch: PreparedBatch(list(batch), [], None))
    background.submit([])
    with pytest.raises(RuntimeError, match="one batch ahead at most"):
        background.submit([])
    background.close()


class FailingPrepare(Pipeline):
    """`prepare` as a whole raises for the batch holding frame number `fails_at` (not a per-frame error)."""

    fails_at = 2
    error: type[BaseException] = RuntimeError

    def prepare(self, frames: Sequence[Frame], keys: Sequence[FrameKey | None] | None = None) -> Prepared:
        if any(int(f[1, 1, 0]) == self.fails_at for f in frames):
            raise self.error("out of memory")
        return super().prepare(frames, keys)


def failing_pipeline(error: type[BaseException]) -> FailingPrepare:
    base = pipeline(RecordingDetector(), RecordingDetector())
    failing = FailingPrepare(base.finder, base.anonymizer, base.encoder, None, base.policy, base.leak_detector)
    failing.error = error
    return failing


def test_a_prepare_that_raises_in_the_background_fails_its_batch_closed_as_without_overlap() -> None:
    results = {}
    for overlap in (False, True):
        sink = MemorySink()
        Runner(failing_pipeline(RuntimeError), [sink], batch_size=2, overlap=overlap).run(items(6))
        results[overlap] = summary(sink.flushed)
        dropped = [p for p in sink.flushed if isinstance(p.outcome, Dropped)]
        assert [p.origin.sequence for p in dropped] == [2, 3]
        assert all("RuntimeError: out of memory" in p.outcome.error.detail for p in dropped)  # type: ignore[union-attr]
    assert results[True] == results[False]
    assert [r[2] for r in results[True]] == [None, None, "pipeline_failed", "pipeline_failed", None, None]


def test_an_exception_that_is_no_error_reaches_the_caller_and_the_thread_ends() -> None:
    sink = MemorySink()
    with pytest.raises(Abort):
        Runner(failing_pipeline(Abort), [sink], batch_size=2, overlap=True).run(items(6))
    assert [p.origin.sequence for p in sink.flushed] == [0, 1], "batches before it were delivered"
    assert prepare_threads() == []


class SlowFinish(Pipeline):
    def finish(self, prepared: Prepared, corrector: Any = None) -> list[Any]:
        time.sleep(0.4)
        return super().finish(prepared, corrector)


def test_stage_timings_are_the_stages_own_not_the_wait_for_the_other_thread() -> None:
    base = pipeline(RecordingDetector(delay_s=0.05))
    slow = SlowFinish(base.finder, base.anonymizer, base.encoder, None, base.policy)
    sink = MemorySink()
    Runner(slow, [sink], batch_size=2, overlap=True).run(items(6))
    for processed in sink.flushed:
        assert isinstance(processed.outcome, Published)
        detect_ms = processed.outcome.timings_ms["detect"] * 2  # per frame: the batch's time over its 2 frames
        assert 40 <= detect_ms < 300, f"detect took {detect_ms:.0f} ms for the batch; finish waits were 400 ms"


def test_overlap_is_refused_when_the_finder_and_the_leak_check_share_one_detector(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shared = RecordingDetector(delay_s=0.005)
    runner = Runner(pipeline(shared, shared), [MemorySink()], batch_size=2, overlap=True)
    assert not runner.overlap
    assert "the finder's detector is the leak detector" in caplog.text
    runner.run(items(6))
    assert shared.overlapped == [] and {name for name, *_ in shared.calls} == {threading.current_thread().name}
    assert Runner(pipeline(RecordingDetector(), RecordingDetector()), [], 2, overlap=True).overlap, "distinct ones"


# -- the worker ----------------------------------------------------------------------------------------------


def worker_pipeline(finder: RecordingDetector, memory: DetectionMemory | None = None) -> Pipeline:
    return pipeline(finder, RecordingDetector(), memory)


def test_the_worker_prepares_the_next_batch_while_it_delivers_one() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 8)
    finder = RecordingDetector()
    during_first_flush: list[bool] = []

    def first_flush(fake: FakeKafka) -> None:
        if fake.flushes == 0:
            during_first_flush.append(finder.wait_for_call(2))

    kafka.on_flush = first_flush
    worker = run(kafka, config(), worker_pipeline(finder))

    assert worker.runner is not None and worker.runner.overlap
    assert during_first_flush == [True], "batch 2 was not being prepared while batch 1 was delivered"
    assert sources(kafka.topic(OUTPUT)) == [(0, i) for i in range(8)]
    assert kafka.committed == {TopicPartition(INPUT, 0): 8}
    (thread,) = finder.threads()
    assert thread.startswith("veilstream-prepare")
    assert prepare_threads() == []


def with_overlap(cfg: VeilstreamConfig, overlap: bool) -> VeilstreamConfig:
    return cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"overlap": overlap})})


def config(**worker: Any) -> VeilstreamConfig:
    """The delivery tests' worker configuration with `pipeline.overlap` on (it is off by default)."""
    return with_overlap(delivery_config(**worker), True)


class SecondPrepareFails(Pipeline):
    """`prepare` as a whole raises on its second call (not a per-frame error: those are values)."""

    calls = 0

    def prepare(self, frames: Sequence[Frame], keys: Sequence[FrameKey | None] | None = None) -> Prepared:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("out of memory")
        return super().prepare(frames, keys)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
def test_a_prepare_failing_as_a_whole_dead_letters_its_batch_and_the_worker_goes_on(overlap: bool) -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 6)
    base = worker_pipeline(RecordingDetector())
    failing = SecondPrepareFails(base.finder, base.anonymizer, base.encoder, None, base.policy, base.leak_detector)
    worker = run(kafka, with_overlap(config(), overlap), failing)

    assert worker.runner is not None and worker.runner.overlap is overlap
    assert sources(kafka.topic(OUTPUT)) == [(0, i) for i in range(4)]
    dead = kafka.topic(DLQ)
    assert sorted(int(d.header("source-offset") or -1) for d in dead) == [4, 5]
    assert {d.header("dlq-reason") for d in dead} == {"pipeline_failed"}
    assert kafka.committed == {TopicPartition(INPUT, 0): 6}
    assert metric(worker, "veilstream_dead_letters_total", reason="pipeline_failed") == 2


def test_a_rewound_batch_drops_the_batch_ahead_and_reads_it_again_even_from_another_partition() -> None:
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 4)
    feed(kafka, 1, 3)  # the batch ahead holds only partition 1: the rewind of batch 1 alone would skip it
    kafka.rules.append(refuse(OUTPUT, NotEnoughReplicasError("in sync replicas"), case="p0-s1", flushes=1))
    finder = RecordingDetector()
    with structlog.testing.capture_logs() as logs:
        worker = run(kafka, config(), worker_pipeline(finder))

    assert kafka.seeks == [(TopicPartition(INPUT, 0), 0), (TopicPartition(INPUT, 1), 0)]
    (retry,) = [e for e in logs if e["event"] == "batch_retry"]
    assert (retry["frames"], retry["dropped_ahead"]) == (4, 3)
    outputs = sources(kafka.topic(OUTPUT))
    assert sorted(set(outputs)) == [(0, i) for i in range(4)] + [(1, i) for i in range(3)]
    assert [o for o in outputs if o[0] == 1] == [(1, 0), (1, 1), (1, 2)], "the dropped batch was never published"
    assert kafka.committed == {TopicPartition(INPUT, 0): 4, TopicPartition(INPUT, 1): 3}
    assert metric(worker, "veilstream_frames_out_total") == 7


class RecordingMemory(DetectionMemory):
    """Records when it remembers a camera's frame and when it forgets partitions."""

    def __init__(self) -> None:
        super().__init__(frames=5, seconds=None)
        self.events: list[tuple[str, str]] = []

    def remember(self, key: FrameKey | None, detections: Sequence[Detection], width: int, height: int) -> Any:
        time.sleep(0.05)  # a slow prepare: the revoke arrives while it runs
        self.events.append(("remember", key.camera_id if key else ""))
        return super().remember(key, detections, width, height)

    def forget_partitions(self, partitions: Any) -> None:
        self.events.append(("forget", ",".join(str(p[1]) for p in sorted(partitions))))
        super().forget_partitions(partitions)


def revoke_during_the_first_flush(finder: RecordingDetector, partition: int) -> Callable[[FakeKafka], None]:
    """A flush hook revoking `partition` during the first flush, once batch 2's prepare began (so the memory is
    remembering its frames then)."""

    def revoke(fake: FakeKafka) -> None:
        if fake.flushes == 0:
            assert finder.wait_for_call(2), "batch 2's prepare began"
            fake.revoke([TopicPartition(INPUT, partition)])

    return revoke


def test_a_revoke_drops_the_batch_ahead_that_holds_its_partitions_and_rereads_the_rest() -> None:
    kafka = FakeKafka(partitions=3)
    feed(kafka, 0, 2)
    feed(kafka, 1, 3)
    feed(kafka, 2, 3)  # batch 1: p0 s0-1, p1 s0-1; batch ahead: p1 s2, p2 s0-2
    finder, memory = RecordingDetector(), RecordingMemory()

    kafka.on_flush = revoke_during_the_first_flush(finder, 2)
    with structlog.testing.capture_logs() as logs:
        run(kafka, config(), worker_pipeline(finder, memory))

    assert kafka.seeks == [(TopicPartition(INPUT, 1), 2)], "partition 1's record of the dropped batch is read again"
    assert [e["frames"] for e in logs if e["event"] == "batch_ahead_dropped"] == [4]
    outputs = sources(kafka.topic(OUTPUT))
    assert sorted(outputs) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)], "each once; partition 2 is another's"
    assert kafka.committed == {TopicPartition(INPUT, 0): 2, TopicPartition(INPUT, 1): 3}
    forget = memory.events.index(("forget", "2"))
    assert ("remember", "cam-2") in memory.events[:forget], "the revoke came while batch 2 was being prepared"
    assert ("remember", "cam-2") not in memory.events[forget:], "the memory forgot after the prepare ended"
    assert "cam-2" not in memory.cameras


def test_a_revoke_of_other_partitions_keeps_the_batch_ahead() -> None:
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 4)
    feed(kafka, 1, 2)  # batch 1: p0 s0-3 (revoked during its flush); batch ahead: p1 s0-1, kept

    finder, memory = RecordingDetector(), RecordingMemory()

    kafka.on_flush = revoke_during_the_first_flush(finder, 0)
    run(kafka, config(), worker_pipeline(finder, memory))

    assert kafka.seeks == [] and len(finder.calls) == 2, "nothing dropped or read again"
    assert sorted(sources(kafka.topic(OUTPUT))) == [(0, i) for i in range(4)] + [(1, 0), (1, 1)]
    assert kafka.committed == {TopicPartition(INPUT, 1): 2}, "batch 1's commit is refused: partition 0 is gone"
    forget = memory.events.index(("forget", "0"))
    assert memory.events[forget:] == [("forget", "0"), ("forget", "1")], (
        "the memory forgot partition 0 only once the batch ahead's prepare had ended (then 1, at the close)"
    )


def test_a_stop_delivers_the_batch_prepared_ahead_then_exits_cleanly() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 8)
    lifecycle = Lifecycle(30.0, exit=lambda _code: None)
    worker = Worker(config(), worker_pipeline(RecordingDetector()), client=kafka, lifecycle=lifecycle)

    def stop_during_the_first_flush(fake: FakeKafka) -> None:
        if fake.flushes == 0:
            assert worker.holds_batch_ahead()
            worker.request_stop()

    kafka.on_flush = stop_during_the_first_flush
    assert worker.run() == 0
    assert sources(kafka.topic(OUTPUT)) == [(0, i) for i in range(8)], "both polled batches delivered, no more"
    assert kafka.committed == {TopicPartition(INPUT, 0): 8} and kafka.polls == 2
    assert prepare_threads() == []


def test_a_failing_loop_drops_the_batch_ahead_and_leaves_its_offsets_uncommitted() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 8)
    original_poll = kafka.poll

    def poll(timeout_ms: int, max_records: int) -> Any:
        if kafka.polls == 2:
            raise ZeroDivisionError("a bug")
        return original_poll(timeout_ms, max_records)

    kafka.poll = poll  # type: ignore[method-assign]
    lifecycle = Lifecycle(30.0, exit=lambda _code: None)
    worker = Worker(config(), worker_pipeline(RecordingDetector()), client=kafka, lifecycle=lifecycle)
    with structlog.testing.capture_logs() as logs, pytest.raises(ZeroDivisionError):
        worker.run()

    assert sources(kafka.topic(OUTPUT)) == [(0, i) for i in range(4)]
    assert kafka.committed == {TopicPartition(INPUT, 0): 4}
    (stopped,) = [e for e in logs if e["event"] == "worker_stopped"]
    assert stopped["reprocessed_on_restart"] == {f"{INPUT}:0": "4-7"}
    assert not worker.holds_batch_ahead() and prepare_threads() == []


def test_while_a_batch_is_prepared_the_worker_polls_no_longer_than_the_prepare_should_take() -> None:
    kafka = FakeKafka(partitions=1)
    feed(kafka, 0, 12)
    timeouts: list[tuple[int, bool]] = []
    original_poll = kafka.poll
    worker: Worker | None = None

    def poll(timeout_ms: int, max_records: int) -> Any:
        assert worker is not None
        timeouts.append((timeout_ms, worker.holds_batch_ahead()))
        return original_poll(timeout_ms, max_records)

    kafka.poll = poll  # type: ignore[method-assign]
    lifecycle = Lifecycle(30.0, exit=lambda _code: None)
    worker = Worker(
        config(batch_timeout_ms=3000), worker_pipeline(RecordingDetector(delay_s=0.1)), kafka, None, lifecycle
    )
    kafka.on_idle = lambda: None if worker is None or worker.holds_batch_ahead() else worker.request_stop()
    assert worker.run() == 0

    holding = [timeout for timeout, held in timeouts if held]
    assert len(holding) >= 3 and all(timeout < 1500 for timeout in holding), timeouts  # a prepare: 0.1-0.3 s
    assert {timeout for timeout, held in timeouts if not held} == {3000}

    def slow(batch: Sequence[SourceItem]) -> PreparedBatch:
        time.sleep(1.0)
        return PreparedBatch(list(batch), [], None)

    background = BackgroundPrepare(slow)
    background.submit([])
    background.take()
    background.submit([])
    # Wide bounds: this thread may be switched out for a while between submit and the call on a loaded machine.
    assert 0.5 < background.expected_wait_s() < 1.3, "judged by the last prepare (1.0 s)"
    background.settle()
    assert background.expected_wait_s() == 0.0
    background.close()
