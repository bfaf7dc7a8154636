"""Kafka connection and worker settings (sections `kafka` and `worker` of the configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Strict):
    """How to reach the brokers. Secrets are SecretStr: never printed, never logged."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "veilstream"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and (
            self.sasl_mechanism is None or self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError("SASL needs sasl_mechanism, sasl_username and sasl_password")
        return self

    def client_options(self) -> dict[str, Any]:
        """kafka-python connection options (with the secret revealed: pass to the client only)."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            options |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            }
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, key)
            if value is not None:
                options[key] = str(value)
        if self.security_protocol.endswith("SSL"):
            options["ssl_check_hostname"] = self.ssl_check_hostname
        return options


class WorkerConfig(_Strict):
    input_topics: tuple[str, ...] = ("frames",)
    output_topic: str = "frames-anonymized"
    metrics_topic: str = "veilstream-metrics"
    dlq_topic: str = "frames-dead-letter"
    group_id: str = "veilstream"
    batch_timeout_ms: int = Field(500, ge=1, description="wait at most this long to fill a batch")
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger messages are dead-lettered")
    max_message_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="producer/consumer transport limit")
    max_poll_interval_ms: int = Field(300_000, ge=10_000)
    session_timeout_ms: int = Field(10_000, ge=1000)
    heartbeat_interval_ms: int = Field(3000, ge=100)
    delivery_timeout_ms: int = Field(60_000, ge=1000, description="a batch's outputs must be acknowledged by then")
    processing_guarantee: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once",
        description="exactly-once: a transactional producer puts each batch's frames, records, dead letters and "
        "input offsets in one transaction (consumers of the outputs read with isolation_level=read_committed)",
    )
    transaction_timeout_ms: int = Field(
        90_000,
        ge=1000,
        description="exactly-once: the broker aborts a transaction left open this long (a worker killed mid-batch "
        "and not restarted under the same worker_id holds read_committed consumers back until then)",
    )
    shutdown_timeout_s: float = Field(
        20.0, gt=0, description="from SIGTERM to exit; past it the watchdog exits with 70 (a last resort)"
    )
    shutdown_delivery_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="the share of shutdown_timeout_s the batch in flight may wait for acknowledgements at SIGTERM; "
        "the rest closes the clients and leaves the group",
    )
    readiness_stall_s: float = Field(
        2.0,
        gt=0,
        description="/readyz fails when outputs wait this long for acknowledgement, a polling consumer has had no "
        "fetch response this long, or the group coordinator has not answered for a heartbeat interval plus this",
    )
    retry_backoff_s: float = Field(2.0, ge=0, description="wait before reprocessing a batch whose outputs failed")
    delivery_attempts: int = Field(
        5,
        ge=1,
        description="flushes a frame's output may fail retriably (the batch is rewound and processed again each "
        "time) before the frame is dead-lettered with reason delivery_failed; an output the broker refuses for good "
        "(e.g. larger than the topic's max.message.bytes) is dead-lettered at once (output_refused), and a dead "
        "letter that cannot be delivered keeps the batch retrying",
    )
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    aggregate_interval_s: float = Field(10.0, gt=0)
    lag_interval_s: float = Field(5.0, gt=0)
    liveness_timeout_s: float = Field(120.0, gt=0, description="/healthz fails when the loop is stuck this long")
    worker_id: str | None = Field(
        None,
        description="defaults to the host name; exactly-once: it names the transactional id, so keep it stable "
        "across restarts of one worker (a StatefulSet pod name) and unique among the group's workers",
    )

    @model_validator(mode="after")
    def _timeouts(self) -> WorkerConfig:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        if self.max_frame_bytes > self.max_message_bytes:
            raise ValueError("max_frame_bytes must not exceed max_message_bytes")
        if self.processing_guarantee == "exactly-once" and self.transaction_timeout_ms < self.delivery_timeout_ms:
            raise ValueError(
                "transaction_timeout_ms must be at least delivery_timeout_ms: a batch's transaction "
                "stays open while its outputs wait for acknowledgement"
            )
        if self.liveness_timeout_s < self.delivery_timeout_ms / 1000 + 30:
            raise ValueError(
                "liveness_timeout_s must exceed delivery_timeout_ms by 30 s: a batch may wait that long "
                "for acknowledgements before the loop turns again"
            )
        return self
