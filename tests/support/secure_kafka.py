"""Apache Kafka with a SASL_SSL listener (SCRAM-SHA-512), and the CA and broker certificate it serves.

:class:`SecureKafkaBroker` is :class:`~tests.support.brokers.ApacheKafkaBroker` with three listeners:

* ``SASL_SSL://127.0.0.1:SECURE_PORT`` -- what the code under test uses (:attr:`SecureKafkaBroker.secure_bootstrap`):
  TLS with a PEM key and certificate chain issued by a CA made in the test (:func:`make_ca`), and SCRAM-SHA-512
  users created after the start through the AlterUserScramCredentials API (what ``kafka-configs --alter
  --add-config SCRAM-SHA-512=[password=...]`` sends);
* ``INTERNAL://127.0.0.1:PORT`` (PLAINTEXT) -- the broker's own inter-broker listener and the test's door for
  setup: readiness, topics, SCRAM users, reading outputs (:attr:`~tests.support.brokers.Broker.bootstrap`);
* ``CONTROLLER`` as in the base class.

No authorizer is configured: any authenticated user may do anything, which is what the worker needs.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kafka.admin import UserScramCredentialUpsertion

from tests.support.brokers import ApacheKafkaBroker, BrokerStartError, free_port

__all__ = ["SCRAM_MECHANISM", "CertificateAuthority", "SecureKafkaBroker", "kafka_section", "make_ca"]

SCRAM_MECHANISM = "SCRAM-SHA-512"
_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA: its certificate (``cert_path``, PEM: what clients pass as ``ssl_cafile``) and its signing key."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path

    def issue_server_pem(self, folder: Path, host: str = "127.0.0.1") -> Path:
        """A server key and certificate for ``host`` (IP and DNS ``localhost`` alternative names), written as one
        PEM file -- unencrypted PKCS#8 key, then the chain (leaf, CA) -- as Kafka's ``ssl.keystore.type=PEM``
        reads it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} kafka broker")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pem += cert.public_bytes(serialization.Encoding.PEM) + self.cert.public_bytes(serialization.Encoding.PEM)
        path = folder / "broker.pem"
        path.write_bytes(pem)
        path.chmod(0o600)
        return path


def make_ca(folder: Path, name: str) -> CertificateAuthority:
    """A self-signed CA named ``name``; its certificate goes to ``folder/<name>-ca.pem``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(name, cert, key, path)


class SecureKafkaBroker(ApacheKafkaBroker):
    """Single-node Apache Kafka whose client listener is SASL_SSL with SCRAM-SHA-512 (see the module docstring).

    ``users`` maps SCRAM user names to passwords; they are (re)created after every start.
    """

    def __init__(self, ca: CertificateAuthority, users: Mapping[str, str], **options: Any) -> None:
        super().__init__(**options)
        self.secure_port = self._other_free_port()
        self.keystore = ca.issue_server_pem(self.workdir)
        self.users = dict(users)

    @property
    def secure_bootstrap(self) -> str:
        """``127.0.0.1:SECURE_PORT``: the SASL_SSL listener."""
        return f"{self.host}:{self.secure_port}"

    def _other_free_port(self) -> int:
        port = free_port()
        while port in (self.port, self.controller_port):
            port = free_port()
        return port

    def _pick_new_ports(self) -> None:
        super()._pick_new_ports()
        self.secure_port = self._other_free_port()

    def server_properties(self) -> dict[str, str]:
        props = super().server_properties()
        host, internal, secure, controller = self.host, self.port, self.secure_port, self.controller_port
        props |= {
            "listeners": f"INTERNAL://{host}:{internal},SASL_SSL://{host}:{secure},CONTROLLER://{host}:{controller}",
            "advertised.listeners": f"INTERNAL://{host}:{internal},SASL_SSL://{host}:{secure}",
            "listener.security.protocol.map": "INTERNAL:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "INTERNAL",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
            "listener.name.sasl_ssl.ssl.keystore.location": str(self.keystore),
        }
        props.update(self.extra_config)
        return props

    def start(self) -> Self:
        super().start()
        self._create_users()
        return self

    def _create_users(self) -> None:
        admin = self.admin()
        try:
            errors = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(user, SCRAM_MECHANISM, password) for user, password in self.users.items()]
            )
        finally:
            admin.close()
        failed = {user: error for user, error in errors.items() if error}
        if failed:
            raise BrokerStartError(f"creating SCRAM users failed: {failed}")


def kafka_section(broker: SecureKafkaBroker, username: str, cafile: Path) -> dict[str, str]:
    """The configuration's ``kafka`` section for ``broker``'s SASL_SSL listener (the password comes from the
    environment: ``VEILSTREAM__KAFKA__SASL_PASSWORD``)."""
    return {
        "bootstrap_servers": broker.secure_bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": SCRAM_MECHANISM,
        "sasl_username": username,
        "ssl_cafile": str(cafile),
    }
