"""Decode stage: bytes and files into frames, refusing junk with typed errors."""
