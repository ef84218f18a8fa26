"""Versioned request/response protocols: ``/hypha/<name>/<version>``, one stream per call.

Wire format (all integers big-endian)::

    request   u32 length | body                        (length <= the protocol's max_request)
    response  u8 status  | u32 length | body           status 0: body is the response
                                                       status 1: body is a UTF-8 error message

A request over the limit is refused from its length prefix alone, before any of its body is read,
with an error response that names the limit; a malformed or slow request loses only its stream:
the connection, the peer's other streams and the node carry on. A request that admission control
turns away (``Network.serve``: the peer's rate, its or the node's handlers in progress) is
answered by :func:`refuse` before any of it is read, and :func:`call` reads such an early answer
even while it is still writing a large request. Timeouts belong to the caller
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

from ._admission import Refusals
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
#: Requests up to this many bytes (length prefix included) are written before the response is
#: awaited; larger ones are written while it is awaited (see ``_send_and_read_head``).
#: NOTE: 64 KiB, well inside yamux's 256 KiB initial window, which a request that is never read
#: can fill without blocking its writer.
EARLY_ANSWER_BELOW = 64 << 10

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
        reader = FrameReader(stream)
        status, length = await _send_and_read_head(stream, reader, u32(len(payload)) + payload)
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


async def _send_and_read_head(stream: INetStream, reader: FrameReader, request: bytes
                              ) -> tuple[int, int]:
    """Write the request and read the response's header.

    A request that fits in the muxer's initial window is written in one go. A larger one is
    written while the header is awaited: a server that refuses it up front (admission control,
    a length over its limit) answers without reading it, and a writer waiting for window that
    will never come would otherwise hang until the caller's timeout.
    """
    if len(request) <= EARLY_ANSWER_BELOW:
        await write_all(stream, request)
        return _HEAD.unpack(await reader.read_exactly(_HEAD.size, what="response"))
    head: tuple[int, int] | None = None
    failure: StreamClosedError | None = None
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            nonlocal failure
            try:
                await write_all(stream, request)
            except StreamClosedError as exc:
                # NOTE: the server may have answered and reset; its answer decides, so wait for
                # it (a broken stream ends the read at once).
                failure = exc

        async def receive() -> None:
            nonlocal head, failure
            try:
                head = _HEAD.unpack(await reader.read_exactly(_HEAD.size, what="response"))
            except StreamClosedError as exc:
                failure = failure or exc
            nursery.cancel_scope.cancel()  # an answer (or none coming) ends the writing

        nursery.start_soon(send)
        nursery.start_soon(receive)
    if head is None:
        assert failure is not None
        raise failure
    return head


async def serve(stream: INetStream, protocol: Protocol, handler: Handler, peer: ID,
                refusals: Refusals) -> None:
    """Answer one request on an inbound stream. Never raises for a peer's misbehaviour.

    Every request that is not answered with the handler's response is recorded in ``refusals``
    under one reason: ``request-too-large``, ``slow-request``, ``malformed-request``,
    ``handler-rejected`` (RequestRejected) or ``handler-failed`` (an exception, or a bad result).
    """
    reader = FrameReader(stream)
    what = f"{protocol.id} from {peer}"
    try:
        with trio.fail_after(REQUEST_READ_TIMEOUT):
            length = await reader.read_u32(what="request length")
            if length > protocol.max_request:
                refusals.record("request-too-large", peer, f"{what}: refused a {length}-byte "
                                f"request (limit {protocol.max_request})")
                await _answer(stream, _ERROR, f"request of {length} bytes exceeds the "
                              f"{protocol.max_request}-byte limit of {protocol.id}".encode())
                return
            request = await reader.read_exactly(length, what="request")
    except trio.TooSlowError:
        refusals.record("slow-request", peer, f"{what}: request not delivered within "
                        f"{REQUEST_READ_TIMEOUT:g} s; stream reset")
        await reset_quietly(stream)
        return
    except StreamClosedError as exc:
        refusals.record("malformed-request", peer, f"{what}: malformed request ({exc}); "
                        "stream dropped")
        await reset_quietly(stream)
        return
    try:
        response = await handler(peer, request)
    except RequestRejected as exc:
        message = str(exc)
        refusals.record("handler-rejected", peer, f"{what}: the handler rejected the request: "
                        f"{message}", level=logging.INFO)
        await _answer(stream, _ERROR, message.encode()[:MAX_ERROR_BYTES])
        return
    except Exception:
        refusals.record("handler-failed", peer, f"{what}: the handler failed",
                        level=logging.ERROR, exc_info=True)
        await _answer(stream, _ERROR, b"internal error in the handler")
        return
    if not isinstance(response, bytes | bytearray | memoryview):
        refusals.record("handler-failed", peer, f"{what}: the handler returned "
                        f"{type(response).__name__}, not bytes", level=logging.ERROR)
        await _answer(stream, _ERROR, b"internal error in the handler")
        return
    if len(response) > protocol.max_response:
        refusals.record("handler-failed", peer, f"{what}: the handler's {len(response)}-byte "
                        f"response exceeds the {protocol.max_response}-byte limit",
                        level=logging.ERROR)
        await _answer(stream, _ERROR, f"response of {len(response)} bytes exceeds the "
                      f"{protocol.max_response}-byte limit".encode())
        return
    await _answer(stream, _OK, bytes(response))


async def refuse(stream: INetStream, message: str) -> None:
    """Answer a request with an error before reading any of it (admission control).

    NOTE: the request stays unread; our muxer buffers at most its initial 256 KiB window of it
    until the caller closes its side, and :func:`call` reads such an early answer while it is
    still writing, so a refused caller learns why at once, whatever the size of its request.
    """
    await _answer(stream, _ERROR, message.encode()[:MAX_ERROR_BYTES])


async def _answer(stream: INetStream, status: int, body: bytes) -> None:
    try:
        await write_all(stream, _HEAD.pack(status, len(body)) + body)
    except StreamClosedError as exc:
        logger.debug("could not answer on %s: %s", stream.get_protocol(), exc)
        await reset_quietly(stream)
        return
    await close_quietly(stream)

