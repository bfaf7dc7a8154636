"""Writes the JSON Schema files of the message contracts: `python -m veilstream.schemas.export [DIR]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from veilstream.schemas.messages import DeadLetterHeaders, InputFrameHeaders, OutputFrameHeaders
from veilstream.schemas.records import AggregateRecord, FrameRecord

SCHEMAS: dict[str, type[BaseModel]] = {
    "input-frame-headers": InputFrameHeaders,
    "output-frame-headers": OutputFrameHeaders,
    "dead-letter-headers": DeadLetterHeaders,
    "frame-record": FrameRecord,
    "aggregate-record": AggregateRecord,
}


def render(model: type[BaseModel], name: str) -> str:
    schema = model.model_json_schema(by_alias=True)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"veilstream/{name}/v1", **schema}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(folder: Path = Path(__file__).parent) -> None:
    for name, model in SCHEMAS.items():
        (folder / f"{name}.schema.json").write_text(render(model, name))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
