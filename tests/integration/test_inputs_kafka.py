"""The table of malformed and unusual inputs (tests/support/input_cases.py) through one real worker process on a
real broker: every message gets its documented outcome (published, or a dead letter with its typed reason), the
worker stays alive, and every published frame is upright with its face masked (no raw frame is published)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support.brokers import TopicFactory
from tests.support.input_cases import Case, Failed, Published, base_frame, cases, published_problem
from veilstream.decoding.images import decode_frame

from .worker_harness import (
    MAX_BYTES,
    Topics,
    consume_all,
    frame_records,
    headers_of,
    produce,
    running_worker,
    write_config,
)

TOPIC_CONFIG = {"max.message.bytes": str(MAX_BYTES)}
Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]

# As in tests/test_inputs.py: correction off, one small face detector, a mask that shows on the pixels.
PIPELINE = {
    "correction": {"enabled": False},
    "anonymizer": {"kind": "mask", "value": 128},
    "detectors": {"backends": [{"type": "centerface"}]},
}


def test_every_table_input_gets_its_outcome_from_the_worker(
    kafka_bootstrap: str, topic_factory: TopicFactory, media: Path, tmp_path: Path
) -> None:
    base = base_frame(media)
    table = [case for case in cases(base) if case.kafka is not None]
    folder = tmp_path / "inputs"
    folder.mkdir()
    messages = [_message(case, folder) for case in table]  # offset i is table[i]: one partition keeps the order
    topics = Topics(
        input=topic_factory("in", config=TOPIC_CONFIG),
        output=topic_factory("out", config=TOPIC_CONFIG),
        metrics=topic_factory("metrics"),
        dlq=topic_factory("dlq", config=TOPIC_CONFIG),
    )
    config, port = write_config(tmp_path, kafka_bootstrap, topics)
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, **PIPELINE}))
    produce(kafka_bootstrap, topics.input, messages)
    published = sum(isinstance(case.kafka, Published) for case in table)

    with running_worker(config, port, tmp_path / "worker.log") as worker:
        records = frame_records(kafka_bootstrap, topics.metrics, len(table), timeout=180.0)
        outputs = consume_all(kafka_bootstrap, topics.output, published)
        dead = consume_all(kafka_bootstrap, topics.dlq, len(table) - published)
        assert worker.process.poll() is None, f"the worker must stay alive:\n{worker.tail()}"
        assert worker.get("/healthz")[0] == 200

    by_offset = {record["source_offset"]: record for record in records}
    assert sorted(by_offset) == list(range(len(table))), "one frame record per message"
    outputs_at = {int(headers_of(r)["source-offset"]): r for r in outputs}
    dead_at = {int(headers_of(r)["source-offset"]): r for r in dead}
    assert len(outputs_at) == len(outputs) and len(dead_at) == len(dead), "one outcome per message"
    problems = [
        f"{case.name}: {problem}"
        for offset, case in enumerate(table)
        for problem in _problems(case, by_offset[offset], outputs_at.get(offset), dead_at.get(offset), base)
    ]
    assert not problems, "\n".join(problems)


def _message(case: Case, folder: Path) -> Message:
    headers = [("camera-id", case.name.encode())]
    if case.content_type is not None:
        headers.append(("content-type", case.content_type.encode()))
    return case.name.encode(), case.data(folder), headers


def _problems(case: Case, record: dict[str, Any], output: Any, dead: Any, base: Any) -> list[str]:
    expected = case.kafka
    if isinstance(expected, Failed):
        if output is not None:
            return ["published, expected a dead letter"]
        if dead is None:
            return [f"no dead letter (frame record: {record['outcome']} {record['reason']})"]
        reason = headers_of(dead)["dlq-reason"]
        if reason != expected.reason or record["reason"] != expected.reason:
            return [f"dead letter {reason} (record {record['reason']}), expected {expected.reason}"]
        return []
    assert isinstance(expected, Published)
    if dead is not None or output is None:
        return [f"expected published, got {headers_of(dead)['dlq-reason'] if dead else 'no output'}"]
    boxes = [(d["x1"], d["y1"], d["x2"], d["y2"]) for d in record["detections"] if d["kind"] == "face"]
    problem = published_problem(decode_frame(output.value), boxes, case.expected(base, None))
    return [problem] if problem else []
