"""Versioned contracts: Kafka headers of input, output and dead-letter frames, and the frame and aggregate records.

The Python types here are the source of truth; the JSON Schema files beside them are generated from them
(`python -m veilstream.schemas.export`) and a test keeps the two identical.
"""

from veilstream.schemas.messages import (
    SCHEMA_VERSION,
    DeadLetterHeaders,
    InputFrameHeaders,
    OutputFrameHeaders,
    decode_headers,
    encode_headers,
)
from veilstream.schemas.records import (
    RECORD_VERSION,
    AggregateRecord,
    DecisionRecord,
    DetectionRecord,
    Figures,
    FrameRecord,
)

__all__ = [
    "RECORD_VERSION",
    "SCHEMA_VERSION",
    "AggregateRecord",
    "DeadLetterHeaders",
    "DecisionRecord",
    "DetectionRecord",
    "Figures",
    "FrameRecord",
    "InputFrameHeaders",
    "OutputFrameHeaders",
    "decode_headers",
    "encode_headers",
]
