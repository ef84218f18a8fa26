"""The codec's exception types."""

from __future__ import annotations

__all__ = ["CodecError", "NonFiniteError"]


class CodecError(ValueError):
    """Raised for any payload the decoder cannot accept: truncated, corrupted, oversized,
    wrong-version or inconsistent bytes. Decoding raises nothing else for bad input."""


class NonFiniteError(CodecError):
    """A tensor handed to the encoder holds NaN or Inf (pass ``allow_nonfinite=True`` to encode
    it anyway with the lossless codecs)."""
