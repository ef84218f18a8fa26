"""Reading frames off a py-libp2p stream: exact reads over a buffer, clean EOF and reset errors."""

from __future__ import annotations

import struct

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset

__all__ = [
    "FrameReader",
    "StreamClosedError",
    "close_quietly",
    "read_up_to",
    "reset_quietly",
    "u32",
    "write_all",
]

_U32 = struct.Struct(">I")

#: Bytes asked of the muxer per read when the caller wants less (saves a call per small frame).
READ_SIZE = 256 * 1024


class StreamClosedError(ConnectionError):
    """The remote end closed or reset the stream before a whole frame arrived."""


async def read_up_to(stream: INetStream, n: int) -> bytes:
    """Up to ``n`` bytes; ``b""`` at end of stream. Resets and errors raise StreamClosedError."""
    try:
        return await stream.read(n)
    except StreamEOF:
        return b""
    except (StreamReset, StreamClosed, StreamError) as exc:
        raise StreamClosedError(f"stream broke: {exc or type(exc).__name__}") from exc


async def write_all(stream: INetStream, data: bytes | bytearray | memoryview) -> None:
    try:
        await stream.write(data)  # type: ignore[arg-type]
    except (StreamReset, StreamClosed, StreamError) as exc:
        raise StreamClosedError(f"stream broke: {exc or type(exc).__name__}") from exc


class FrameReader:
    """Exact reads from a stream, buffering what a larger read brought in."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def read_exactly(self, n: int, *, what: str = "frame") -> bytes:
        if n <= len(self._buf):
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
        parts = [bytes(self._buf)]
        have = len(self._buf)
        self._buf.clear()
        while have < n:
            data = await read_up_to(self.stream, max(n - have, READ_SIZE))
            if not data:
                raise StreamClosedError(
                    f"stream ended {have} bytes into a {n}-byte {what}"
                )
            parts.append(data)
            have += len(data)
        joined = b"".join(parts)
        if have > n:
            self._buf += joined[n:]
            return joined[:n]
        return joined

    async def read_u32(self, *, what: str = "length") -> int:
        return _U32.unpack(await self.read_exactly(4, what=what))[0]

    async def at_eof(self) -> bool:
        """Whether the stream ended cleanly with no buffered bytes left."""
        if self._buf:
            return False
        data = await read_up_to(self.stream, READ_SIZE)
        if not data:
            return True
        self._buf += data
        return False


def u32(n: int) -> bytes:
    return _U32.pack(n)


async def close_quietly(stream: INetStream) -> None:
    """Close our side of a stream that may already be broken; never raises, never cancelled."""
    with trio.CancelScope(shield=True):
        try:
            await stream.close()
        except Exception:  # best effort on a broken stream
            pass


async def reset_quietly(stream: INetStream) -> None:
    """Reset a stream that may already be gone; never raises, never cancelled."""
    with trio.CancelScope(shield=True):
        try:
            await stream.reset()
        except Exception:  # best effort on a broken stream
            pass
