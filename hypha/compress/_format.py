"""The Hypha delta-codec wire format, version 1 (see docs/wire-format.md).

A payload is a header followed by chunks, all little-endian:

    header  = fixed(28 bytes) | tensor table | crc32(fixed | table)
    fixed   = magic "HYDC" | u16 version | u8 codec | u8 flags | u32 block_size
              | u32 chunk_elems | u32 num_tensors | u32 table_len | u32 reserved (0)
    table   = per tensor: u8 dtype | u8 ndim | ndim x u64 dims
    chunk   = u32 tensor | u32 index | u32 body_len | u32 crc32(body) | body

Chunks follow in a fixed order (tensor 0 chunk 0, 0/1, ..., 1/0, ...), each covering
``chunk_elems`` elements of one flattened tensor (the last one of a tensor may be shorter), so
the header alone determines how many chunks come and how large each decoded body is.
A quantized body is ``scales (f32 x blocks) | packed codes``; an fp32 or bf16 body is the raw
values. With the zstd flag each body is one zstd frame of that.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import torch

from hypha.compress._errors import CodecError
from hypha.ops import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

__all__ = [
    "CODECS",
    "DEFAULT_CHUNK_ELEMS",
    "DEFAULT_ZSTD_LEVEL",
    "MAGIC",
    "VERSION",
    "Codec",
    "DecodeLimits",
    "Header",
    "TensorInfo",
    "parse_codec",
]

MAGIC = b"HYDC"
VERSION = 1

FIXED = struct.Struct("<4sHBBIIIII")  # 28 bytes
CHUNK = struct.Struct("<IIII")  # 16 bytes
CRC = struct.Struct("<I")

#: codec name -> (wire id, bits per value; 0 for the unquantized codecs)
CODECS: dict[str, tuple[int, int]] = {"fp32": (0, 32), "bf16": (1, 16), "int8": (2, 8), "int4": (3, 4), "int2": (4, 2)}
_CODEC_BY_ID = {wire_id: name for name, (wire_id, _) in CODECS.items()}

FLAG_ZSTD = 1
FLAG_STOCHASTIC = 2
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_STOCHASTIC

#: dtype code on the wire <-> torch dtype of the tensors handed to encode
DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}

#: Elements per chunk: 1M elements is 4 MiB of fp32, 288 KiB at int2 with block 128.
DEFAULT_CHUNK_ELEMS = 1 << 20
#: zstd level 1: on a real pseudo-gradient (bench/results/kernels.md) level 3 shrank int2 by 0.8%
#: (1.630 vs 1.643 bits/param) and int4/int8 by <0.1%, at 0.6x the compression speed
#: (int2: 570 vs 847 MB/s in).
DEFAULT_ZSTD_LEVEL = 1


@dataclass(frozen=True)
class Codec:
    """How tensors are encoded: ``fp32``, ``bf16``, ``int8``, ``int4`` or ``int2``, optionally
    followed by a zstd stage. Parse the string form with :func:`parse_codec` (``"int2+zstd"``)."""

    name: str = "int8"
    zstd_level: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; expected one of {sorted(CODECS)}")
        if self.zstd_level is not None and not (-7 <= self.zstd_level <= 22):
            raise ValueError(f"zstd level must be in [-7, 22], got {self.zstd_level}")
        if self.quantized:
            from hypha.ops import check_quant_args

            check_quant_args(self.bits, self.block_size)
        elif self.stochastic:
            raise ValueError(f"stochastic rounding applies to int codecs, not {self.name}")

    @property
    def bits(self) -> int:
        return CODECS[self.name][1]

    @property
    def quantized(self) -> bool:
        return self.name.startswith("int")

    def __str__(self) -> str:
        return self.name + ("+zstd" if self.zstd_level is not None else "")


def parse_codec(spec: str | Codec, **overrides: object) -> Codec:
    """``"int4"``, ``"int4+zstd"`` or ``"int4+zstd:3"`` (a zstd level) -> Codec."""
    if isinstance(spec, Codec):
        return Codec(**{**spec.__dict__, **overrides}) if overrides else spec
    if not isinstance(spec, str):
        raise TypeError(f"codec must be a string such as 'int4+zstd' or a Codec, got {spec!r}")
    name, _, stage = spec.strip().lower().partition("+")
    kwargs: dict[str, object] = {"name": name}
    if stage:
        method, _, level = stage.partition(":")
        if method != "zstd":
            raise ValueError(f"unknown entropy stage {method!r} in codec {spec!r}; only 'zstd'")
        try:
            kwargs["zstd_level"] = int(level) if level else DEFAULT_ZSTD_LEVEL
        except ValueError:
            raise ValueError(f"bad zstd level {level!r} in codec {spec!r}") from None
    kwargs.update(overrides)
    return Codec(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds the decoder enforces before it trusts a header. Raise them for larger models."""

    max_tensors: int = 1 << 16
    max_ndim: int = 16
    #: total elements over all tensors (2**31 fp32 values are 8 GiB)
    max_total_elems: int = 1 << 31
    max_chunk_elems: int = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    codec: str
    zstd: bool
    stochastic: bool
    block_size: int
    chunk_elems: int
    tensors: tuple[TensorInfo, ...]
    nbytes: int = field(default=0, compare=False)  # bytes of the header on the wire

    @property
    def bits(self) -> int:
        return CODECS[self.codec][1]

    @property
    def quantized(self) -> bool:
        return self.codec.startswith("int")

    @property
    def total_elems(self) -> int:
        return sum(t.numel for t in self.tensors)

    def chunks_of(self, tensor: int) -> int:
        n = self.tensors[tensor].numel
        return (n + self.chunk_elems - 1) // self.chunk_elems

    def chunk_numel(self, tensor: int, index: int) -> int:
        n = self.tensors[tensor].numel
        return min(self.chunk_elems, n - index * self.chunk_elems)

    def body_nbytes(self, numel: int) -> int:
        """Bytes of a decoded (not zstd-compressed) chunk body of ``numel`` elements."""
        if self.quantized:
            blocks = (numel + self.block_size - 1) // self.block_size
            return 4 * blocks + (numel * self.bits + 7) // 8
        return numel * self.bits // 8

    def pack(self) -> bytes:
        table = bytearray()
        for t in self.tensors:
            table += struct.pack("<BB", DTYPE_CODES[t.dtype], len(t.shape))
            table += struct.pack(f"<{len(t.shape)}Q", *t.shape)
        flags = (FLAG_ZSTD if self.zstd else 0) | (FLAG_STOCHASTIC if self.stochastic else 0)
        fixed = FIXED.pack(
            MAGIC,
            VERSION,
            CODECS[self.codec][0],
            flags,
            self.block_size if self.quantized else 0,
            self.chunk_elems,
            len(self.tensors),
            len(table),
            0,
        )
        body = fixed + bytes(table)
        return body + CRC.pack(zlib.crc32(body))


def parse_fixed(buf: bytes | memoryview, limits: DecodeLimits) -> tuple[int, int, int, int, int, int]:
    """Validates the fixed part; returns (codec id, flags, block, chunk_elems, tensors, table_len).

    Everything is checked against ``limits`` before the caller reads (or waits for) the table.
    """
    magic, version, codec_id, flags, block, chunk_elems, ntensors, table_len, reserved = (
        FIXED.unpack(buf)
    )
    if magic != MAGIC:
        raise CodecError(f"not a Hypha codec payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported wire format version {version}; this build reads {VERSION}")
    if codec_id not in _CODEC_BY_ID:
        raise CodecError(f"unknown codec id {codec_id}")
    if flags & ~_KNOWN_FLAGS:
        raise CodecError(f"unknown flags 0x{flags:02x}")
    if reserved != 0:
        raise CodecError(f"reserved header field is {reserved}, expected 0")
    name = _CODEC_BY_ID[codec_id]
    if name.startswith("int"):
        if block < MIN_BLOCK_SIZE or block > MAX_BLOCK_SIZE or block & (block - 1):
            raise CodecError(f"invalid block size {block}")
        if chunk_elems % block:
            raise CodecError(f"chunk size {chunk_elems} is not a multiple of block size {block}")
    elif block != 0:
        raise CodecError(f"codec {name} carries no block size, got {block}")
    if flags & FLAG_STOCHASTIC and not name.startswith("int"):
        raise CodecError(f"stochastic flag set on codec {name}")
    if not 1 <= chunk_elems <= limits.max_chunk_elems:
        raise CodecError(f"chunk size {chunk_elems} outside [1, {limits.max_chunk_elems}]")
    if ntensors > limits.max_tensors:
        raise CodecError(f"{ntensors} tensors declared, limit is {limits.max_tensors}")
    if table_len > ntensors * (2 + 8 * limits.max_ndim):
        raise CodecError(f"tensor table of {table_len} bytes is too long for {ntensors} tensors")
    return codec_id, flags, block, chunk_elems, ntensors, table_len


def parse_header(
    fixed: tuple[int, int, int, int, int, int],
    raw: bytes | memoryview,
    limits: DecodeLimits,
) -> Header:
    """Parses the table and checks the crc; ``raw`` is the whole header including its crc."""
    codec_id, flags, block, chunk_elems, ntensors, table_len = fixed
    body = raw[: FIXED.size + table_len]
    (crc,) = CRC.unpack(raw[FIXED.size + table_len : FIXED.size + table_len + 4])
    if zlib.crc32(body) != crc:
        raise CodecError("header checksum mismatch: the header is corrupted")
    tensors = []
    pos = FIXED.size
    end = FIXED.size + table_len
    total = 0
    for i in range(ntensors):
        if pos + 2 > end:
            raise CodecError(f"tensor table ends inside tensor {i}")
        dtype_code, ndim = struct.unpack_from("<BB", raw, pos)
        pos += 2
        if dtype_code not in DTYPES:
            raise CodecError(f"tensor {i}: unknown dtype code {dtype_code}")
        if ndim > limits.max_ndim:
            raise CodecError(f"tensor {i}: {ndim} dimensions, limit is {limits.max_ndim}")
        if pos + 8 * ndim > end:
            raise CodecError(f"tensor table ends inside the shape of tensor {i}")
        shape = struct.unpack_from(f"<{ndim}Q", raw, pos)
        pos += 8 * ndim
        numel = span = 1
        for d in shape:
            numel = min(numel * d, limits.max_total_elems + 1)  # stays small whatever d is
            span = min(span * max(d, 1), limits.max_total_elems + 1)  # the same, 0s skipped
        total += numel
        if total > limits.max_total_elems:
            raise CodecError(
                f"tensor {i}: payload declares more than {limits.max_total_elems} elements "
                "(limit); raise DecodeLimits.max_total_elems to accept larger models"
            )
        if span > limits.max_total_elems:
            # NOTE: found by bench/fuzz.py: (4, 2**63, 0) is empty, but torch cannot hold the
            # shape (its dimensions overflow int64)
            raise CodecError(
                f"tensor {i}: shape {tuple(shape)} is empty but its other dimensions hold more "
                f"than {limits.max_total_elems} elements (limit)"
            )
        tensors.append(TensorInfo(DTYPES[dtype_code], tuple(shape)))
    if pos != end:
        raise CodecError(f"tensor table has {end - pos} trailing bytes")
    return Header(
        codec=_CODEC_BY_ID[codec_id],
        zstd=bool(flags & FLAG_ZSTD),
        stochastic=bool(flags & FLAG_STOCHASTIC),
        block_size=block if block else 0,
        chunk_elems=chunk_elems,
        tensors=tuple(tensors),
        nbytes=FIXED.size + table_len + 4,
    )
