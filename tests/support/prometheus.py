"""A real Prometheus server (Debian package ``prometheus``) for tests: scrape targets, rule files, HTTP API.

How it is started: ``prometheus --config.file=WORK/prometheus.yml --storage.tsdb.path=WORK/data
--web.listen-address=127.0.0.1:PORT`` with output in ``WORK/prometheus.log``; ready when ``/-/ready`` answers
200. The configuration scrapes every target each ``interval_s`` and evaluates the rules as often.

The shipped alert rules wait minutes (``for:``) before they fire; :func:`immediate_copy` writes a copy of a rules
file that differs only in ``for: 0s``, one label that tells its alerts apart and the group names, so a test
sees the copy fire and the original, loaded beside it, at least pending on the same data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from veilstream.commands.embedded_broker import free_port, launch, terminate

__all__ = ["COPY_LABEL", "PrometheusServer", "ScrapeJob", "immediate_copy"]

COPY_LABEL = ("rules_copy", "for-0s")
"""The label every alert of :func:`immediate_copy` carries."""


@dataclass(frozen=True)
class ScrapeJob:
    """One scrape job: ``targets`` (``host:port``) with fixed target ``labels`` (e.g. Kubernetes' namespace)."""

    name: str
    targets: Sequence[str]
    labels: Mapping[str, str] = field(default_factory=dict)


def immediate_copy(rules: Path, destination: Path) -> Path:
    """Write ``rules`` again with every ``for:`` at 0s, :data:`COPY_LABEL` on every alert, groups renamed."""
    document = yaml.safe_load(rules.read_text())
    name, value = COPY_LABEL
    for group in document["groups"]:
        group["name"] = f"{group['name']}.{value}"
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
                rule["labels"] = {**rule.get("labels", {}), name: value}
    destination.write_text(yaml.safe_dump(document, sort_keys=False))
    return destination


class PrometheusServer:
    """``prometheus`` as a child process on ``127.0.0.1``; a context manager."""

    def __init__(
        self, workdir: Path, jobs: Sequence[ScrapeJob], rule_files: Sequence[Path] = (), interval_s: float = 1.0
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: apt-get install prometheus (scripts/setup.sh does)")
        self.binary = binary
        self.workdir = workdir
        self.jobs = list(jobs)
        self.rule_files = list(rule_files)
        self.interval_s = interval_s
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configuration(self) -> dict[str, Any]:
        interval = f"{self.interval_s:g}s"
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": job.name,
                    "static_configs": [{"targets": list(job.targets), "labels": dict(job.labels)}],
                }
                for job in self.jobs
            ],
        }

    def start(self, timeout_s: float = 30.0) -> Self:
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.configuration(), sort_keys=False))
        command = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        process = self._process = launch(command, self.log_path)
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def stop(self) -> None:
        if self._process is not None:
            terminate(self._process, timeout=10.0)
            self._process = None

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a successful API answer (``/api/v1/...``)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector of ``expression`` now."""
        data = self.api("query", query=expression)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), each with ``labels``, ``annotations``, ``state``, ``value``."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rule_health(self) -> dict[str, str]:
        """Each loaded rule's name (alert or record) and its evaluation health (``ok``, ``err``, ``unknown``)."""
        return {
            f"{group['name']}/{rule['name']}": rule["health"]
            for group in self.api("rules")["groups"]
            for rule in group["rules"]
        }

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
