"""Test and dev tooling that is not part of the installed package (real Kafka-protocol brokers)."""
