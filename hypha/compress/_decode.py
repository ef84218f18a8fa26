"""Decoding the wire format, incrementally and defensively.

The bytes come from the network and may be hostile. :class:`StreamDecoder` is a push parser: it
is fed bytes as they arrive and hands back each chunk once its checksum and structure are
verified. It buffers at most one chunk, checks every declared size against :class:`DecodeLimits`
before waiting for or allocating anything, and raises :class:`CodecError` (and nothing else) for
malformed input. After an error the decoder refuses further input.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from hypha import ops
from hypha.compress._errors import CodecError
from hypha.compress._format import (
    CHUNK,
    FIXED,
    DecodeLimits,
    Header,
    parse_fixed,
    parse_header,
)

__all__ = [
    "Chunk",
    "StreamDecoder",
    "bits_per_param",
    "decode",
    "decode_accumulate",
    "iter_chunks",
    "read_header",
]

_DEFAULT_LIMITS = DecodeLimits()


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Chunk:
    """One verified chunk: elements ``start .. start+numel`` of flattened tensor ``tensor``."""

    tensor: int
    index: int
    start: int
    numel: int
    q: ops.QTensor | None  # quantized codecs
    raw: torch.Tensor | None  # fp32 / bf16 codecs: the values as sent

    def values(self) -> torch.Tensor:
        """The decoded values as a flat float32 tensor."""
        if self.q is not None:
            return ops.dequantize(self.q)
        assert self.raw is not None
        return self.raw.to(torch.float32)

    def accumulate_into(self, acc: torch.Tensor) -> None:
        """acc[start:start+numel] += values, for ``acc`` the flat float32 accumulator of the
        whole tensor (what the aggregator runs on each chunk as it arrives)."""
        piece = acc.view(-1)[self.start : self.start + self.numel]
        if self.q is not None:
            ops.dequantize_accumulate_(piece, self.q)
        else:
            assert self.raw is not None
            piece.add_(self.raw)


def _copy_bytes(mv: memoryview, device: torch.device) -> torch.Tensor:
    out = torch.empty(len(mv), dtype=torch.uint8)
    if len(mv):
        out.numpy()[:] = np.frombuffer(mv, dtype=np.uint8)
    return out.to(device) if device.type != "cpu" else out


def _zstd_bound(n: int) -> int:
    # zstd's ZSTD_COMPRESSBOUND(n) is n + n/256 + a small constant; an honest frame never exceeds it
    return n + (n >> 7) + 1024


class StreamDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the chunks completed by those bytes.

    >>> dec = StreamDecoder()
    >>> for piece in pieces:                       # doctest: +SKIP
    ...     for chunk in dec.feed(piece):
    ...         chunk.accumulate_into(accumulators[chunk.tensor])
    >>> dec.finish()                               # raises if the payload was truncated
    """

    def __init__(
        self,
        limits: DecodeLimits | None = None,
        *,
        device: torch.device | str = "cpu",
        allow_nonfinite: bool = False,
    ) -> None:
        self.limits = limits or _DEFAULT_LIMITS
        self.device = torch.device(device)
        self.allow_nonfinite = allow_nonfinite
        self.header: Header | None = None
        self.bytes_read = 0
        self._buf = bytearray()
        self._need = FIXED.size
        self._state = "fixed"
        self._fixed: tuple[int, int, int, int, int, int] | None = None
        self._head = b""
        self._tensor = 0  # next expected chunk
        self._index = 0
        self._body_len = 0
        self._body_crc = 0
        self._failed: CodecError | None = None
        self._zstd: Any = None  # zstandard.ZstdDecompressor, imported only when used

    @property
    def done(self) -> bool:
        """True once the header and every chunk it announces have been read."""
        return self._state == "done"

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        if self._failed is not None:
            raise CodecError(f"decoder already failed: {self._failed}")
        try:
            return self._feed(memoryview(data).cast("B"))
        except CodecError as exc:
            self._failed = exc
            raise
        except (ValueError, OverflowError, zlib.error) as exc:  # defensive: never leak others
            self._failed = CodecError(f"malformed payload: {exc}")
            raise self._failed from exc

    def finish(self) -> Header:
        """Checks that the payload was complete; returns its header."""
        if self._failed is not None:
            raise CodecError(f"decoder failed: {self._failed}")
        if self._state != "done":
            got = self.bytes_read
            if self.header is None:
                raise CodecError(f"truncated payload: {got} bytes, the header is incomplete")
            raise CodecError(
                f"truncated payload: {got} bytes read, stopped in chunk {self._index} of tensor "
                f"{self._tensor} of {len(self.header.tensors)}"
            )
        assert self.header is not None
        return self.header

    # --- parsing ------------------------------------------------------------------------------

    def _feed(self, mv: memoryview) -> list[Chunk]:
        out: list[Chunk] = []
        if self._state == "done":
            if len(mv):
                raise CodecError(f"{len(mv)} bytes of trailing data after the payload")
            return out
        if self._buf:
            take = min(self._need - len(self._buf), len(mv))
            self._buf += mv[:take]
            mv = mv[take:]
            self.bytes_read += take
            if len(self._buf) < self._need:
                return out
            item = memoryview(bytes(self._buf))
            self._buf = bytearray()
            self._step(item, out)
        while self._state != "done" and len(mv) >= self._need:
            n = self._need
            self.bytes_read += n
            self._step(mv[:n], out)
            mv = mv[n:]
        if self._state == "done" and len(mv):
            raise CodecError(f"{len(mv)} bytes of trailing data after the payload")
        if len(mv):
            self._buf += mv
            self.bytes_read += len(mv)
        return out

    def _step(self, item: memoryview, out: list[Chunk]) -> None:
        if self._state == "fixed":
            self._fixed = parse_fixed(item, self.limits)
            self._head = bytes(item)
            self._state, self._need = "table", self._fixed[5] + 4
        elif self._state == "table":
            assert self._fixed is not None
            self.header = parse_header(self._fixed, self._head + bytes(item), self.limits)
            if self.header.zstd:
                import zstandard

                self._zstd = zstandard.ZstdDecompressor()
            self._on_header(self.header)
            self._advance_to_next_chunk()
        elif self._state == "chunk":
            self._chunk_head(item)
        else:
            out.append(self._chunk_body(item))
            self._index += 1
            self._advance_to_next_chunk()

    def _on_header(self, header: Header) -> None:
        """Hook for subclasses that check the header against what they expect."""

    def _advance_to_next_chunk(self) -> None:
        header = self.header
        assert header is not None
        while self._tensor < len(header.tensors) and self._index >= header.chunks_of(self._tensor):
            self._tensor += 1
            self._index = 0
        if self._tensor >= len(header.tensors):
            self._state, self._need = "done", 0
        else:
            self._state, self._need = "chunk", CHUNK.size

    def _chunk_head(self, item: memoryview) -> None:
        header = self.header
        assert header is not None
        tensor, index, body_len, crc = CHUNK.unpack(item)
        if (tensor, index) != (self._tensor, self._index):
            raise CodecError(
                f"expected chunk {self._index} of tensor {self._tensor}, got chunk {index} of "
                f"tensor {tensor} (chunks out of order, duplicated or missing)"
            )
        expected = header.body_nbytes(header.chunk_numel(tensor, index))
        if header.zstd:
            if not 0 < body_len <= _zstd_bound(expected):
                raise CodecError(
                    f"chunk {index} of tensor {tensor}: compressed body of {body_len} bytes for "
                    f"{expected} decoded bytes"
                )
        elif body_len != expected:
            raise CodecError(
                f"chunk {index} of tensor {tensor}: body of {body_len} bytes, expected {expected}"
            )
        self._body_len, self._body_crc = body_len, crc
        self._state, self._need = "body", body_len

    def _chunk_body(self, body: memoryview) -> Chunk:
        header = self.header
        assert header is not None
        tensor, index = self._tensor, self._index
        where = f"chunk {index} of tensor {tensor}"
        if zlib.crc32(body) != self._body_crc:
            raise CodecError(f"{where}: checksum mismatch, the chunk is corrupted")
        numel = header.chunk_numel(tensor, index)
        expected = header.body_nbytes(numel)
        if self._zstd is not None:
            body = self._decompress(body, expected, where)
        start = index * header.chunk_elems
        if header.quantized:
            blocks = (numel + header.block_size - 1) // header.block_size
            scales_u8 = _copy_bytes(body[: 4 * blocks], torch.device("cpu"))
            scales = scales_u8.view(torch.float32)
            if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
                raise CodecError(f"{where}: block scales must be finite and non-negative")
            codes = _copy_bytes(body[4 * blocks :], self.device)
            spare = (-numel * header.bits) % 8
            if spare and int(body[len(body) - 1]) >> (8 - spare):
                raise CodecError(f"{where}: padding bits of the last byte are not zero")
            q = ops.QTensor(codes, scales.to(self.device), numel, header.bits, header.block_size)
            return Chunk(tensor, index, start, numel, q, None)
        raw_u8 = _copy_bytes(body, self.device)
        raw = raw_u8.view(torch.float32 if header.codec == "fp32" else torch.bfloat16)
        if not self.allow_nonfinite and not bool(torch.isfinite(raw).all()):
            raise CodecError(f"{where}: holds NaN/Inf values")
        return Chunk(tensor, index, start, numel, None, raw)

    def _decompress(self, body: memoryview, expected: int, where: str) -> memoryview:
        import zstandard

        assert self._zstd is not None
        try:
            declared = zstandard.frame_content_size(body)
        except zstandard.ZstdError as exc:
            raise CodecError(f"{where}: not a zstd frame ({exc})") from None
        if declared not in (-1, expected):
            raise CodecError(f"{where}: zstd frame declares {declared} bytes, expected {expected}")
        try:
            raw = self._zstd.decompress(body, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise CodecError(f"{where}: zstd decompression failed ({exc})") from None
        if len(raw) != expected:
            raise CodecError(f"{where}: decompressed to {len(raw)} bytes, expected {expected}")
        return memoryview(raw)


def _pieces(source: bytes | bytearray | memoryview | Iterable[bytes] | _Readable) -> Iterator[bytes | memoryview]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield memoryview(source)
    elif hasattr(source, "read"):
        while piece := source.read(1 << 20):
            yield piece
    else:
        yield from source


def iter_chunks(
    source: bytes | bytearray | memoryview | Iterable[bytes] | _Readable,
    decoder: StreamDecoder | None = None,
) -> Iterator[Chunk]:
    """Yields verified chunks from a whole payload, an iterable of byte pieces, or a binary
    file-like object, holding at most one chunk in memory; raises CodecError when the payload is
    malformed or truncated."""
    decoder = decoder or StreamDecoder()
    for piece in _pieces(source):
        yield from decoder.feed(piece)
    decoder.finish()


def decode(
    data: bytes | bytearray | memoryview | Iterable[bytes] | _Readable,
    *,
    limits: DecodeLimits | None = None,
    device: torch.device | str = "cpu",
    allow_nonfinite: bool = False,
) -> list[torch.Tensor]:
    """Decodes a payload into its tensors (original shapes and dtypes) on ``device``.

    Each output tensor is allocated when its first verified chunk arrives, not when the header
    claims it; bad input raises :class:`CodecError`.
    """
    decoder = StreamDecoder(limits, device=device, allow_nonfinite=allow_nonfinite)
    outs: dict[int, torch.Tensor] = {}
    for chunk in iter_chunks(data, decoder):
        header = decoder.header
        assert header is not None
        info = header.tensors[chunk.tensor]
        out = outs.get(chunk.tensor)
        if out is None:
            out = outs[chunk.tensor] = torch.empty(info.numel, dtype=info.dtype, device=decoder.device)
        piece = out[chunk.start : chunk.start + chunk.numel]
        if chunk.q is not None and info.dtype == torch.float32:
            ops.dequantize(chunk.q, out=piece)
        else:
            piece.copy_(chunk.values() if chunk.q is not None else chunk.raw)  # type: ignore[arg-type]
    header = decoder.finish()
    return [
        outs.get(i, torch.empty(0, dtype=t.dtype, device=decoder.device)).view(t.shape)
        for i, t in enumerate(header.tensors)
    ]


class _AccumulatingDecoder(StreamDecoder):
    def __init__(self, accumulators: Sequence[torch.Tensor], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.accumulators = list(accumulators)

    def _on_header(self, header: Header) -> None:
        if len(header.tensors) != len(self.accumulators):
            raise CodecError(
                f"payload carries {len(header.tensors)} tensors, expected {len(self.accumulators)}"
            )
        for i, (info, acc) in enumerate(zip(header.tensors, self.accumulators, strict=True)):
            if info.numel != acc.numel():
                raise CodecError(
                    f"tensor {i} has shape {info.shape} in the payload, the accumulator has "
                    f"{tuple(acc.shape)}"
                )


def decode_accumulate(
    data: bytes | bytearray | memoryview | Iterable[bytes] | _Readable,
    accumulators: Sequence[torch.Tensor],
    *,
    limits: DecodeLimits | None = None,
) -> Header:
    """Adds every decoded tensor into the matching float32 accumulator, chunk by chunk as bytes
    arrive; nothing but the current chunk is buffered.

    The payload is checked against the accumulators' sizes as soon as its header is read. On a
    CodecError, the chunks before the bad one have already been added: aggregate into a scratch
    accumulator when a partial contribution must be discarded.
    """
    for i, acc in enumerate(accumulators):
        if acc.dtype != torch.float32 or not acc.is_contiguous():
            raise ValueError(f"accumulators[{i}] must be a contiguous float32 tensor")
    devices = {acc.device for acc in accumulators}
    if len(devices) > 1:
        raise ValueError(f"accumulators are on several devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    decoder = _AccumulatingDecoder(accumulators, limits=limits, device=device)
    for chunk in iter_chunks(data, decoder):
        chunk.accumulate_into(accumulators[chunk.tensor])
    return decoder.finish()


def read_header(data: bytes | bytearray | memoryview, limits: DecodeLimits | None = None) -> Header:
    """Parses and verifies just the header at the start of ``data``."""
    mv = memoryview(data).cast("B")
    limits = limits or _DEFAULT_LIMITS
    if len(mv) < FIXED.size:
        raise CodecError(f"truncated payload: {len(mv)} bytes, the header needs at least {FIXED.size}")
    fixed = parse_fixed(mv[: FIXED.size], limits)
    end = FIXED.size + fixed[5] + 4
    if len(mv) < end:
        raise CodecError(f"truncated payload: {len(mv)} bytes, the header needs {end}")
    return parse_header(fixed, mv[:end], limits)


def bits_per_param(payload: bytes | bytearray | memoryview) -> float:
    """Bits on the wire per encoded element, header and framing included."""
    header = read_header(payload, DecodeLimits(max_total_elems=1 << 62, max_chunk_elems=1 << 24))
    return 8 * len(payload) / max(header.total_elems, 1)
