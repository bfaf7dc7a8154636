"""Fixtures for tests against a real Kafka broker.

* ``kafka_bootstrap`` (session): ``$VEILSTREAM_TEST_BOOTSTRAP`` if set (an external broker, used as is),
  else the bootstrap of an :class:`~tests.support.brokers.ApacheKafkaBroker` started once for the
  session (jars from ``$VEILSTREAM_CACHE``, downloaded with Maven on first use) and stopped at the end.
* ``kafka_broker``: the session's broker object, for tests that restart it. With an external broker
  such tests fail with a clear message: an external broker cannot be restarted from here.
* ``topic_factory``: ``topic_factory(prefix=None, *, partitions=1, config=None) -> str`` creates a
  uniquely named topic (deleted again after the test, best effort).

Every test under ``tests/integration`` gets the ``kafka`` marker (``-m "not kafka"`` deselects them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.brokers import ApacheKafkaBroker, TopicFactory

EXTERNAL_BOOTSTRAP_ENV = "VEILSTREAM_TEST_BOOTSTRAP"
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.kafka)


def _external_bootstrap() -> str | None:
    value = os.environ.get(EXTERNAL_BOOTSTRAP_ENV, "").strip()
    return value or None


@pytest.fixture(scope="session")
def _session_kafka_broker() -> Iterator[ApacheKafkaBroker | None]:
    if _external_bootstrap() is not None:
        yield None
        return
    with ApacheKafkaBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_bootstrap(_session_kafka_broker: ApacheKafkaBroker | None) -> str:
    """``host:port`` of the broker the tests use."""
    external = _external_bootstrap()
    if external is not None:
        return external
    assert _session_kafka_broker is not None
    return _session_kafka_broker.bootstrap


@pytest.fixture
def kafka_broker(_session_kafka_broker: ApacheKafkaBroker | None) -> ApacheKafkaBroker:
    """The session's own Apache Kafka broker (for restart tests); fails when the broker is external."""
    if _session_kafka_broker is None:
        pytest.fail(
            f"this test restarts the broker, which needs the harness's own ApacheKafkaBroker, but "
            f"{EXTERNAL_BOOTSTRAP_ENV}={_external_bootstrap()} points at an external broker: "
            f"unset {EXTERNAL_BOOTSTRAP_ENV} to run it, or deselect it"
        )
    if not _session_kafka_broker.is_running:  # a previous test may have failed mid-restart
        _session_kafka_broker.start()
    return _session_kafka_broker


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """Creates uniquely named topics (prefix: the test's name); deletes them after the test."""
    factory = TopicFactory(kafka_bootstrap, prefix=request.node.name)
    yield factory
    factory.cleanup()
