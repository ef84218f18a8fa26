"""Several nodes on 127.0.0.1: DHT records, Gossipsub, RPCs, tensor streams and the relay."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from contextlib import AsyncExitStack

import pytest
import trio

from hypha.net import (
    Network,
    Protocol,
    RemoteError,
    RequestRejected,
    TensorStreamError,
    open_network,
)
from hypha.net._wire import u32
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(180)

ECHO = Protocol("echo", max_request=1024, max_response=2048)


async def _echo(peer: object, request: bytes) -> bytes:
    if request == b"reject":
        raise RequestRejected("rejected on purpose")
    if request == b"crash":
        raise RuntimeError("handler bug")
    if request == b"big":
        return b"x" * 4096
    return request


async def _start(stack: AsyncExitStack, pki: PKI, name: str, **kwargs: object) -> Network:
    _, files = pki.node(name)
    return await stack.enter_async_context(open_network(pki.settings(files, **kwargs)))


async def test_five_nodes_dht_gossip_rpc_and_tensor_stream(pki: PKI) -> None:
    async with AsyncExitStack() as stack:
        hub = await _start(stack, pki, "hub")
        boot = (str(hub.addrs[0]),)
        nodes = [await _start(stack, pki, f"n{i}", bootstrap=boot) for i in range(4)]
        everyone = [hub, *nodes]
        for node in everyone:
            node.serve(ECHO, _echo)
        with trio.fail_after(30):
            while not all(hub.peer_id in n.connected_peers() for n in nodes):
                await trio.sleep(0.02)

        # DHT: a record put by one node is found by another that only knows the hub
        with trio.fail_after(30):
            await nodes[0].put("/hypha/test/record", b"value-1")
            assert await nodes[3].get("/hypha/test/record") == b"value-1"
            assert await nodes[1].provide("/hypha/dataset/alpha")
            providers = await nodes[2].find_providers("/hypha/dataset/alpha")
        assert nodes[1].peer_id in {p.peer_id for p in providers}
        with trio.fail_after(30):  # peer routing: node 3's addresses, found through the DHT
            found = await nodes[0].find_peer(nodes[3].peer_id)
        assert found is not None and found.peer_id == nodes[3].peer_id
        def bare(addrs) -> set[str]:  # type: ignore[no-untyped-def]
            return {str(a).split("/p2p/")[0] for a in addrs}

        assert bare(nodes[3].addrs) & bare(found.addrs)
        with pytest.raises(ValueError, match="outside /hypha/"):
            await nodes[0].put("/other/key", b"v")

        # Gossipsub: every subscriber gets each message once, signed by its publisher
        subs = [await n.subscribe("hypha/test") for n in everyone]
        with trio.fail_after(30):  # the hub learns every subscription, and every node the hub's
            for n in nodes:
                await hub._pubsub.wait_for_subscription(n.peer_id, "hypha/test", timeout=30)
                await n._pubsub.wait_for_subscription(hub.peer_id, "hypha/test", timeout=30)
        with trio.fail_after(30):
            await nodes[2].publish("hypha/test", b"hello all")
            for sub in subs:
                msg = await sub.get()
                assert msg.data == b"hello all"
                assert msg.sender == nodes[2].peer_id

        # RPC between two nodes that meet through the DHT-learned address of the other
        with trio.fail_after(30):
            await nodes[0].dial(found)
            assert await nodes[0].request(nodes[3].peer_id, ECHO, b"abc") == b"abc"
            with pytest.raises(RemoteError, match="rejected on purpose"):
                await nodes[0].request(nodes[3].peer_id, ECHO, b"reject")
            with pytest.raises(RemoteError, match="internal error"):
                await nodes[0].request(nodes[3].peer_id, ECHO, b"crash")
            with pytest.raises(RemoteError, match="exceeds the 2048-byte limit"):
                await nodes[0].request(nodes[3].peer_id, ECHO, b"big")
            with pytest.raises(ValueError, match="exceeds the 1024-byte limit"):
                await nodes[0].request(nodes[3].peer_id, ECHO, b"y" * 1025)
            assert await nodes[0].request(nodes[3].peer_id, ECHO, b"still fine") == b"still fine"
            # by peer ID alone (as a Gossipsub publisher is known): found through the DHT
            await nodes[1].disconnect(nodes[2].peer_id)
            nodes[1]._host.get_peerstore().clear_addrs(nodes[2].peer_id)
            assert nodes[1]._known_addrs(nodes[2].peer_id) == []
            assert await nodes[1].request(nodes[2].peer_id, ECHO, b"by id") == b"by id"

        # a 64 MiB tensor stream, checksummed end to end
        data = os.urandom(64 << 20)
        received: list[tuple[str, str, int]] = []
        done = trio.Event()

        async def on_stream(incoming) -> None:  # type: ignore[no-untyped-def]
            digest = hashlib.sha256()
            async for chunk in incoming:
                digest.update(chunk)
            received.append((incoming.name, digest.hexdigest(), incoming.meta["round"]))
            done.set()

        nodes[3].on_tensor_stream(on_stream)
        with trio.fail_after(60):
            out = await nodes[0].open_tensor_stream(nodes[3].peer_id, "grads", {"round": 7})
            async with out:
                for start in range(0, len(data), 3 << 20):  # odd chunk size on purpose
                    await out.send(memoryview(data)[start:start + (3 << 20)])
            await done.wait()
        assert received == [("grads", hashlib.sha256(data).hexdigest(), 7)]


async def test_relay_reaches_a_peer_with_no_reachable_address(pki: PKI) -> None:
    async with AsyncExitStack() as stack:
        gateway = await _start(stack, pki, "gateway", relay_service=True)
        boot = (str(gateway.addrs[0]),)
        hidden = await _start(stack, pki, "hidden", bootstrap=boot, relay_client=True, listen=())
        hidden.serve(ECHO, _echo)
        caller = await _start(stack, pki, "caller")
        with trio.fail_after(30):
            while not hidden.relay_addrs:
                await trio.sleep(0.02)
        assert hidden.addrs == [] or all("127.0.0.1" not in str(a) for a in hidden.addrs)
        with trio.fail_after(30):
            peer = await caller.dial(hidden.relay_addrs[0])
            assert peer == hidden.peer_id
            assert await caller.request(hidden.peer_id, ECHO, b"via relay") == b"via relay"
        # the relayed connection was verified end to end: the caller holds hidden's certificate
        session = next(s for s in caller.transport.sessions()
                       if s.get_remote_peer() == hidden.peer_id)
        assert session.remote_certificate == pki_cert(pki, "hidden")


def pki_cert(pki: PKI, name: str):  # type: ignore[no-untyped-def]
    from hypha.certutil import load_certificates

    return load_certificates(pki.directory / f"{name}.pem")[0]


async def _raw_stream(a: Network, b: Network, protocol_id: str):  # type: ignore[no-untyped-def]
    from libp2p.custom_types import TProtocol

    return await a._open_stream(b.peer_id, TProtocol(protocol_id))


async def test_malformed_and_oversized_rpcs_leave_the_node_and_connection_intact(
        pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with AsyncExitStack() as stack:
        a = await _start(stack, pki, "a")
        b = await _start(stack, pki, "b")
        b.serve(ECHO, _echo)
        with trio.fail_after(30):
            await a.dial(b.addrs[0])
            # a length prefix far over the limit: refused from the prefix alone
            s = await _raw_stream(a, b, str(ECHO.id))
            await s.write(u32(0xFFFFFFF0) + b"xx")
            head = await s.read(5)
            status, length = struct.unpack(">BI", head)
            assert status == 1
            assert b"exceeds the 1024-byte limit" in await s.read(length)
            # a truncated request: the stream ends before the announced body
            s = await _raw_stream(a, b, str(ECHO.id))
            await s.write(u32(100) + b"short")
            await s.close()
            # random garbage
            s = await _raw_stream(a, b, str(ECHO.id))
            await s.write(os.urandom(3))
            await s.reset()
            # the same connection still serves well-formed calls
            for i in range(5):
                assert await a.request(b.peer_id, ECHO, b"ok %d" % i) == b"ok %d" % i
        assert b.peer_id in a.connected_peers()
        with trio.fail_after(10):
            while not any("malformed request" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.02)
        assert any("refused a 4294967280-byte request" in r.getMessage() for r in caplog.records)


async def test_corrupt_and_unwanted_tensor_streams_are_refused(pki: PKI) -> None:
    async with AsyncExitStack() as stack:
        a = await _start(stack, pki, "a")
        b = await _start(stack, pki, "b")
        with trio.fail_after(30):
            await a.dial(b.addrs[0])
            # nobody listening for tensor streams on b: the sender learns it at close
            out = await a.open_tensor_stream(b.peer_id, "unwanted")
            with pytest.raises(TensorStreamError, match="accepts no tensor streams"):
                async with out:
                    await out.send(b"abc")

        errors: list[str] = []

        async def consume(incoming) -> None:  # type: ignore[no-untyped-def]
            try:
                async for _ in incoming:
                    pass
            except TensorStreamError as exc:
                errors.append(str(exc))
                raise

        b.on_tensor_stream(consume)
        with trio.fail_after(30):
            # a wrong end-of-stream checksum
            s = await _raw_stream(a, b, "/hypha/tensor-stream/1")
            header = b'{"name":"bad","meta":{}}'
            await s.write(u32(len(header)) + header + u32(3) + b"abc" + u32(0) + u32(12345))
            reply = await s.read(200)
            assert reply[0] == 1 and b"checksum mismatch" in reply
            # a chunk over the receiver's limit
            s = await _raw_stream(a, b, "/hypha/tensor-stream/1")
            await s.write(u32(len(header)) + header + u32(0x7FFFFFFF))
            reply = await s.read(200)
            assert reply[0] == 1 and b"exceeds" in reply
            # a header that is not JSON
            s = await _raw_stream(a, b, "/hypha/tensor-stream/1")
            await s.write(u32(4) + b"\xff\xfe{]")
            reply = await s.read(200)
            assert reply[0] == 1 and b"not JSON" in reply
        assert len(errors) == 2
        # and a good stream still goes through
        got = []

        async def keep(incoming) -> None:  # type: ignore[no-untyped-def]
            got.append(b"".join([c async for c in incoming]))

        b.on_tensor_stream(keep)
        with trio.fail_after(30):
            async with await a.open_tensor_stream(b.peer_id, "good") as out:
                await out.send(b"fine")
        assert got == [b"fine"]


async def test_external_addresses_replace_the_listen_ones_in_what_a_node_advertises(
        pki: PKI) -> None:
    async with AsyncExitStack() as stack:
        node = await _start(stack, pki, "nat", external=("/ip4/203.0.113.7/tcp/4001",))
        assert [str(a) for a in node.addrs] == [f"/ip4/203.0.113.7/tcp/4001/p2p/{node.peer_id}"]


async def test_a_slow_consumer_holds_the_sender_back(pki: PKI) -> None:
    """Backpressure: while the receiver does not read, the sender cannot run far ahead."""
    async with AsyncExitStack() as stack:
        a = await _start(stack, pki, "a")
        b = await _start(stack, pki, "b")
        release = trio.Event()
        received = []

        async def slow(incoming) -> None:  # type: ignore[no-untyped-def]
            async for chunk in incoming:
                received.append(len(chunk))
                await release.wait()

        b.on_tensor_stream(slow)
        chunk = bytes(1 << 20)
        total = 128
        with trio.fail_after(60):
            await a.dial(b.addrs[0])
            out = await a.open_tensor_stream(b.peer_id, "slow")
            async with trio.open_nursery() as nursery:

                async def produce() -> None:
                    async with out:
                        for _ in range(total):
                            await out.send(chunk)

                nursery.start_soon(produce)
                await trio.sleep(1.0)
                held_back = out.bytes_sent
                release.set()
        # the 16 MiB muxer window plus socket and TLS buffers, far from all 128 MiB
        assert held_back <= 48 << 20, held_back
        assert sum(received) == total << 20


async def test_a_held_acknowledgement_carries_the_receivers_verdict(pki: PKI) -> None:
    """With ``hold_ack`` the receiver judges a stream after reading all of it: its refusal (or
    acceptance) is what the sender's close reports."""
    async with AsyncExitStack() as stack:
        a = await _start(stack, pki, "a")
        b = await _start(stack, pki, "b")
        received: list[bytes] = []

        async def judge(incoming) -> None:  # type: ignore[no-untyped-def]
            incoming.hold_ack = True
            data = b"".join([chunk async for chunk in incoming])
            received.append(data)
            if data.endswith(b"!"):
                await incoming.accept()
            elif data.endswith(b"?"):
                pass  # undecided: closing the stream accepts it
            else:
                await incoming.refuse("incomplete: no '!' at the end")

        b.on_tensor_stream(judge)
        with trio.fail_after(30):
            await a.dial(b.addrs[0])
            for body, fails in ((b"done!", False), (b"partial", True), (b"maybe?", False)):
                out = await a.open_tensor_stream(b.peer_id, "judged")
                if fails:
                    with pytest.raises(TensorStreamError, match="incomplete: no '!'"):
                        async with out:
                            await out.send(body)
                else:
                    async with out:
                        await out.send(body)
        assert received == [b"done!", b"partial", b"maybe?"]
