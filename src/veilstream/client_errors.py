"""Why a Kafka client cannot connect, in words: kafka-python logs the cause (a failed SASL authentication, an
untrusted certificate) and raises only "Unable to bootstrap". The worker, replay and monitor name the cause."""

from __future__ import annotations

import logging
import re
import threading
from collections import deque

CLIENT_LOGGER = "kafka"
# Causes worth naming over the generic lines around them ("socket disconnected", "Unable to bootstrap").
_SPECIFIC = re.compile(
    r"authenticat|\bsasl|\bssl\b|certificate|credential|password|unauthori[sz]ed|denied", re.IGNORECASE
)


# kafka-python 3.0 often loses the broker's SaslAuthenticate error: the broker closes the TLS connection right
# after it, and the client reports only "socket disconnected" (seen on most tries on a loaded machine).
_SASL_CLOSED = (
    "the broker closed the connection during SASL authentication ({line}): this is how a rejected "
    "authentication usually shows; check sasl_username, the password and sasl_mechanism"
)


class LastClientProblem(logging.Handler):
    """Remembers kafka-python's recent warnings and errors (installed once on the `kafka` logger). `sasl`: the
    clients authenticate with SASL, so a connection closed by the broker is named as a likely failed login."""

    def __init__(self, keep: int = 50) -> None:
        super().__init__(level=logging.WARNING)
        self._lock_last = threading.Lock()
        self._recent: deque[str] = deque(maxlen=keep)
        self.sasl = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed client record must not break logging
            text = str(record.msg)
        with self._lock_last:
            self._recent.append(text[:300])

    @property
    def last(self) -> str | None:
        """The most recent specific cause (authentication, TLS) among the recent lines, else the last line."""
        with self._lock_last:
            recent = list(self._recent)
        specific = [text for text in recent if _SPECIFIC.search(text)]
        if specific:
            return specific[-1]
        closed = [text for text in recent if "socket disconnected" in text]
        if self.sasl and closed:
            return _SASL_CLOSED.format(line=closed[-1])
        return recent[-1] if recent else None


last_client_problem = LastClientProblem()


def watch_client_problems(security_protocol: str | None = None) -> LastClientProblem:
    """Install the recorder on kafka-python's loggers (idempotent) and return it; `security_protocol` (the
    clients' setting, when known) tells it whether they log in with SASL."""
    if security_protocol is not None:
        last_client_problem.sasl = security_protocol.startswith("SASL")
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
