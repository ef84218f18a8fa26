"""The delta codec: tensors <-> compact, self-describing, chunked bytes.

>>> payload = encode([grad_a, grad_b], "int4+zstd")          # doctest: +SKIP
>>> a, b = decode(payload)                                   # doctest: +SKIP

The wire format is documented in docs/wire-format.md. Decoding treats its input as hostile: any
malformed payload raises :class:`CodecError`, sizes are bounded by :class:`DecodeLimits`, and
chunks can be decoded (or accumulated) one at a time as bytes arrive with :class:`StreamDecoder`.
"""

from hypha.compress._decode import (
    Chunk,
    StreamDecoder,
    bits_per_param,
    decode,
    decode_accumulate,
    iter_chunks,
    read_header,
)
from hypha.compress._encode import DeltaWriter, encode, encode_delta, iter_encode, iter_encode_delta
from hypha.compress._errors import CodecError, NonFiniteError
from hypha.compress._format import (
    CODECS,
    DEFAULT_CHUNK_ELEMS,
    DEFAULT_ZSTD_LEVEL,
    VERSION,
    Codec,
    DecodeLimits,
    Header,
    TensorInfo,
    parse_codec,
)

__all__ = [
    "CODECS",
    "DEFAULT_CHUNK_ELEMS",
    "DEFAULT_ZSTD_LEVEL",
    "VERSION",
    "Chunk",
    "Codec",
    "CodecError",
    "DecodeLimits",
    "DeltaWriter",
    "Header",
    "NonFiniteError",
    "StreamDecoder",
    "TensorInfo",
    "bits_per_param",
    "decode",
    "decode_accumulate",
    "encode",
    "encode_delta",
    "iter_chunks",
    "iter_encode",
    "iter_encode_delta",
    "parse_codec",
    "read_header",
]
