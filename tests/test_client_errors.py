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
