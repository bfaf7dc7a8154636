"""Metrics records as they travel: one JSON object per Kafka message or per line of a JSONL dump.

Both kinds share the metrics topic and are told apart by their `type` field: a `FrameRecord` ("frame") for
every frame outcome (published, masked or dropped) and an `AggregateRecord` ("aggregate") per worker window.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, TypeAlias

from pydantic import Field, TypeAdapter, ValidationError

from veilstream.errors import VeilstreamError
from veilstream.schemas import AggregateRecord, FrameRecord

MetricsRecord: TypeAlias = FrameRecord | AggregateRecord
_ADAPTER: TypeAdapter[MetricsRecord] = TypeAdapter(
    Annotated[FrameRecord | AggregateRecord, Field(discriminator="type")]
)
MAX_LISTED_ERRORS = 20
"""A dump with thousands of bad lines is reported by its first few (and a count), not line by line."""


class MetricsSourceError(VeilstreamError):
    """Metrics records could not be read (a bad JSONL file, an unreachable broker, a missing topic)."""


class MetricsFileError(MetricsSourceError):
    """A JSONL file has lines that are not metrics records; `errors` holds (line number, problem) pairs."""

    def __init__(self, path: Path, errors: list[tuple[int, str]]) -> None:
        listed = "\n".join(f"  {path}:{line}: {problem}" for line, problem in errors[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        super().__init__(f"{path}: {len(errors)} bad line(s):\n{listed}{more}")
        self.path = path
        self.errors = errors


def describe_error(error: ValidationError) -> str:
    """A one-line summary of a validation error (`field: message; ...`) instead of pydantic's long text."""
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        parts.append(f"{location}: {item['msg']}" if location else str(item["msg"]))
    return "; ".join(parts)


def parse_record(data: str | bytes) -> MetricsRecord:
    """Parse one JSON metrics record; raises pydantic's ValidationError (a ValueError) when it is not one."""
    return _ADAPTER.validate_json(data)


def load_jsonl(path: Path) -> list[MetricsRecord]:
    """Every record of a JSONL file (blank lines skipped); raises MetricsFileError naming each bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MetricsSourceError(f"cannot read {path}: {error}") from error
    return parse_lines(text.splitlines(), path)


def parse_lines(lines: Iterable[str], path: Path) -> list[MetricsRecord]:
    """Parse JSONL lines; every bad line is collected first so one run shows all problems of a dump."""
    records: list[MetricsRecord] = []
    errors: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(parse_record(line))
        except ValidationError as error:
            errors.append((number, describe_error(error)))
    if errors:
        raise MetricsFileError(path, errors)
    return records
