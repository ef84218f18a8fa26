"""Tests for hypha.net._yamux: interop with py-libp2p's Yamux, flow control, malformed input.

Every test runs over a real loopback TCP socket pair wrapped in a minimal secure-conn stand-in
(``read(n)`` returns what is available, ``write`` sends all), and is bounded by trio.fail_after.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import (
    MuxedConnUnavailable,
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamError,
    MuxedStreamReset,
)
from libp2p.stream_muxer.yamux.yamux import Yamux as Libp2pYamux
from trio.testing import MockClock

import hypha.net._yamux as yamux_mod
from hypha.net._yamux import INITIAL_WINDOW, MAX_WINDOW, PROTOCOL_ID, Yamux, YamuxDeadlineError

HEADER = struct.Struct("!BBHII")
DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8

OURS, THEIRS = Yamux, Libp2pYamux
PAIRS = [(OURS, OURS), (OURS, THEIRS), (THEIRS, OURS)]
PAIR_IDS = ["ours-ours", "ours-libp2p", "libp2p-ours"]


class FakeSecureConn:
    """Secure-conn stand-in over a trio stream, with the read/write contract of our mTLS."""

    def __init__(self, stream: trio.abc.Stream, is_initiator: bool) -> None:
        self.stream = stream
        self.is_initiator = is_initiator
        self.closed = False

    async def read(self, n: int | None = None) -> bytes:
        try:
            return bytes(await self.stream.receive_some(n or 65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def write(self, data: Any) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        self.closed = True
        await self.stream.aclose()

    def get_remote_address(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)

    def get_transport_addresses(self) -> list[Any]:
        return []

    def get_connection_type(self) -> Any:
        return None


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    return client, server


@asynccontextmanager
async def muxers(
    client_cls: type = OURS, server_cls: type = OURS, **kw: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """A started (client, server) muxer pair; the session tasks run in a private nursery."""
    c, s = await tcp_pair()
    client = make(client_cls, FakeSecureConn(c, True), **kw)
    server = make(server_cls, FakeSecureConn(s, False), **kw)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.start)
        nursery.start_soon(server.start)
        await client.event_started.wait()
        await server.event_started.wait()
        yield client, server
        nursery.cancel_scope.cancel()


def make(cls: type, conn: FakeSecureConn, **kw: Any) -> Any:
    if cls is OURS:
        return Yamux(conn, ID(b"peer"), **kw)  # type: ignore[arg-type]
    return Libp2pYamux(conn, ID(b"peer"))  # type: ignore[arg-type]


async def read_to_eof(stream: Any) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await stream.read(1 << 20)
        except MuxedStreamEOF:
            return bytes(out)


async def read_exactly(stream: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.read(n - len(out))
    return bytes(out)


# --------------------------------------------------------------------------- hand-made peer


class RawPeer:
    """The far end of one of our muxers, speaking yamux frames by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(
        self, typ: int, flags: int, sid: int, length: int, body: bytes = b"", version: int = 0
    ) -> None:
        await self.stream.send_all(HEADER.pack(version, typ, flags, sid, length) + body)

    async def frame(self) -> tuple[int, int, int, int, bytes] | None:
        """Next frame (type, flags, stream id, length, body), None at EOF."""
        while True:
            if len(self.buf) >= 12:
                _, typ, flags, sid, length = HEADER.unpack_from(self.buf)
                size = 12 + (length if typ == DATA else 0)
                if len(self.buf) >= size:
                    body = bytes(self.buf[12:size])
                    del self.buf[:size]
                    return typ, flags, sid, length, body
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self.buf += data

    async def frames_until_eof(self) -> list[tuple[int, int, int, int, bytes]]:
        frames = []
        while (f := await self.frame()) is not None:
            frames.append(f)
        return frames


@asynccontextmanager
async def ours_against_raw(
    is_initiator: bool = False, **kw: Any
) -> AsyncIterator[tuple[Yamux, RawPeer, trio.Nursery]]:
    """Our muxer (started) against a RawPeer; start() must return without raising."""
    a, b = await tcp_pair()
    mux = Yamux(FakeSecureConn(a, is_initiator), ID(b"peer"), **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mux.start)
        await mux.event_started.wait()
        yield mux, RawPeer(b), nursery
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ the API


def test_exports() -> None:
    assert sorted(yamux_mod.__all__) == [
        "INITIAL_WINDOW",
        "MAX_FRAME",
        "MAX_STREAMS",
        "MAX_WINDOW",
        "PROTOCOL_ID",
        "Yamux",
        "YamuxDeadlineError",
        "YamuxStream",
        "install",
    ]
    assert PROTOCOL_ID == "/yamux/1.0.0"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_streams": 0}, "max_streams"),
        ({"max_window": 1024}, "max_window"),
        ({"max_frame": 0}, "max_frame"),
        ({"read_size": 0}, "read_size"),
    ],
)
def test_constructor_rejects_bad_settings(kw: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Yamux(FakeSecureConn(None, True), ID(b"peer"), **kw)  # type: ignore[arg-type]


async def test_stream_ids_follow_the_initiator_parity() -> None:
    with trio.fail_after(10):
        async with muxers() as (client, server):
            assert client.is_initiator and not server.is_initiator
            c_ids = [(await client.open_stream()).stream_id for _ in range(3)]
            s_ids = [(await server.open_stream()).stream_id for _ in range(3)]
            assert c_ids == [1, 3, 5]
            assert s_ids == [2, 4, 6]
            assert client.is_established and server.is_established
            assert client.get_remote_address() == ("127.0.0.1", 1)


async def test_read_returns_at_most_n_and_write_takes_buffers() -> None:
    with trio.fail_after(10):
        async with muxers() as (client, server):
            stream = await client.open_stream()
            await stream.write(bytearray(b"0123456789"))
            await stream.write(memoryview(b"abcdef")[::2].tobytes())
            remote = await server.accept_stream()
            assert await remote.read(3) == b"012"
            assert await remote.read(0) == b""
            assert await read_exactly(remote, 10) == b"3456789ace"
            strided = memoryview(bytes(range(16))).cast("B", (4, 4))[::2]
            with pytest.raises(ValueError, match="C-contiguous"):
                await stream.write(strided)


# ------------------------------------------------------------------------------ interop


@pytest.mark.parametrize(("client_cls", "server_cls"), PAIRS, ids=PAIR_IDS)
async def test_echo_and_half_close_both_ways(client_cls: type, server_cls: type) -> None:
    with trio.fail_after(20):
        async with muxers(client_cls, server_cls) as (client, server):
            for opener, acceptor in ((client, server), (server, client)):

                async def echo_once(acceptor: Any = acceptor) -> None:
                    stream = await acceptor.accept_stream()
                    data = await read_to_eof(stream)  # the opener half-closed
                    await stream.write(data[::-1])
                    await stream.close()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(echo_once)
                    stream = await opener.open_stream()
                    await stream.write(b"hello ")
                    await stream.write(b"yamux")
                    await stream.close()
                    # Our write side is closed, the read side still works.
                    assert await read_to_eof(stream) == b"xumay olleh"
                    with pytest.raises((MuxedStreamClosed, MuxedStreamError)):
                        await stream.write(b"late")


@pytest.mark.parametrize(("client_cls", "server_cls"), PAIRS, ids=PAIR_IDS)
async def test_reset_reaches_the_other_side(client_cls: type, server_cls: type) -> None:
    with trio.fail_after(20):
        async with muxers(client_cls, server_cls) as (client, server):
            stream = await client.open_stream()
            await stream.write(b"x" * 1000)
            remote = await server.accept_stream()
            assert await read_exactly(remote, 1000) == b"x" * 1000
            await stream.reset()
            # py-libp2p's Yamux forgets a reset stream and then reports EOF instead.
            with pytest.raises(MuxedStreamReset if server_cls is OURS else MuxedStreamEOF):
                while True:
                    await remote.read(1 << 16)
            with pytest.raises(MuxedStreamError):
                await stream.write(b"after reset")

            # And the other way round: the acceptor resets.
            stream = await server.open_stream()
            await stream.write(b"ping")
            remote = await client.accept_stream()
            assert await read_exactly(remote, 4) == b"ping"
            await remote.reset()
            with pytest.raises(MuxedStreamReset if server_cls is OURS else MuxedStreamEOF):
                while True:
                    await stream.read(1 << 16)


@pytest.mark.parametrize(("client_cls", "server_cls"), PAIRS, ids=PAIR_IDS)
async def test_eight_concurrent_streams(client_cls: type, server_cls: type) -> None:
    payloads = [random.Random(i).randbytes(300_000 + i * 7) for i in range(8)]
    with trio.fail_after(30):
        async with muxers(client_cls, server_cls) as (client, server):

            async def echo_server() -> None:
                async with trio.open_nursery() as nursery:
                    for _ in payloads:
                        stream = await server.accept_stream()

                        async def echo(stream: Any = stream) -> None:
                            await stream.write(await read_to_eof(stream))
                            await stream.close()

                        nursery.start_soon(echo)

            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                stream = await client.open_stream()

                async def send() -> None:
                    await stream.write(payloads[i])
                    await stream.close()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    results[i] = await read_to_eof(stream)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo_server)
                for i in range(len(payloads)):
                    nursery.start_soon(one, i)
            assert [results[i] == payloads[i] for i in range(8)] == [True] * 8


@pytest.mark.parametrize(("client_cls", "server_cls"), PAIRS, ids=PAIR_IDS)
async def test_32mib_transfer_sha256(client_cls: type, server_cls: type) -> None:
    data = random.Random(32).randbytes(32 << 20)
    with trio.fail_after(60):
        async with muxers(client_cls, server_cls) as (client, server):

            async def sink() -> None:
                stream = await server.accept_stream()
                digest = hashlib.sha256()
                size = 0
                while True:
                    try:
                        chunk = await stream.read(1 << 20)
                    except MuxedStreamEOF:
                        break
                    digest.update(chunk)
                    size += len(chunk)
                await stream.write(size.to_bytes(8, "big") + digest.digest())
                await stream.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink)
                stream = await client.open_stream()
                view = memoryview(data)
                for off in range(0, len(data), 3 << 20):  # odd-sized writes
                    await stream.write(view[off : off + (3 << 20)])
                await stream.close()
                reply = await read_to_eof(stream)
            assert int.from_bytes(reply[:8], "big") == len(data)
            assert reply[8:] == hashlib.sha256(data).digest()


@pytest.mark.parametrize("other", [OURS, THEIRS], ids=["ours", "libp2p"])
async def test_ping_is_answered(other: type) -> None:
    with trio.fail_after(10):
        async with muxers(OURS, other) as (client, _server):
            rtt = await client.ping()
            assert 0 <= rtt < 5


@pytest.mark.parametrize("other", [OURS, THEIRS], ids=["ours", "libp2p"])
async def test_close_ends_the_peer_session(other: type) -> None:
    closed = []
    with trio.fail_after(10):
        async with muxers(OURS, other) as (client, server):

            async def on_close() -> None:
                closed.append(True)
                await client.close()  # the swarm calls back into close(); must not recurse

            client.on_close = on_close
            stream = await server.open_stream()
            mine = await client.accept_stream()
            await client.close()
            assert client.is_closed and not client.is_established
            assert closed == [True]
            with pytest.raises(MuxedConnUnavailable):
                await client.open_stream()
            with pytest.raises(MuxedConnUnavailable):
                await client.accept_stream()
            with pytest.raises(MuxedStreamReset):
                await mine.read()
            # The peer sees GoAway + EOF and shuts down as well.
            with pytest.raises(MuxedConnUnavailable):
                await server.accept_stream()
            with pytest.raises((MuxedStreamEOF, MuxedStreamReset)):
                await stream.read()


async def test_peer_vanishing_fails_streams_and_calls_on_close() -> None:
    calls = []

    async def on_close() -> None:
        calls.append(True)

    with trio.fail_after(10):
        async with ours_against_raw(is_initiator=True) as (mux, peer, _):
            mux.on_close = on_close
            stream = await mux.open_stream()
            await peer.stream.aclose()  # no GoAway, no FIN: the TCP connection just drops
            with pytest.raises(MuxedStreamReset, match="connection closed"):
                await stream.read()
            with pytest.raises(MuxedStreamReset):
                await stream.write(b"x")
            await mux.event_closed.wait()
            assert calls == [True]


# ------------------------------------------------------------------------- flow control


@pytest.mark.parametrize(
    "frames", [[INITIAL_WINDOW + 1], [200_000, 100_000]], ids=["one-frame", "two-frames"]
)
async def test_peer_exceeding_our_window_is_rejected(
    frames: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        async with ours_against_raw() as (mux, peer, nursery):

            async def send() -> None:
                await peer.send(WINDOW_UPDATE, SYN, 1, 0)
                for size in frames:
                    with contextlib.suppress(trio.BrokenResourceError):  # we hung up first
                        await peer.send(DATA, 0, 1, size, b"\0" * size)

            nursery.start_soon(send)
            got = await peer.frames_until_eof()
            await mux.event_closed.wait()
    assert (WINDOW_UPDATE, ACK, 1, 0, b"") in got
    assert got[-1][:4] == (GO_AWAY, 0, 0, 1)  # protocol error, then the connection closed
    assert any(
        "exceeds its receive window" in r.getMessage() and r.levelno == logging.ERROR
        for r in caplog.records
    )


async def test_we_never_send_beyond_the_peer_window() -> None:
    with trio.fail_after(10):
        async with ours_against_raw() as (mux, peer, nursery):
            await peer.send(WINDOW_UPDATE, SYN, 1, 0)
            stream = await mux.accept_stream()
            nursery.start_soon(stream.write, b"z" * (1 << 20))

            async def data_bytes(expected: int) -> int:
                """DATA bytes received until ``expected`` arrived and nothing more follows."""
                total = 0
                while total < expected:
                    f = await peer.frame()
                    assert f is not None
                    total += f[3] if f[0] == DATA else 0
                with trio.move_on_after(0.2):  # anything beyond the window would show up now
                    f = await peer.frame()
                    assert f is not None
                    total += f[3] if f[0] == DATA else 0
                return total

            assert await data_bytes(INITIAL_WINDOW) == INITIAL_WINDOW
            await peer.send(WINDOW_UPDATE, 0, 1, 100_000)
            assert await data_bytes(100_000) == 100_000
            rest = (1 << 20) - INITIAL_WINDOW - 100_000
            await peer.send(WINDOW_UPDATE, 0, 1, 1 << 20)
            assert await data_bytes(rest) == rest


@pytest.mark.parametrize("sender_cls", [OURS, THEIRS], ids=["ours", "libp2p"])
async def test_slow_reader_bounds_buffered_bytes(sender_cls: type) -> None:
    data = random.Random(7).randbytes(24 << 20)
    sent = 0
    with trio.fail_after(60):
        async with muxers(sender_cls, OURS) as (client, server):

            async def send() -> None:
                nonlocal sent
                stream = await client.open_stream()
                for off in range(0, len(data), 1 << 16):
                    await stream.write(data[off : off + (1 << 16)])
                    sent += 1 << 16
                await stream.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                stream = await server.accept_stream()
                await trio.sleep(0.5)  # nobody reads: the sender must stall at the window
                assert stream._buffered <= INITIAL_WINDOW
                assert sent <= INITIAL_WINDOW + (1 << 16)
                got = bytearray()
                while len(got) < len(data):
                    got += await stream.read(1 << 20)
                    assert stream._buffered <= MAX_WINDOW
                    if len(got) < 4 << 20:
                        await trio.sleep(0.01)  # slow consumer for the first MiBs
                with pytest.raises(MuxedStreamEOF):
                    await stream.read()
            assert bytes(got) == data


async def test_cancelled_write_keeps_the_connection_usable() -> None:
    with trio.fail_after(20):
        async with muxers() as (client, server):
            stream = await client.open_stream()
            with trio.move_on_after(0.3) as scope:
                await stream.write(b"a" * (4 << 20))  # blocks on the window: nobody reads
            assert scope.cancelled_caught
            remote = await server.accept_stream()
            got = await remote.read(1 << 30)
            assert set(got) == {ord("a")}
            # Frames stayed intact: a fresh stream still round-trips.
            other = await client.open_stream()
            await other.write(b"still fine")
            await other.close()
            fresh = await server.accept_stream()
            assert await read_to_eof(fresh) == b"still fine"


# ------------------------------------------------------------------------ stream limits


async def test_streams_beyond_the_limit_are_reset() -> None:
    with trio.fail_after(10):
        async with muxers(OURS, OURS, max_streams=4) as (client, server):
            server._max_streams = 2  # the acceptor refuses earlier than the opener
            streams = [await client.open_stream() for _ in range(4)]
            with pytest.raises(MuxedStreamError, match="too many streams"):
                await client.open_stream()
            for s in streams[:2]:
                await s.write(b"hi")
            accepted = [await server.accept_stream() for _ in range(2)]
            assert [await read_exactly(s, 2) for s in accepted] == [b"hi", b"hi"]
            for s in streams[2:]:
                with pytest.raises(MuxedStreamReset):
                    await s.read()
            # Closing streams frees slots on both sides.
            for s in streams[:2]:
                await s.close()
            for s in accepted:
                await s.close()
            while server._streams:  # the FINs free the acceptor's slots
                await trio.sleep(0.01)
            fresh = await client.open_stream()
            await fresh.write(b"again")
            assert await read_exactly(await server.accept_stream(), 5) == b"again"


async def test_deadline(autojump_clock: MockClock) -> None:
    with trio.fail_after(60):
        async with muxers() as (client, _server):
            stream = await client.open_stream()
            with pytest.raises(ValueError, match="ttl"):
                stream.set_deadline(-1)
            stream.set_deadline(5)
            start = trio.current_time()
            with pytest.raises(YamuxDeadlineError):
                await stream.read()
            assert trio.current_time() - start == pytest.approx(5)


# ---------------------------------------------------------------------- malformed input

MALFORMED = {
    "garbage": (random.Random(3).randbytes(4096), True),
    "truncated-header": (HEADER.pack(0, WINDOW_UPDATE, SYN, 1, 0)[:5], False),
    "bad-version": (HEADER.pack(1, WINDOW_UPDATE, SYN, 1, 0), True),
    "unknown-type": (HEADER.pack(0, 7, 0, 0, 0), True),
    "huge-length": (HEADER.pack(0, DATA, SYN, 1, 0xFFFF_FFFF) + b"\0" * 100, True),
    "stream-id-0": (HEADER.pack(0, DATA, 0, 0, 4) + b"abcd", True),
    "our-parity": (HEADER.pack(0, WINDOW_UPDATE, SYN, 2, 0), True),
    "duplicate-syn": (HEADER.pack(0, WINDOW_UPDATE, SYN, 1, 0) * 2, True),
    "window-overflow": (
        HEADER.pack(0, WINDOW_UPDATE, SYN, 1, 0) + HEADER.pack(0, WINDOW_UPDATE, 0, 1, 0xFFFF_FFFF),
        True,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_input_closes_only_that_connection(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload, protocol_error = MALFORMED[case]
    with trio.fail_after(15):
        async with muxers() as (client, server), ours_against_raw() as (mux, peer, _):
            await peer.stream.send_all(payload)
            if not protocol_error:
                await peer.stream.send_eof()
            got = await peer.frames_until_eof() if protocol_error else []
            await mux.event_closed.wait()
            assert mux.is_closed and not mux.is_established
            if protocol_error:
                assert got[-1][:4] == (GO_AWAY, 0, 0, 1)
                assert any(
                    "protocol error" in r.getMessage() and r.levelno == logging.ERROR
                    for r in caplog.records
                )
            # The other connection in the same nursery is unaffected.
            stream = await client.open_stream()
            await stream.write(b"unaffected")
            await stream.close()
            assert await read_to_eof(await server.accept_stream()) == b"unaffected"


async def test_random_garbage_never_escapes_start() -> None:
    rng = random.Random(11)
    with trio.fail_after(30):
        for _ in range(20):
            async with ours_against_raw(is_initiator=rng.random() < 0.5) as (mux, peer, _):
                # A valid-looking prefix now and then, so parsing gets past the first header.
                prefix = HEADER.pack(0, WINDOW_UPDATE, SYN, 1, 0) if rng.random() < 0.5 else b""
                await peer.stream.send_all(prefix + rng.randbytes(rng.randrange(1, 2000)))
                with trio.move_on_after(0.2):
                    await mux.event_closed.wait()
                await peer.stream.aclose()
                await mux.event_closed.wait()


# ------------------------------------------------------------------- swarm integration


@pytest.mark.parametrize("installed", [True, False], ids=["install", "no-install"])
async def test_upgrader_builds_our_muxer_only_after_install(installed: bool) -> None:
    """py-libp2p 0.8.1 builds its own Yamux for /yamux/1.0.0 whatever muxer_opt says.

    If the no-install case starts failing, py-libp2p fixed this and install() can go.
    """
    from libp2p.custom_types import TProtocol
    from libp2p.transport.upgrader import TransportUpgrader

    upgraders = [TransportUpgrader({}, {TProtocol(PROTOCOL_ID): Yamux}) for _ in range(2)]
    if installed:
        for upgrader in upgraders:
            yamux_mod.install(upgrader)
    c, s = await tcp_pair()
    conns = [FakeSecureConn(c, True), FakeSecureConn(s, False)]
    results: list[Any] = [None, None]
    with trio.fail_after(10):

        async def upgrade(i: int) -> None:
            results[i] = await upgraders[i].upgrade_connection(conns[i], ID(b"peer"))  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upgrade, 0)
            nursery.start_soon(upgrade, 1)
        assert all(isinstance(m, Yamux) for m in results) is installed
        if installed:
            assert results[0].negotiated_muxer_protocol == PROTOCOL_ID
            async with trio.open_nursery() as nursery:
                for m in results:
                    nursery.start_soon(m.start)
                stream = await results[0].open_stream()
                await stream.write(b"via the upgrader")
                await stream.close()
                assert await read_to_eof(await results[1].accept_stream()) == b"via the upgrader"
                for m in results:
                    await m.close()
        else:
            for conn in conns:
                await conn.close()
