"""veilstream: anonymize camera frames without changing a downstream classifier's decision."""

__version__ = "0.1.0"
