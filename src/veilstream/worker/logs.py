"""structlog set up for JSON lines on stderr (one event per line, lineage as fields), and kafka-python's own log
lines limited: while a broker is down it repeats the same warning in a tight loop ("Marking the coordinator
dead", up to tens of thousands of lines a minute). Each kafka-python message template passes once per
`interval_s`; the repeats are counted, their number is added to the next line of that template that passes, and
the worker's readiness log line reports (and resets) the counts when readiness changes.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import structlog

from veilstream.client_errors import watch_client_problems

CLIENT_LOGGER = "kafka"


class RepeatLimiter(logging.Filter):
    """Lets each (logger, message template) through once per `interval_s` and counts what it holds back."""

    def __init__(
        self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic, max_templates: int = 1000
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        # Some kafka-python lines are pre-formatted (a backoff in the text): each is its own template.
        self.max_templates = max_templates
        self.clock = clock
        self._lock = threading.Lock()
        self._passed: dict[tuple[str, str], float] = {}
        self._held: Counter[tuple[str, str]] = Counter()  # since the template last passed
        self._counts: Counter[str] = Counter()  # since take_counts, by template

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(CLIENT_LOGGER):
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            last = self._passed.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] += 1
                self._counts[str(record.msg)[:80]] += 1
                return False
            self._passed.pop(key, None)  # re-inserted: the dict stays ordered by when each template last passed
            self._passed[key] = now
            held = self._held.pop(key, 0)
            if len(self._passed) > self.max_templates:
                self._forget_before(now - self.interval_s)
        if held:
            # Appended to the formatted message, so a template's own %-placeholders stay intact.
            record.msg = f"{record.getMessage()} [repeated {held} more times in the last {self.interval_s:.0f} s]"
            record.args = None
        return True

    def _forget_before(self, cutoff: float) -> None:
        """Drop templates that last passed before `cutoff` (they would pass again anyway), or the oldest ones
        beyond `max_templates`; their held repeats are still in `_counts` for the readiness line."""
        stale = [key for key, passed in self._passed.items() if passed < cutoff]
        if len(self._passed) - len(stale) > self.max_templates:  # all recent: forget the oldest (dicts keep order)
            stale = list(self._passed)[: len(self._passed) - self.max_templates]
        for key in stale:
            del self._passed[key]
            self._held.pop(key, None)
        while len(self._counts) > self.max_templates:  # never taken: keep the most repeated
            del self._counts[min(self._counts, key=self._counts.__getitem__)]

    def take_counts(self) -> dict[str, int]:
        """The lines held back since the last call, by message template."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


client_log_limiter = RepeatLimiter()


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO), format="%(message)s")
    # kafka-python is chatty at INFO about every reconnect; keep its warnings, limited.
    logging.getLogger(CLIENT_LOGGER).setLevel(logging.WARNING)
    watch_client_problems()
    for handler in logging.getLogger().handlers:
        if client_log_limiter not in handler.filters:
            handler.addFilter(client_log_limiter)  # a handler filter sees the records of every kafka.* logger
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
