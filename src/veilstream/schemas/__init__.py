"""Versioned message contracts: Kafka headers of input, output and dead-letter frames, and metrics records.

The Python types here are the source of truth; the JSON Schema files beside them are generated from them
(`python -m veilstream.schemas.export`) and a test keeps the two identical.
"""

from veilstream.schemas.messages import (
    SCHEMA_VERSION,
    AggregateMetrics,
    DeadLetterHeaders,
    DecisionRecord,
    FrameMetrics,
    InputFrameHeaders,
    OutputFrameHeaders,
    decode_headers,
    encode_headers,
)

__all__ = [
    "SCHEMA_VERSION",
    "AggregateMetrics",
    "DeadLetterHeaders",
    "DecisionRecord",
    "FrameMetrics",
    "InputFrameHeaders",
    "OutputFrameHeaders",
    "decode_headers",
    "encode_headers",
]
