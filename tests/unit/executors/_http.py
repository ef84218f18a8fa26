"""A minimal HTTP/1.1 client over a Unix socket (h11 on trio) for testing the job bridge."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def _encode(body: object) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps(body).encode()


async def _send_request(stream: trio.SocketStream, conn: h11.Connection, method: str,
                        target: str, body: object, headers: Sequence[tuple[str, str]],
                        chunks: Sequence[bytes] | None) -> None:
    data = _encode(body)
    all_headers = [("host", "bridge"), *headers]
    if chunks is not None:
        all_headers.append(("transfer-encoding", "chunked"))
    elif data is not None and not any(k.lower() == "content-length" for k, _ in headers):
        all_headers.append(("content-length", str(len(data))))
    try:
        await stream.send_all(conn.send(h11.Request(method=method, target=target,
                                                    headers=all_headers)))
        for piece in chunks if chunks is not None else ([data] if data else []):
            await stream.send_all(conn.send(h11.Data(data=piece)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except trio.BrokenResourceError:
        pass  # the server answered early (e.g. 413) and closed: read its answer


async def _next(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def request(socket_path: Path, method: str, target: str, body: object = None, *,
                  headers: Sequence[tuple[str, str]] = (),
                  chunks: Sequence[bytes] | None = None) -> Reply:
    """One request on a fresh connection; ``body`` is bytes or JSON-encoded; ``chunks`` sends
    a chunked body instead."""
    stream = await trio.open_unix_socket(str(socket_path))
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await _send_request(stream, conn, method, target, body, headers, chunks)
        response = await _next(stream, conn)
        assert isinstance(response, h11.Response), response
        data = bytearray()
        while True:
            event = await _next(stream, conn)
            if isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        return Reply(response.status_code,
                     {k.decode(): v.decode() for k, v in response.headers}, bytes(data))


@dataclass
class EventStream:
    """A Server-Sent Events response being read."""

    stream: trio.SocketStream
    conn: h11.Connection
    status: int
    headers: dict[str, str]
    comments: list[str] = field(default_factory=list)
    _buffer: bytes = b""

    async def _line(self) -> str:
        while b"\n" not in self._buffer:
            event = await _next(self.stream, self.conn)
            if not isinstance(event, h11.Data):
                raise EOFError(f"the stream ended ({event!r})")
            self._buffer += event.data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def next_event(self) -> tuple[str, Any]:
        """The next event as (event type, decoded data); comments are collected on the way."""
        kind, data = "message", list[str]()
        while True:
            line = await self._line()
            if not line:
                if data:
                    return kind, json.loads("\n".join(data))
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            key, _, value = line.partition(": ")
            if key == "data":
                data.append(value)
            elif key == "event":
                kind = value

    async def next_comment(self) -> str:
        before = len(self.comments)
        while len(self.comments) == before:
            line = await self._line()
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif line:
                raise AssertionError(f"expected a comment, got {line!r}")
        return self.comments[-1]

    async def ended(self) -> bool:
        """True when the server ends the response (after any remaining events)."""
        try:
            while True:
                await self._line()
        except EOFError:
            return True


@asynccontextmanager
async def event_stream(socket_path: Path, method: str = "POST",
                       target: str = "/resources/receive") -> AsyncIterator[EventStream]:
    stream = await trio.open_unix_socket(str(socket_path))
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await _send_request(stream, conn, method, target, None, (("content-length", "0"),),
                            None)
        response = await _next(stream, conn)
        assert isinstance(response, h11.Response), response
        yield EventStream(stream, conn, response.status_code,
                          {k.decode(): v.decode() for k, v in response.headers})
