"""Reading topics for the monitor and the report: kafka-python consumers that never commit.

Partitions are assigned (no subscription, so no group rebalance touches the workers' group) and positioned
explicitly: from a timestamp (`offsets_for_times`) or from the beginning.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient

CLIENT_ID = "veilstream-monitor"
POLL_MS = 200


def client_config(bootstrap: str, client_options: Mapping[str, Any] | None, connect_timeout_s: float) -> dict[str, Any]:
    """Connection options: `client_options` (e.g. `KafkaConfig.client_options()`, for TLS/SASL) with the
    explicit bootstrap winning, and a bootstrap timeout so an unreachable broker fails fast."""
    config = dict(client_options or {})
    config["bootstrap_servers"] = bootstrap.split(",")
    config.setdefault("client_id", CLIENT_ID)
    config.setdefault("bootstrap_timeout_ms", max(1000, int(connect_timeout_s * 1000)))
    config.setdefault("request_timeout_ms", max(5000, int(connect_timeout_s * 1000)))
    return config


def open_consumer(
    bootstrap: str,
    *,
    group: str | None = None,
    client_options: Mapping[str, Any] | None = None,
    connect_timeout_s: float = 10.0,
) -> Any:
    """A consumer that never commits: no group by default; a given group is only a label (nothing committed)."""
    return KafkaConsumer(
        group_id=group,
        enable_auto_commit=False,
        # the monitor only reads: it must not create a mistyped topic on a broker that allows auto-creation
        allow_auto_create_topics=False,
        auto_offset_reset="earliest",
        # an exactly-once worker's aborted attempts stay in the log: count only what was committed
        isolation_level="read_committed",
        **client_config(bootstrap, client_options, connect_timeout_s),
    )


def open_admin(
    bootstrap: str, *, client_options: Mapping[str, Any] | None = None, connect_timeout_s: float = 10.0
) -> Any:
    """A kafka-python admin client with the same connection options as the consumers."""
    return KafkaAdminClient(**client_config(bootstrap, client_options, connect_timeout_s))


def topic_partitions(consumer: Any, topic: str) -> list[TopicPartition]:
    """The partitions of `topic`, sorted; empty when the topic does not exist."""
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


def to_millis(moment: datetime) -> int:
    """Epoch milliseconds, the unit of Kafka timestamps."""
    return int(moment.timestamp() * 1000)


def offsets_at(
    consumer: Any, partitions: Sequence[TopicPartition], since: datetime | None, end: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """The first offset at or after `since` per partition (the beginning when None; the end when the partition
    holds nothing that recent)."""
    if not partitions:
        return {}
    if since is None:
        return dict(consumer.beginning_offsets(list(partitions)))
    found = consumer.offsets_for_times({tp: max(0, to_millis(since)) for tp in partitions})
    return {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in partitions}


def assign_at(consumer: Any, starts: Mapping[TopicPartition, int]) -> None:
    """Assign exactly these partitions, positioned at the given offsets."""
    consumer.assign(list(starts))
    for tp, offset in starts.items():
        consumer.seek(tp, offset)


def read_range(
    consumer: Any,
    starts: Mapping[TopicPartition, int],
    stops: Mapping[TopicPartition, int],
    timeout_s: float,
) -> Iterator[Any]:
    """Yield the records with start <= offset < stop of every partition, then return.

    Done is judged by the consumer's position, not by the last record's offset: transaction markers and
    compaction leave offsets that no record carries. Raises TimeoutError when not done within `timeout_s`.
    """
    assign_at(consumer, starts)
    pending = {tp for tp in starts if starts[tp] < stops[tp]}
    done = [tp for tp in starts if tp not in pending]
    if done:
        consumer.pause(*done)
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            behind = sum(stops[tp] - consumer.position(tp) for tp in pending)
            raise TimeoutError(f"not caught up within {timeout_s:g}s: {behind} record(s) still unread")
        for tp, records in consumer.poll(timeout_ms=POLL_MS).items():
            for record in records:
                if record.offset < stops[tp]:
                    yield record
        for tp in list(pending):
            if consumer.position(tp) >= stops[tp]:
                pending.discard(tp)
                consumer.pause(tp)  # records past the stop would only be dropped
