"""The worker's batches: what one poll handed over, the offsets it covers, and the batch prepared ahead.

With overlap (`pipeline.overlap`), the loop polls and decodes batch n+1 and starts its `Runner.prepare` on a
background thread before it completes, delivers and commits batch n. Only the prepare moves: polling, producing,
committing and seeking stay on the loop's thread (the Kafka clients are not thread-safe). Batch n+1 is dropped,
and its offsets polled again, when batch n is rewound or when one of its partitions is revoked.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import structlog

from veilstream.runner import BackgroundPrepare, PreparedBatch, Runner, SourceItem
from veilstream.worker.client import KafkaClient, Message, TopicPartition

log = structlog.get_logger("veilstream.worker")


@dataclass(frozen=True)
class BatchReport:
    """One batch's way through the loop (time.perf_counter() instants), for observers such as benchmarks.
    With overlap, a batch is polled and decoded while the batch before it is still being completed."""

    records: int
    started: float  # records handed over by poll
    decoded: float
    processed: float  # pipeline run, records made, outputs handed to the sink
    flushed: float  # every output acknowledged (exactly-once: the transaction committed), or the flush failed
    committed: float  # offsets committed (or, when not delivered, rewound)
    send_s: float  # inside the flush: producing
    wait_s: float  # inside the flush: waiting for acknowledgements
    delivered: bool


@dataclass(frozen=True)
class Polled:
    """One poll's records, decoded into source items."""

    messages: Sequence[Message]
    items: list[SourceItem]
    started: float  # time.perf_counter() when poll handed the records over
    decoded: float


def partition_of(message: Message) -> TopicPartition:
    return TopicPartition(message.topic, message.partition)


def first_offsets(messages: Sequence[Message]) -> dict[TopicPartition, int]:
    """Where to seek to read `messages` again: the smallest offset per partition (in first-seen order)."""
    first: dict[TopicPartition, int] = {}
    for message in messages:
        tp = partition_of(message)
        first[tp] = min(first.get(tp, message.offset), message.offset)
    return first


def note_read(uncommitted: dict[TopicPartition, tuple[int, int]], messages: Sequence[Message]) -> None:
    """Widen each partition's (first offset not known to be committed, offset after the last read) to `messages`."""
    for message in messages:
        tp = partition_of(message)
        first, end = uncommitted.get(tp, (message.offset, message.offset))
        uncommitted[tp] = (min(first, message.offset), max(end, message.offset + 1))


def seek_back(client: KafkaClient, messages: Sequence[Message], partitions: Collection[TopicPartition]) -> None:
    """Seek each of `partitions` that `messages` come from back to their first offset there."""
    for tp, offset in first_offsets(messages).items():
        if tp in partitions:
            client.seek(tp, offset)


def next_offsets(messages: Sequence[Message]) -> dict[TopicPartition, int]:
    """What to commit once `messages` are delivered: the offset after the last one per partition."""
    offsets: dict[TopicPartition, int] = {}
    for message in messages:
        tp = partition_of(message)
        offsets[tp] = max(message.offset + 1, offsets.get(tp, 0))
    return offsets


class BatchAhead:
    """At most one polled batch whose prepare runs (or ran) in the background."""

    def __init__(self, runner: Runner) -> None:
        self._background = BackgroundPrepare(runner.prepare)
        self._polled: Polled | None = None

    @property
    def held(self) -> bool:
        return self._polled is not None

    def start(self, polled: Polled) -> None:
        self._background.submit(polled.items)  # raises if a batch is already held: one ahead at most
        self._polled = polled

    def take(self) -> tuple[Polled, PreparedBatch]:
        """The held batch, waiting for its prepare to end."""
        polled, self._polled = self._polled, None
        if polled is None:
            raise RuntimeError("no batch is held")
        return polled, self._background.take()

    def expected_wait_s(self) -> float:
        return self._background.expected_wait_s()

    def release(self, revoked: Collection[TopicPartition], client: KafkaClient) -> None:
        """On a revoke: let a prepare in flight end (then nothing else uses the pipeline's memory); drop the held
        batch if it holds records of `revoked`, seeking the partitions still ours back to read it again."""
        self._background.settle()
        polled = self._polled
        if polled is None or not any(partition_of(m) in revoked for m in polled.messages):
            return
        dropped = self.discard()
        seek_back(client, dropped, client.assignment() - set(revoked))
        log.info("batch_ahead_dropped", frames=len(dropped), reason="partitions revoked")

    def discard(self) -> Sequence[Message]:
        """Drop the held batch (its prepare cancelled or waited for); returns its messages, to be read again."""
        polled, self._polled = self._polled, None
        self._background.discard()
        return polled.messages if polled is not None else ()

    def close(self) -> Sequence[Message]:
        messages = self.discard()
        self._background.close()
        return messages
