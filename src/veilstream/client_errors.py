"""Why a Kafka client cannot connect, in words: kafka-python logs the cause (a failed SASL authentication, an
untrusted certificate) and raises only "Unable to bootstrap". The worker, replay and monitor name the cause."""

from __future__ import annotations

import logging
import threading

CLIENT_LOGGER = "kafka"


class LastClientProblem(logging.Handler):
    """Remembers kafka-python's last warning or error (installed once on the `kafka` logger)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self._lock_last = threading.Lock()
        self._last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed client record must not break logging
            text = str(record.msg)
        with self._lock_last:
            self._last = text[:300]

    @property
    def last(self) -> str | None:
        with self._lock_last:
            return self._last


last_client_problem = LastClientProblem()


def watch_client_problems() -> LastClientProblem:
    """Install the recorder on kafka-python's loggers (idempotent) and return it."""
    logger = logging.getLogger(CLIENT_LOGGER)
    if last_client_problem not in logger.handlers:
        logger.addHandler(last_client_problem)
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)
    return last_client_problem


def describe_connect_failure(error: BaseException) -> str:
    """The error, with the client's own last complaint when it says more (e.g. an authentication failure)."""
    cause = last_client_problem.last
    text = f"{type(error).__name__}: {error}"
    return f"{text}; last client error: {cause}" if cause else text
