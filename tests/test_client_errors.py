"""Naming why a Kafka client cannot connect, from kafka-python's own log lines."""

from __future__ import annotations

import logging

from kafka.errors import KafkaTimeoutError

from veilstream.client_errors import LastClientProblem, describe_connect_failure, watch_client_problems


def test_a_specific_cause_outlives_the_generic_lines_after_it() -> None:
    recorder = LastClientProblem()
    logger = logging.getLogger("kafka.test_client_errors")
    logger.addHandler(recorder)
    try:
        logger.warning("Authentication failed: SaslAuthenticationFailedError: invalid credentials")
        logger.warning("socket disconnected")
        logger.warning("Bootstrap failed: KafkaTimeoutError: Unable to bootstrap")
        assert recorder.last is not None and "invalid credentials" in recorder.last
    finally:
        logger.removeHandler(recorder)
    generic = LastClientProblem()
    generic.emit(logging.makeLogRecord({"msg": "socket disconnected", "levelno": logging.WARNING}))
    assert generic.last == "socket disconnected"


def test_the_connect_failure_names_the_clients_cause() -> None:
    recorder = watch_client_problems()
    logging.getLogger("kafka.conn").error("SSL: CERTIFICATE_VERIFY_FAILED certificate verify failed")
    text = describe_connect_failure(KafkaTimeoutError("Unable to bootstrap"))
    assert "Unable to bootstrap" in text
    assert "certificate verify failed" in text
    assert recorder.last is not None


def test_a_transport_name_is_not_a_cause() -> None:
    recorder = LastClientProblem()
    recorder.emit(logging.makeLogRecord({"msg": "SaslAuthenticationFailedError: invalid credentials", "levelno": 30}))
    recorder.emit(logging.makeLogRecord({"msg": "<KafkaSSLTransport [x]>: Abort (socket disconnected)", "levelno": 30}))
    assert recorder.last is not None and "invalid credentials" in recorder.last


def test_a_connection_closed_during_sasl_is_named_as_a_likely_failed_login() -> None:
    closed = "Bootstrap connection to bootstrap-0 failed: KafkaConnectionError: socket disconnected (backoff 0.05 secs)"
    for sasl, named in ((True, True), (False, False)):
        recorder = LastClientProblem()
        recorder.sasl = sasl
        recorder.emit(logging.makeLogRecord({"msg": closed, "levelno": logging.WARNING}))
        recorder.emit(logging.makeLogRecord({"msg": "Bootstrap failed: KafkaTimeoutError", "levelno": logging.ERROR}))
        assert recorder.last is not None
        assert ("SASL authentication" in recorder.last and "socket disconnected" in recorder.last) is named
        assert ("Bootstrap failed" in recorder.last) is not named


def test_the_security_protocol_decides_whether_logins_are_suspected() -> None:
    recorder = watch_client_problems("SASL_SSL")
    assert recorder.sasl
    assert not watch_client_problems("SSL").sasl
    assert not watch_client_problems().sasl  # unchanged when not told
