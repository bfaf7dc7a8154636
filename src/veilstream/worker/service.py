"""The `veilstream worker` process: budgets checked, models loaded, signals handled, HTTP served, loop run."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from veilstream.config import VeilstreamConfig, check_budgets
from veilstream.pipeline import Pipeline
from veilstream.worker.health import HealthServer
from veilstream.worker.lifecycle import Lifecycle
from veilstream.worker.loop import Worker

log = structlog.get_logger("veilstream.worker")


def run_worker(config: VeilstreamConfig, build: Callable[[VeilstreamConfig], Pipeline]) -> int:
    """Load the models, connect, process until signalled; returns the process exit code."""
    check_budgets(config)
    settings = config.worker
    lifecycle = Lifecycle(settings.shutdown_timeout_s, delivery_share=settings.shutdown_delivery_share)
    worker = Worker(config, build(config), lifecycle=lifecycle)
    lifecycle.install_signal_handlers()
    http = HealthServer(
        settings.http_host, settings.http_port, worker.metrics, worker.alive, worker.ready, worker.not_ready_reasons
    ).start()
    log.info("worker_started", worker=worker.worker_id, http_port=http.port, topics=list(settings.input_topics))
    try:
        return worker.run()
    finally:
        http.stop()
