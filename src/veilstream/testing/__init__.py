"""Test and local-run helpers: real Kafka-protocol brokers (see :mod:`veilstream.testing.brokers`).

Names are loaded lazily so that ``python -m veilstream.testing.brokers`` does not import the module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from veilstream.testing.brokers import (
        KAFKA_VERSION,
        ApacheKafkaBroker,
        Broker,
        BrokerError,
        BrokerSetupError,
        BrokerStartError,
        TansuBroker,
        TopicFactory,
        create_topics,
        delete_topics,
        fetch_kafka,
        free_port,
        wait_for_broker,
    )

__all__ = [
    "KAFKA_VERSION",
    "ApacheKafkaBroker",
    "Broker",
    "BrokerError",
    "BrokerSetupError",
    "BrokerStartError",
    "TansuBroker",
    "TopicFactory",
    "create_topics",
    "delete_topics",
    "fetch_kafka",
    "free_port",
    "wait_for_broker",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("veilstream.testing.brokers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
