"""The tensor-stream protocol: codec chunks from one peer to another, consumed as they arrive.

``/hypha/tensor-stream/1``, one libp2p stream per transfer (all integers big-endian)::

    sender:    u32 n | header (JSON object, n <= 64 KiB: {"name": str, "meta": {...}})
               u32 n | chunk          repeated, 1 <= n <= max_chunk
               u32 0 | u32 crc32      end of stream: CRC-32 of every chunk byte, in order
    receiver:  u8 status | u16 n | reason (UTF-8)     status 0: received and verified

Backpressure comes from the muxer's flow-control window: the receiver reads a chunk only when its
consumer asks for the next one, so a slow consumer stalls the sender instead of filling memory.
The CRC-32 (6 GB/s here, against 1.8 GB/s for SHA-256) catches framing bugs end to end; the TLS
record MACs already protect the bytes from tampering, and codec chunks carry their own checksums.
The sender's ``close()`` returns only once the receiver has verified the stream, so a finished
send means delivered.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from types import TracebackType
from typing import Any, NoReturn

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ._wire import FrameReader, StreamClosedError, close_quietly, reset_quietly, u32, write_all

__all__ = [
    "PROTOCOL_ID",
    "IncomingTensorStream",
    "OutgoingTensorStream",
    "TensorStreamError",
]

logger = logging.getLogger("hypha.net.tensor_stream")

PROTOCOL_ID = TProtocol("/hypha/tensor-stream/1")
#: Largest chunk a receiver accepts by default (the codec writes chunks of a few MiB).
MAX_CHUNK = 64 << 20
#: Largest header.
MAX_HEADER = 64 << 10
#: Seconds a receiver waits for the header once the stream is open.
HEADER_TIMEOUT = 30.0

_OK = 0
_FAILED = 1
_STATUS = struct.Struct(">BH")


class TensorStreamError(ConnectionError):
    """A transfer failed: malformed framing, a checksum mismatch, a refusal or a broken stream."""


class OutgoingTensorStream:
    """The sending end. ``send`` chunks, then ``close`` (or leave the ``async with``)."""

    def __init__(self, stream: INetStream, peer: ID, name: str) -> None:
        self._stream = stream
        self.peer = peer
        self.name = name
        self._crc = 0
        self.bytes_sent = 0
        self._done = False

    async def start(self, meta: dict[str, Any]) -> None:
        header = json.dumps({"name": self.name, "meta": meta}, separators=(",", ":")).encode()
        if len(header) > MAX_HEADER:
            raise ValueError(f"tensor-stream header of {len(header)} bytes exceeds {MAX_HEADER}")
        await self._write(u32(len(header)) + header)

    async def send(self, chunk: bytes | bytearray | memoryview) -> None:
        """Queue one chunk; waits while the receiver's window is full (backpressure)."""
        if self._done:
            raise TensorStreamError(f"tensor stream {self.name!r} to {self.peer} is closed")
        view = memoryview(chunk).cast("B")
        if not 0 < len(view) <= MAX_CHUNK:
            raise ValueError(f"chunk of {len(view)} bytes: chunks must hold 1 .. {MAX_CHUNK} "
                             "bytes")
        self._crc = zlib.crc32(view, self._crc)
        await self._write(u32(len(view)))
        await self._write(view)
        self.bytes_sent += len(view)

    async def close(self) -> None:
        """End the stream and wait until the receiver has verified every byte."""
        if self._done:
            return
        self._done = True
        try:
            await self._write(u32(0) + u32(self._crc))
            reader = FrameReader(self._stream)
            status, length = _STATUS.unpack(await reader.read_exactly(_STATUS.size, what="ack"))
            reason = (await reader.read_exactly(length, what="ack")).decode(errors="replace")
        except StreamClosedError as exc:
            await reset_quietly(self._stream)
            raise TensorStreamError(f"tensor stream {self.name!r} to {self.peer}: the receiver "
                                    f"did not confirm ({exc})") from exc
        finally:
            await close_quietly(self._stream)
        if status != _OK:
            raise TensorStreamError(f"tensor stream {self.name!r} to {self.peer} was refused: "
                                    f"{reason}")

    async def abort(self) -> None:
        self._done = True
        await reset_quietly(self._stream)

    async def _write(self, data: bytes | memoryview) -> None:
        try:
            await write_all(self._stream, data)
        except StreamClosedError as exc:
            self._done = True
            raise TensorStreamError(f"tensor stream {self.name!r} to {self.peer} broke: {exc}"
                                    ) from exc

    async def __aenter__(self) -> OutgoingTensorStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()


class IncomingTensorStream:
    """The receiving end: ``async for chunk in incoming`` yields chunks as they arrive.

    The iteration ends after the end-of-stream checksum has been verified and acknowledged; a
    malformed or corrupt stream raises :class:`TensorStreamError` (and the sender's ``close``
    fails with the reason). Leaving the loop early resets the stream.

    A receiver that judges the content only once it has all of it (a parameter server checking
    that a payload is complete) sets ``hold_ack = True`` before reading: the end is then not
    acknowledged until it calls :meth:`accept` or :meth:`refuse` (:meth:`aclose` accepts a
    stream read to its end that neither judged).
    """

    def __init__(self, stream: INetStream, peer: ID, *, max_chunk: int = MAX_CHUNK,
                 max_bytes: int | None = None) -> None:
        self._stream = stream
        self._reader = FrameReader(stream)
        self.peer = peer
        self.name = ""
        self.meta: dict[str, Any] = {}
        self.max_chunk = max_chunk
        self.max_bytes = max_bytes
        self.bytes_received = 0
        self._crc = 0
        self._finished = False
        self.hold_ack = False
        self._held = False  # read to its verified end, not acknowledged yet

    async def read_header(self) -> None:
        with trio.fail_after(HEADER_TIMEOUT):
            length = await self._reader.read_u32(what="header length")
            if not 0 < length <= MAX_HEADER:
                await self._fail(f"header of {length} bytes (limit {MAX_HEADER})")
            raw = await self._reader.read_exactly(length, what="header")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            await self._fail(f"header is not JSON ({exc})")
        if (not isinstance(header, dict) or not isinstance(header.get("name"), str)
                or not isinstance(header.get("meta", {}), dict)):
            await self._fail("header must be an object with a string 'name' and an object "
                             "'meta'")
        self.name = header["name"]
        self.meta = header.get("meta", {})

    def __aiter__(self) -> IncomingTensorStream:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        try:
            length = await self._reader.read_u32(what="chunk length")
            if length == 0:
                expected = await self._reader.read_u32(what="checksum")
                if expected != self._crc:
                    await self._fail(f"checksum mismatch: the sender's CRC-32 is "
                                     f"{expected:08x}, the bytes received give {self._crc:08x}")
                self._finished = True
                if self.hold_ack:
                    self._held = True
                else:
                    await self._ack(_OK, "")
                raise StopAsyncIteration
            if length > self.max_chunk:
                await self._fail(f"chunk of {length} bytes exceeds the {self.max_chunk}-byte "
                                 "limit")
            if self.max_bytes is not None and self.bytes_received + length > self.max_bytes:
                await self._fail(f"stream exceeds the {self.max_bytes}-byte limit")
            chunk = await self._reader.read_exactly(length, what="chunk")
        except StreamClosedError as exc:
            self._finished = True
            await reset_quietly(self._stream)
            raise TensorStreamError(f"tensor stream {self.name!r} from {self.peer} broke after "
                                    f"{self.bytes_received} bytes: {exc}") from exc
        except BaseException:
            if not self._finished:
                self._finished = True
                await reset_quietly(self._stream)
            raise
        self._crc = zlib.crc32(chunk, self._crc)
        self.bytes_received += length
        return chunk

    @property
    def finished(self) -> bool:
        return self._finished

    async def aclose(self) -> None:
        """Reset the stream unless it was read to its verified end (the sender's close fails)."""
        if self._held:
            await self.accept()
        if not self._finished:
            self._finished = True
            await reset_quietly(self._stream)

    async def refuse(self, reason: str) -> None:
        """Tell the sender the stream is not wanted (its ``close`` raises with the reason)."""
        self._finished = True
        self._held = False
        await self._ack(_FAILED, reason)

    async def accept(self) -> None:
        """Acknowledge a stream read to its end with ``hold_ack`` set (the sender's ``close``
        returns); nothing otherwise."""
        if self._held:
            self._held = False
            await self._ack(_OK, "")

    async def _fail(self, reason: str) -> NoReturn:
        logger.warning("tensor stream %r from %s rejected: %s", self.name, self.peer, reason)
        self._finished = True
        await self._ack(_FAILED, reason)
        raise TensorStreamError(f"tensor stream {self.name!r} from {self.peer}: {reason}")

    async def _ack(self, status: int, reason: str) -> None:
        body = reason.encode()[:1024]
        try:
            await write_all(self._stream, _STATUS.pack(status, len(body)) + body)
        except StreamClosedError:
            await reset_quietly(self._stream)
            return
        await close_quietly(self._stream)

