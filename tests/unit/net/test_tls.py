"""The mTLS transport on a socket pair: timeouts and malformed verdicts from a hostile peer."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.exceptions import HandshakeFailure

from hypha.net import MTLSTransport, PeerRefused
from hypha.net._tls import _Channel
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(60)


async def _pair() -> tuple[RawConnection, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    ours = RawConnection(TrioTCPStream(trio.SocketStream(a)), initiator=False)
    return ours, trio.SocketStream(b)


async def test_a_silent_peer_times_out_the_handshake(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    _, files = pki.node("n")
    transport = MTLSTransport(files, handshake_timeout=0.3)
    raw, _other = await _pair()
    with trio.fail_after(5), pytest.raises(HandshakeFailure, match=r"timed out after 0\.3 s"):
        await transport.secure_inbound(raw)


async def test_garbage_instead_of_tls_is_refused(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    _, files = pki.node("n")
    transport = MTLSTransport(files)
    raw, other = await _pair()
    await other.send_all(b"\x16\x03\x01\x00\x05hello" + bytes(range(200)))
    with trio.fail_after(5), pytest.raises(PeerRefused, match="TLS error"):
        await transport.secure_inbound(raw)


async def test_a_malformed_verdict_is_refused(tmp_path: Path) -> None:
    """A peer with a valid certificate that then sends a verdict we cannot parse."""
    pki = PKI(tmp_path)
    _, server_files = pki.node("server")
    _, client_files = pki.node("client")
    server = MTLSTransport(server_files)
    hostile = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    hostile.check_hostname = False
    hostile.minimum_version = ssl.TLSVersion.TLSv1_3
    hostile.load_cert_chain(client_files.cert, client_files.key)
    hostile.load_verify_locations(cafile=pki.trust)
    raw, other = await _pair()

    async def attacker() -> None:
        channel = _Channel.wrap(other, hostile, server_side=False)
        await channel.handshake()
        await channel.write(b"\x07\xff")  # neither accept (0) nor refuse (1)
        await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attacker)
        with trio.fail_after(5), pytest.raises(PeerRefused, match="malformed handshake verdict"):
            await server.secure_inbound(raw)
        nursery.cancel_scope.cancel()
