"""Publish stage: the published bytes of a frame, and the sinks that take frame outcomes."""
