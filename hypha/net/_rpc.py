"""Versioned request/response protocols: ``/hypha/<name>/<version>``, one stream per call.

Wire format (all integers big-endian)::

    request   u32 length | body                        (length <= the protocol's max_request)
    response  u8 status  | u32 length | body           status 0: body is the response
                                                       status 1: body is a UTF-8 error message

A request over the limit is refused from its length prefix alone, before any of its body is read,
with an error response that names the limit; a malformed or slow request loses only its stream:
the connection, the peer's other streams and the node carry on. Timeouts belong to the caller
(``with trio.fail_after(5): await network.request(...)``), except the server's bound on how long
a peer may take to deliver its request, which keeps a slow peer from holding a handler open.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ._wire import FrameReader, StreamClosedError, close_quietly, reset_quietly, u32, write_all

__all__ = [
    "Handler",
    "Protocol",
    "RPCError",
    "RemoteError",
    "RequestRejected",
    "ResponseTooLarge",
]

logger = logging.getLogger("hypha.net.rpc")

#: Seconds a peer has to deliver a whole request once it opened the stream.
REQUEST_READ_TIMEOUT = 30.0
#: Longest error message carried in a response (longer ones are cut).
MAX_ERROR_BYTES = 1024
#: Default size limits of a protocol: 1 MiB each way.
DEFAULT_LIMIT = 1 << 20

_OK = 0
_ERROR = 1
_HEAD = struct.Struct(">BI")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,2}$")


class RPCError(Exception):
    """A call failed: the remote refused or failed it, or the exchange broke."""


class RemoteError(RPCError):
    """The remote peer answered with an error message."""


class ResponseTooLarge(RPCError):
    """The response announced more bytes than the protocol's ``max_response``."""


class RequestRejected(Exception):
    """Raised by a handler to answer with this error message (the caller gets RemoteError)."""


Handler = Callable[[ID, bytes], Awaitable[bytes]]


@dataclass(frozen=True)
class Protocol:
    """A request/response protocol: its versioned ID and the size limits both ends enforce."""

    name: str
    version: str = "1"
    max_request: int = DEFAULT_LIMIT
    max_response: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"invalid protocol name {self.name!r}: use lower-case letters, "
                             "digits, '.', '_' and '-' (at most 63)")
        if not _VERSION.match(self.version):
            raise ValueError(f"invalid protocol version {self.version!r}: use e.g. '1' or '1.2'")
        for field in ("max_request", "max_response"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 < value <= 0xFFFFFFFF:
                raise ValueError(f"invalid {field}: {value!r} (1 .. 4 GiB - 1 bytes)")

    @property
    def id(self) -> TProtocol:
        return TProtocol(f"/hypha/{self.name}/{self.version}")


async def call(stream: INetStream, protocol: Protocol, payload: bytes) -> bytes:
    """Send one request on a fresh stream and return the response body."""
    if len(payload) > protocol.max_request:
        raise ValueError(f"request of {len(payload)} bytes exceeds the {protocol.max_request}-"
                         f"byte limit of {protocol.id}")
    try:
        await write_all(stream, u32(len(payload)) + payload)
        reader = FrameReader(stream)
        status, length = _HEAD.unpack(await reader.read_exactly(_HEAD.size, what="response"))
        if status == _OK:
            if length > protocol.max_response:
                raise ResponseTooLarge(f"{protocol.id}: response of {length} bytes exceeds the "
                                       f"{protocol.max_response}-byte limit")
            return await reader.read_exactly(length, what="response")
        if status == _ERROR and length <= MAX_ERROR_BYTES:
            message = (await reader.read_exactly(length, what="error")).decode(errors="replace")
            raise RemoteError(f"{protocol.id}: {message}")
        raise RPCError(f"{protocol.id}: malformed response header (status {status}, "
                       f"length {length})")
    except StreamClosedError as exc:
        raise RPCError(f"{protocol.id}: {exc}") from exc
    except BaseException:
        await reset_quietly(stream)
        raise
    finally:
        await close_quietly(stream)


async def serve(stream: INetStream, protocol: Protocol, handler: Handler, peer: ID) -> None:
    """Answer one request on an inbound stream. Never raises for a peer's misbehaviour."""
    reader = FrameReader(stream)
    try:
        with trio.fail_after(REQUEST_READ_TIMEOUT):
            length = await reader.read_u32(what="request length")
            if length > protocol.max_request:
                logger.warning("%s from %s: refused a %d-byte request (limit %d)",
                               protocol.id, peer, length, protocol.max_request)
                await _answer(stream, _ERROR, f"request of {length} bytes exceeds the "
                              f"{protocol.max_request}-byte limit of {protocol.id}".encode())
                return
            request = await reader.read_exactly(length, what="request")
    except trio.TooSlowError:
        logger.warning("%s from %s: request not delivered within %g s; stream reset",
                       protocol.id, peer, REQUEST_READ_TIMEOUT)
        await reset_quietly(stream)
        return
    except StreamClosedError as exc:
        logger.warning("%s from %s: malformed request (%s); stream dropped", protocol.id, peer,
                       exc)
        await reset_quietly(stream)
        return
    try:
        response = await handler(peer, request)
    except RequestRejected as exc:
        await _answer(stream, _ERROR, str(exc).encode()[:MAX_ERROR_BYTES])
        return
    except Exception:
        logger.exception("%s: the handler failed on a request from %s", protocol.id, peer)
        await _answer(stream, _ERROR, b"internal error in the handler")
        return
    if not isinstance(response, bytes | bytearray | memoryview):
        logger.error("%s: the handler returned %s, not bytes", protocol.id,
                     type(response).__name__)
        await _answer(stream, _ERROR, b"internal error in the handler")
        return
    if len(response) > protocol.max_response:
        logger.error("%s: the handler's %d-byte response exceeds the %d-byte limit", protocol.id,
                     len(response), protocol.max_response)
        await _answer(stream, _ERROR, f"response of {len(response)} bytes exceeds the "
                      f"{protocol.max_response}-byte limit".encode())
        return
    await _answer(stream, _OK, bytes(response))


async def _answer(stream: INetStream, status: int, body: bytes) -> None:
    try:
        await write_all(stream, _HEAD.pack(status, len(body)) + body)
    except StreamClosedError as exc:
        logger.debug("could not answer on %s: %s", stream.get_protocol(), exc)
        await reset_quietly(stream)
        return
    await close_quietly(stream)

