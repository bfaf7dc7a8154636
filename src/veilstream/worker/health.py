"""HTTP endpoints: /healthz (alive: the main loop turns), /readyz (ready: partitions can be fetched and outputs
delivered now, see readiness.py; the body says why not), /metrics (Prometheus)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from veilstream.worker.metrics import WorkerMetrics


class HealthServer:
    """Serves the three endpoints from a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: WorkerMetrics,
        alive: Callable[[], bool],
        ready: Callable[[], bool],
        reasons: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer.metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = outer.alive()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
                elif path == "/readyz":
                    ok = outer.ready()
                    why = "; ".join(outer.reasons()) if not ok else ""
                    body = "ready\n" if ok else f"not ready: {why}\n" if why else "not ready\n"
                    self._send(200 if ok else 503, body.encode())
                else:
                    self._send(404, b"not found\n")

            def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # probes every few seconds would flood the logs

        self.metrics = metrics
        self.alive = alive
        self.ready = ready
        self.reasons = reasons
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="veilstream-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Heartbeat:
    """The main loop beats; liveness fails when it has not beaten for `timeout` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.timeout
