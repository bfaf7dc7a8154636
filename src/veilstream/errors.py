"""Exceptions raised by veilstream.

VeilstreamError
├── ConfigError          invalid configuration (unknown key, bad value, missing file)
├── ModelLoadError       a weights or model file is missing, corrupt or unusable
├── FrameError           one input frame cannot be processed; carries a machine-readable reason
│   ├── DecodeError      bytes are not a decodable image (empty, truncated, unknown format)
│   └── FrameRejected    decodable but refused (too small, too large, decompression bomb)
└── StageError           a pipeline stage (detection, correction, encoding) failed on a frame
"""

from __future__ import annotations


class VeilstreamError(Exception):
    """Base of every error veilstream raises on purpose."""


class ConfigError(VeilstreamError):
    """The configuration is invalid."""


class ModelLoadError(VeilstreamError):
    """A model could not be loaded; the message names the file."""


class FrameError(VeilstreamError):
    """A single frame cannot be processed.

    `reason` is a short stable code (for dead-letter records and metrics labels).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(FrameError):
    """The bytes do not decode to an image."""


class FrameRejected(FrameError):
    """The image decodes (or declares itself) but is outside accepted limits."""


class StageError(FrameError):
    """A pipeline stage failed on this frame."""
