"""Objects kept across frames: the per-camera memory, and the pipeline and runner that consult it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from veilstream.anonymizers.filters import SolidMask
from veilstream.decoding.files import file_items
from veilstream.decoding.images import Frame, decode_frame
from veilstream.detectors.base import Detection
from veilstream.detectors.config import DetectorConfig, MemoryConfig, build_memory
from veilstream.detectors.finders import DetectorRegionFinder
from veilstream.detectors.memory import DetectionMemory, FrameKey
from veilstream.pipeline import FailurePolicy, Pipeline
from veilstream.publishing.encoding import Encoder
from veilstream.runner import KafkaLineage, MemorySink, Origin, Runner, SourceItem, frame_key

W, H = 200, 100
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def face(x1: float, y1: float = 40, size: float = 10, score: float = 0.9) -> Detection:
    return Detection(x1, y1, x1 + size, y1 + size, score, "face")


def key(camera: str, sequence: int | None, seconds: float | None = None) -> FrameKey:
    return FrameKey(camera, sequence, None if seconds is None else T0 + timedelta(seconds=seconds))


def boxes(found: Sequence[Detection]) -> list[tuple[float, float, float, float]]:
    return [(round(d.x1, 3), round(d.y1, 3), round(d.x2, 3), round(d.y2, 3)) for d in found]


def test_a_missed_face_is_kept_where_its_motion_predicts_it() -> None:
    memory = DetectionMemory(frames=3, seconds=None, growth=0.0)
    assert memory.remember(key("a", 0), [face(10)], W, H) == []
    assert memory.remember(key("a", 1), [face(14)], W, H) == []  # found again: nothing to add
    # Missed in frame 2: blurred 2 px (half of the 4 px step, smoothed) further on.
    (kept,) = memory.remember(key("a", 2), [], W, H)
    assert boxes([kept]) == [(16.0, 40.0, 26.0, 50.0)]
    (kept,) = memory.remember(key("a", 3), [], W, H)
    assert boxes([kept]) == [(18.0, 40.0, 28.0, 50.0)]


def test_growth_widens_a_predicted_box_per_frame() -> None:
    memory = DetectionMemory(frames=3, seconds=None, growth=0.1)
    memory.remember(key("a", 0), [face(10)], W, H)
    (first,) = memory.remember(key("a", 1), [], W, H)
    (second,) = memory.remember(key("a", 2), [], W, H)
    assert boxes([first]) == [(9.0, 39.0, 21.0, 51.0)]
    assert boxes([second]) == [(8.0, 38.0, 22.0, 52.0)]


def test_a_box_is_kept_for_at_most_the_configured_frames() -> None:
    memory = DetectionMemory(frames=2, seconds=None)
    memory.remember(key("a", 0), [face(10)], W, H)
    assert len(memory.remember(key("a", 1), [], W, H)) == 1
    assert len(memory.remember(key("a", 2), [], W, H)) == 1
    assert memory.remember(key("a", 3), [], W, H) == []


def test_a_box_is_kept_for_at_most_the_configured_seconds_of_capture_time() -> None:
    memory = DetectionMemory(frames=10, seconds=0.5)
    memory.remember(key("a", 0, 0.0), [face(10)], W, H)
    assert len(memory.remember(key("a", 1, 0.4), [], W, H)) == 1
    assert memory.remember(key("a", 2, 0.8), [], W, H) == [], "0.8 s after it was last seen"


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (key("a", 2), "a frame of the sequence is missing"),
        (key("a", 0), "the same frame again (a retried batch)"),
        (key("a", None), "no sequence number and no capture time: the order is unknown"),
        (None, "a frame without a key"),
    ],
)
def test_a_gap_or_an_unknown_order_starts_the_camera_afresh(second: FrameKey | None, why: str) -> None:
    memory = DetectionMemory(frames=5, seconds=None)
    memory.remember(key("a", 0), [face(10)], W, H)
    assert memory.remember(second, [], W, H) == [], why
    # And the reset is real: the next frame in order does not bring the old box back either.
    if second is not None and second.sequence is not None:
        assert memory.remember(key("a", second.sequence + 1), [], W, H) == []


def test_without_sequence_numbers_capture_time_tells_the_order() -> None:
    memory = DetectionMemory(frames=5, seconds=1.0)
    memory.remember(key("a", None, 0.0), [face(10)], W, H)
    assert len(memory.remember(key("a", None, 0.1), [], W, H)) == 1
    assert memory.remember(key("a", None, 1.5), [], W, H) == [], "more than `seconds` later: a gap"


def test_cameras_are_kept_apart() -> None:
    memory = DetectionMemory(frames=5, seconds=None)
    memory.remember(key("a", 0), [face(10)], W, H)
    memory.remember(key("b", 0), [face(100)], W, H)
    assert boxes(memory.remember(key("a", 1), [], W, H)) == [(9.0, 39.0, 21.0, 51.0)]
    assert boxes(memory.remember(key("b", 1), [], W, H)) == [(99.0, 39.0, 111.0, 51.0)]
    # A gap on camera b resets b only.
    assert memory.remember(key("b", 5), [], W, H) == []
    assert len(memory.remember(key("a", 2), [], W, H)) == 1


def test_cameras_of_a_revoked_partition_are_forgotten() -> None:
    memory = DetectionMemory(frames=5, seconds=None)
    memory.remember(FrameKey("a", 0, partition=("frames", 0)), [face(10)], W, H)
    memory.remember(FrameKey("b", 0, partition=("frames", 1)), [face(100)], W, H)
    memory.forget_partitions([("frames", 0)])
    assert memory.cameras == {"b"}
    assert memory.remember(FrameKey("a", 1, partition=("frames", 0)), [], W, H) == []
    assert len(memory.remember(FrameKey("b", 1, partition=("frames", 1)), [], W, H)) == 1
    memory.forget(["b"])
    assert memory.cameras == {"a"}


def test_a_box_covered_by_a_detection_is_not_added_twice_and_others_are() -> None:
    memory = DetectionMemory(frames=5, seconds=None, growth=0.0)
    memory.remember(key("a", 0), [face(10), face(100)], W, H)
    # Frame 1: the first face is found (inside a merged, larger box), the second is missed.
    merged = Detection(5, 35, 30, 55, 0.9, "face")
    assert boxes(memory.remember(key("a", 1), [merged], W, H)) == [(100.0, 40.0, 110.0, 50.0)]


def test_a_box_predicted_out_of_the_picture_is_dropped_and_boxes_are_clipped() -> None:
    memory = DetectionMemory(frames=5, seconds=None, growth=0.0)
    memory.remember(key("a", 0), [face(180)], W, H)
    memory.remember(key("a", 1), [face(188)], W, H)
    (kept,) = memory.remember(key("a", 2), [], W, H)
    assert kept.x2 == W, "clipped to the frame"
    for sequence in range(3, 8):
        memory.remember(key("a", sequence), [], W, H)
    assert memory.remember(key("a", 8), [], W, H) == []


def test_plates_and_faces_are_matched_within_their_kind() -> None:
    memory = DetectionMemory(frames=5, seconds=None, growth=0.0)
    memory.remember(key("a", 0), [face(10)], W, H)
    plate = Detection(10, 40, 20, 50, 0.5, "plate")
    (kept,) = memory.remember(key("a", 1), [plate], W, H)
    assert kept.kind == "face", "a plate on the same spot does not continue the face"


def test_memory_settings_are_validated_and_zero_frames_turns_it_off() -> None:
    with pytest.raises(ValueError, match="frames"):
        DetectionMemory(frames=-1)
    with pytest.raises(ValueError, match="seconds"):
        DetectionMemory(seconds=0)
    assert build_memory(MemoryConfig(frames=0)) is None
    memory = build_memory(DetectorConfig().memory)
    assert memory is not None and memory.frames == 5 and memory.seconds == 1.0


# --- through the pipeline and the runner ---------------------------------------------------------------------


class OnlyFirstFrame:
    """Finds the face in frames whose first pixel is 1, and nothing in the others (a detector that misses)."""

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        return [[face(40)] if int(f[0, 0, 0]) == 1 else [] for f in frames]


def _frames(count: int) -> list[Frame]:
    frames = []
    for index in range(count):
        frame = np.full((H, W, 3), 200, np.uint8)
        frame[0, 0] = 1 if index == 0 else 2
        frames.append(frame)
    return frames


def _pipeline(memory: DetectionMemory | None) -> Pipeline:
    return Pipeline(
        DetectorRegionFinder(OnlyFirstFrame()),
        SolidMask(value=0),
        Encoder("png"),
        policy=FailurePolicy("drop", "off"),
        memory=memory,
    )


def _hidden(data: bytes) -> bool:
    """The face's centre is masked in the published frame."""
    return bool((decode_frame(data)[45, 45] == 0).all())


def test_the_pipeline_blurs_a_remembered_face_in_the_next_frames_of_the_camera() -> None:
    pipeline = _pipeline(DetectionMemory(frames=2, seconds=None))
    keys = [key("cam", i) for i in range(4)]
    outcomes = pipeline.process(_frames(4), keys)
    assert [_hidden(o.data) for o in outcomes] == [True, True, True, False]  # type: ignore[union-attr]
    assert [len(o.remembered) for o in outcomes] == [0, 1, 1, 0]
    assert [o.faces for o in outcomes] == [1, 1, 1, 0], "a remembered box is an anonymized face"


def test_the_pipeline_remembers_nothing_without_keys_or_memory() -> None:
    assert [_hidden(o.data) for o in _pipeline(DetectionMemory()).process(_frames(2))] == [True, False]  # type: ignore[union-attr]
    keys = [key("cam", 0), key("cam", 1)]
    assert [_hidden(o.data) for o in _pipeline(None).process(_frames(2), keys)] == [True, False]  # type: ignore[union-attr]


def test_the_pipeline_keeps_memory_across_batches_and_apart_per_camera() -> None:
    pipeline = _pipeline(DetectionMemory(frames=5, seconds=None))
    first, second = _frames(2)
    pipeline.process([first], [key("a", 0)])
    # Camera b never saw the face; camera a's next frame, in the next batch, still hides it.
    outcomes = pipeline.process([second, second], [key("b", 1), key("a", 1)])
    assert [_hidden(o.data) for o in outcomes] == [False, True]  # type: ignore[union-attr]


def test_the_runner_passes_each_frames_camera_sequence_and_partition() -> None:
    memory = DetectionMemory(frames=5, seconds=None)
    sink = MemorySink()
    runner = Runner(_pipeline(memory), [sink], batch_size=2, worker="test")
    lineage = KafkaLineage("frames", 3, 0, b"cam", b"")
    items = [
        SourceItem(Origin("cam", sequence=i, capture_time=T0, kafka=lineage), frame)
        for i, frame in enumerate(_frames(3))
    ]
    runner.run(items)
    assert [p.record.remembered for p in sink.flushed] == [0, 1, 1]
    assert frame_key(items[0].origin) == FrameKey("cam", 0, T0, ("frames", 3))
    memory.forget_partitions([("frames", 3)])
    assert memory.cameras == frozenset()


class DarkCornerFace:
    """Finds the face in frames whose top-left corner is dark (survives video compression)."""

    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        return [[face(40)] if float(f[:16, :16].mean()) < 60 else [] for f in frames]


def test_anonymize_keeps_a_video_as_one_camera_in_frame_order(tmp_path: Path) -> None:
    """`anonymize` reads a video as one camera whose frames carry their frame numbers: the memory applies."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (W, H))
    for index in range(4):
        frame = np.full((H, W, 3), 200, np.uint8)
        if index == 0:
            frame[:16, :16] = 0
        writer.write(frame)
    writer.release()
    pipeline = Pipeline(
        DetectorRegionFinder(DarkCornerFace()),
        SolidMask(value=0),
        Encoder("png"),
        policy=FailurePolicy("drop", "off"),
        memory=DetectionMemory(frames=2, seconds=None),
    )
    sink = MemorySink()
    Runner(pipeline, [sink], batch_size=3, worker="anonymize").run(file_items([path]))
    assert [p.record.sequence for p in sink.flushed] == [0, 1, 2, 3]
    assert [p.record.remembered for p in sink.flushed] == [0, 1, 1, 0]


class AlwaysFace:
    def detect(self, frames: Sequence[Frame]) -> list[list[Detection]]:
        return [[face(40, 20)] for _ in frames]


def test_the_worker_forgets_the_cameras_of_a_revoked_partition() -> None:
    """Each camera's state lives with the worker that owns its partition: a revoke hands the camera on."""
    from veilstream.worker.client import TopicPartition
    from veilstream.worker.lifecycle import Lifecycle
    from veilstream.worker.loop import Worker

    from .fake_kafka import FakeKafka
    from .test_worker_delivery import INPUT, config, feed

    memory = DetectionMemory(frames=5, seconds=None)
    pipeline = Pipeline(
        DetectorRegionFinder(AlwaysFace()),
        SolidMask(value=0),
        Encoder("jpeg", 90),
        policy=FailurePolicy("drop", "off"),
        memory=memory,
    )
    kafka = FakeKafka(partitions=2)
    feed(kafka, 0, 3)
    feed(kafka, 1, 3)
    lifecycle = Lifecycle(30.0, exit=lambda code: None)
    worker = Worker(config(), pipeline, client=kafka, lifecycle=lifecycle)
    seen: list[frozenset[str]] = []

    def idle() -> None:  # every input handled: revoke one partition, then stop
        seen.append(memory.cameras)
        worker.on_revoked({TopicPartition(INPUT, 0)})
        seen.append(memory.cameras)
        lifecycle.request_stop()

    kafka.on_idle = idle
    kafka.poll_limit = 60
    assert worker.run() == 0
    assert seen[:2] == [{"cam-0", "cam-1"}, {"cam-1"}]
    assert memory.cameras == frozenset(), "closing leaves the group: every partition is revoked"
