"""Readiness: can this worker fetch its assigned partitions and deliver its outputs now?

Judged from the clients' own state, never from an extra round trip to the broker, by a monitor thread every
`INTERVAL_S` (so it moves while the loop waits for acknowledgements). Not ready, with the reason, while:
- the worker is stopping (SIGTERM), or its clients could not be created (broker unreachable, authentication);
- it is not a member of the group: the coordinator has not answered a heartbeat for a heartbeat interval plus
  `readiness_stall_s` (coordinator unreachable, rebalancing);
- the leader of an assigned partition is unknown, or its connection failed;
- the consumer has been polling for `readiness_stall_s` without any fetch response;
- outputs (or a transaction's commit) have waited `readiness_stall_s` for the broker;
- the leader of an output partition is unknown, or its connection failed (once the producer knows the topic);
- the last delivery failed and nothing was acknowledged since, or a client reports a problem (authentication,
  fencing).
The verdict is one value: /readyz answers it and the `veilstream_ready` gauge shows it. Each change between ready
and not ready is one log line (with the kafka-python log lines suppressed meanwhile, see logs.py); a change of
reasons while not ready is one at most every `REASONS_LOG_INTERVAL_S`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import Gauge

from veilstream.client_errors import last_client_problem
from veilstream.worker.client import ClientState
from veilstream.worker.logs import client_log_limiter

log = structlog.get_logger("veilstream.worker")

INTERVAL_S = 0.5
REASONS_LOG_INTERVAL_S = 30.0


@dataclass(frozen=True)
class LoopView:
    """What the worker's loop knows that the clients do not (time.monotonic() instants)."""

    stopping: bool = False
    connect_error: str | None = None
    polling_since: float | None = None  # the loop has been polling (not processing) since
    waiting_since: float | None = None  # a flush has been waiting for the broker since
    delivery_error: str | None = None  # the last flush failed, and none succeeded since
    delivery_failed_at: float | None = None


def not_ready_reasons(
    loop: LoopView, client: ClientState | None, has_partitions: bool, stall_s: float, now: float
) -> list[str]:
    """Why the worker is not ready now; empty when it is."""
    if loop.stopping:
        return ["stopping"]
    if loop.connect_error is not None:
        return [f"not connected: {loop.connect_error}"]
    if client is None:
        return ["not connected yet"]
    reasons = list(client.problems)
    if not client.joined:
        reasons.append("not a member of the consumer group (coordinator not answering, or rebalancing)")
    if client.unreachable:
        reasons.append(f"no leader reachable for {', '.join(client.unreachable)}")
    polling = loop.polling_since is not None and now - loop.polling_since > stall_s
    if has_partitions and polling and (client.last_fetch is None or now - client.last_fetch > stall_s):
        silent = "ever" if client.last_fetch is None else f"{now - client.last_fetch:.0f} s"
        reasons.append(f"no fetch response for {silent}")
    if loop.waiting_since is not None and now - loop.waiting_since > stall_s:
        reasons.append(f"outputs unacknowledged for {now - loop.waiting_since:.0f} s")
    recovered = client.last_ack is not None and client.last_ack > (loop.delivery_failed_at or 0.0)
    if loop.delivery_error is not None and not recovered:
        reasons.append(f"last delivery failed: {loop.delivery_error}")
    return reasons


class Readiness:
    """The last verdict, shared by /readyz and the gauge; logs one line per change."""

    def __init__(self, gauge: Gauge, clock: Callable[[], float] = time.monotonic) -> None:
        self.gauge = gauge
        self.clock = clock
        self._lock = threading.Lock()
        self._reasons: tuple[str, ...] = ("starting",)
        self._since = clock()
        self._logged = float("-inf")
        gauge.set(0)

    @property
    def ready(self) -> bool:
        return not self._reasons

    @property
    def reasons(self) -> tuple[str, ...]:
        return self._reasons

    def update(self, reasons: Sequence[str]) -> None:
        with self._lock:
            now = self.clock()
            was_ready, ready = not self._reasons, not reasons
            # Reasons that differ only in a count of seconds are the same state.
            same = [r.split(" for ")[0] for r in self._reasons] == [r.split(" for ")[0] for r in reasons]
            self._reasons = tuple(reasons)
            self.gauge.set(1 if ready else 0)
            # Still not ready, for other reasons: worth a line, but not every time a sub-signal flaps.
            quiet = ready or same or now - self._logged < REASONS_LOG_INTERVAL_S
            if was_ready == ready and quiet:
                return
            self._logged = now
            lasted = round(now - self._since, 1)
            self._since = now if was_ready != ready else self._since
            suppressed = client_log_limiter.take_counts()
            if ready:
                log.info("worker_ready", not_ready_s=lasted, client_log_lines_suppressed=suppressed or None)
            else:
                log.warning(
                    "worker_not_ready",
                    reasons=list(reasons),
                    cause=last_client_problem.last,
                    ready_s=lasted if was_ready else None,
                    client_log_lines_suppressed=suppressed or None,
                )


class ReadinessMonitor:
    """Calls `refresh` every `interval_s` from a daemon thread until stopped."""

    def __init__(self, refresh: Callable[[], None], interval_s: float = INTERVAL_S) -> None:
        self.refresh = refresh
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="veilstream-readiness", daemon=True)

    def start(self) -> ReadinessMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception as error:  # a readiness check must never kill its thread
                log.error("readiness_check_failed", error=f"{type(error).__name__}: {error}")
