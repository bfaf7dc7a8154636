"""When the worker stops: signals, the shutdown watchdog and the process exit, apart from what it routes.

SIGTERM/SIGINT ask the loop to stop: it fetches nothing more, and the batch in flight may wait for its
acknowledgements until `deliveries_deadline()` (a share of `shutdown_timeout_s`); what is not acknowledged by then
is not committed, and the worker exits 0 saying which offsets will be reprocessed. A second signal exits at once.
Past `shutdown_timeout_s` the watchdog exits with 70 without committing: a last resort, for a loop that does not
come back. The exit function is injected, so that tests and benchmarks running a worker in their own process are
not killed by it; the `veilstream worker` process uses `os._exit`, which no `finally` can hold up.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

log = structlog.get_logger("veilstream.worker")

SHUTDOWN_OVERRUN_EXIT = 70


class Lifecycle:
    def __init__(
        self, shutdown_timeout_s: float, exit: Callable[[int], object] = os._exit, delivery_share: float = 0.5
    ) -> None:
        self.shutdown_timeout_s = shutdown_timeout_s
        self.delivery_share = delivery_share
        self.stop_requested_at: float | None = None  # time.monotonic()
        self._exit = exit
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._signals = 0
        self._finished = False
        self._watchdog: threading.Timer | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum: int, _frame: FrameType | None = None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second_signal_exit_now", signal=signum)
            self._exit(128 + signum)
            return
        log.info("shutdown_requested", signal=signum)
        self.request_stop()

    def request_stop(self) -> None:
        """Stop after the batch in flight; past the bound, the watchdog exits (unless the loop already ended)."""
        with self._lock:
            if self._stop.is_set():
                return
            self.stop_requested_at = time.monotonic()
            self._stop.set()
            if self._finished:
                return
            self._watchdog = threading.Timer(self.shutdown_timeout_s, self._overrun)
            self._watchdog.daemon = True
            self._watchdog.start()

    def deliveries_deadline(self) -> float | None:
        """time.monotonic() by which the batch in flight must stop waiting for acknowledgements (None: running)."""
        if self.stop_requested_at is None:
            return None
        return self.stop_requested_at + self.delivery_share * self.shutdown_timeout_s

    def close_deadline(self) -> float | None:
        """time.monotonic() by which the clients must be closed: a margin before the watchdog (None: running)."""
        if self.stop_requested_at is None:
            return None
        return self.stop_requested_at + 0.9 * self.shutdown_timeout_s

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, woken by a stop request; True when stopping."""
        return self._stop.wait(seconds)

    def finished(self) -> None:
        """The loop ended within the bound: disarm the watchdog (a host process may go on)."""
        with self._lock:
            self._finished = True
            if self._watchdog is not None:
                self._watchdog.cancel()

    def _overrun(self) -> None:
        log.error("shutdown_timeout_exceeded", seconds=self.shutdown_timeout_s)
        self._exit(SHUTDOWN_OVERRUN_EXIT)
