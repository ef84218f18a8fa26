"""How fast do bytes move between two nodes: Hypha's tensor stream against its ceilings.

Two processes on 127.0.0.1 (three for the relay) move ``--size`` bytes (default 256 MiB), in one
invocation, for each of:

* ``tcp``: plain trio TCP (``SocketStream.send_all`` / ``receive_some``), the ceiling;
* ``tls``: trio TCP + TLS 1.3 (``trio.SSLStream``, both sides presenting the same Ed25519 node
  certificates Hypha uses, 64 KiB reads: its fastest size here), the plain encrypted ceiling;
* ``tls (hypha channel)``: the same over Hypha's own TLS channel (``hypha.net._tls._Channel``:
  ``ssl.SSLObject`` on memory BIOs straight on the socket), i.e. our stack minus the muxer;
* ``hypha x1``: our tensor stream (``Network.open_tensor_stream``) over our mTLS + our yamux,
  one stream; ``hypha x4``: four concurrent streams of size/4 each;
* ``hypha x1 (libp2p yamux)``: the same with py-libp2p 0.8.1's own yamux, to show what ours buys;
* ``py-libp2p noise``: the peer: py-libp2p 0.8.1's own stack as its docs build it (Noise, its
  yamux, ``new_host``), one raw stream, no checksum (benchmark only: Hypha never offers Noise);
* ``relay``: the tensor stream from a sender to a receiver that has no listening address,
  through a gateway process running circuit relay v2 (end-to-end mTLS inside the circuit).

Every case sends 4 MiB chunks and is timed from the first byte sent until the sender holds the
receiver's acknowledgement that every byte arrived (for the tensor stream: the CRC-32 matched).
MB/s is 10^6 bytes per second. CPU is user+system seconds each process spent during the transfer
(``getrusage``), so "cpu s / GB" shows where a 2-core machine's time goes. "setup" is the time to
connect (TCP connect; + TLS handshake; Hypha ``dial``: TCP + multistream + mTLS with verdicts +
yamux). Cases run round-robin ``--repeats`` times (default 3) with fresh processes; the table
gives medians.

    python bench/transport.py                 # 256 MiB, 3 repeats
    python bench/transport.py --quick         # 64 MiB, 1 repeat
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 4 << 20
CASES = ("tcp", "tls", "tls (hypha channel)", "hypha x1", "hypha x4", "hypha x1 (libp2p yamux)",
         "py-libp2p noise", "relay")
SOCKET_CASES = ("tcp", "tls", "tls (hypha channel)")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- the PKI both ends use ---------------------------------------------------------------------


def _make_pki(directory: Path) -> dict[str, Any]:
    from hypha.certutil import (
        create_crl,
        create_node,
        create_org,
        create_root,
        write_certificates,
        write_crl,
        write_private_key,
    )

    root = create_root("bench-root")
    org = create_org(root, "bench-org")
    write_certificates(directory / "root.pem", [root.cert])
    write_crl(directory / "org.crl.pem", create_crl(org))
    out: dict[str, Any] = {"dir": str(directory)}
    for name in ("sender", "receiver", "gateway"):
        node = create_node(org, name)
        write_certificates(directory / f"{name}.pem", [node.cert, *node.chain])
        write_private_key(directory / f"{name}.key", node.key)
    return out


def _tls_files(pki: dict[str, Any], name: str):  # type: ignore[no-untyped-def]
    from hypha.net import TLSFiles

    d = Path(pki["dir"])
    return TLSFiles(cert=d / f"{name}.pem", key=d / f"{name}.key", trust=d / "root.pem",
                    crl=(d / "org.crl.pem",))


def _ssl_context(pki: dict[str, Any], name: str, *, server: bool):  # type: ignore[no-untyped-def]
    import ssl

    d = Path(pki["dir"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(d / f"{name}.pem", d / f"{name}.key")
    ctx.load_verify_locations(cafile=d / "root.pem")
    return ctx


# --- plain TCP and TLS ------------------------------------------------------------------------


class _ChannelStream:
    """Hypha's TLS channel with the few stream methods the socket cases use."""

    def __init__(self, stream: Any, ctx: Any, *, server_side: bool) -> None:
        from hypha.net._tls import _Channel

        self._channel = _Channel.wrap(stream, ctx, server_side=server_side)

    async def do_handshake(self) -> None:
        await self._channel.handshake()

    async def send_all(self, data: Any) -> None:
        await self._channel.write(data)

    async def receive_some(self, n: int) -> bytes:
        return await self._channel.read(n)

    async def aclose(self) -> None:
        await self._channel.aclose()


def _socket_receiver(case: str, pki: dict[str, Any], size: int, conn: Any) -> None:
    import trio

    if case == "tls (hypha channel)":
        import hypha.net._tls  # noqa: F401  (imports libp2p: ~1 s, not part of the set-up time)

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        conn.send(listeners[0].socket.getsockname()[1])
        stream: Any = await listeners[0].accept()
        ctx = _ssl_context(pki, "receiver", server=True)
        if case == "tls":
            stream = trio.SSLStream(stream, ctx, server_side=True)
            await stream.do_handshake()
        elif case == "tls (hypha channel)":
            stream = _ChannelStream(stream, ctx, server_side=True)
            await stream.do_handshake()
        cpu0 = _cpu()
        got = 0
        while got < size:
            data = await stream.receive_some(64 << 10)
            if not data:
                raise RuntimeError(f"stream ended after {got} of {size} bytes")
            got += len(data)
        await stream.send_all(b"k")
        conn.send({"cpu": _cpu() - cpu0})
        await stream.aclose()

    trio.run(main)


def _socket_sender(case: str, pki: dict[str, Any], size: int, port: int, conn: Any) -> None:
    import trio

    payload = os.urandom(size)
    if case == "tls (hypha channel)":
        import hypha.net._tls  # noqa: F401  (imports libp2p: ~1 s, not part of the set-up time)

    async def main() -> None:
        t0 = time.perf_counter()
        stream: Any = await trio.open_tcp_stream("127.0.0.1", port)
        ctx = _ssl_context(pki, "sender", server=False)
        if case == "tls":
            stream = trio.SSLStream(stream, ctx, server_hostname=None)
            await stream.do_handshake()
        elif case == "tls (hypha channel)":
            stream = _ChannelStream(stream, ctx, server_side=False)
            await stream.do_handshake()
        setup = time.perf_counter() - t0
        cpu0, t1 = _cpu(), time.perf_counter()
        view = memoryview(payload)
        for start in range(0, size, CHUNK):
            await stream.send_all(view[start:start + CHUNK])
        if await stream.receive_some(1) != b"k":
            raise RuntimeError("no acknowledgement")
        conn.send({"seconds": time.perf_counter() - t1, "setup": setup, "cpu": _cpu() - cpu0})
        await stream.aclose()

    trio.run(main)


# --- Hypha ------------------------------------------------------------------------------------


def _settings(pki: dict[str, Any], name: str, **kwargs: Any):  # type: ignore[no-untyped-def]
    from hypha.net import NetworkSettings

    kwargs.setdefault("listen", ("/ip4/127.0.0.1/tcp/0",))
    return NetworkSettings(tls=_tls_files(pki, name), **kwargs)


def _gateway(pki: dict[str, Any], conn: Any) -> None:
    import trio

    from hypha.net import open_network

    async def main() -> None:
        async with open_network(_settings(pki, "gateway", relay_service=True)) as net:
            conn.send(str(net.addrs[0]))
            cpu0 = _cpu()
            await trio.to_thread.run_sync(conn.recv)  # "stop"
            conn.send({"cpu": _cpu() - cpu0})

    trio.run(main)


def _hypha_receiver(case: str, pki: dict[str, Any], size: int, conn: Any,
                    gateway: str | None) -> None:
    import trio

    from hypha.net import open_network

    streams = 4 if case == "hypha x4" else 1

    async def main() -> None:
        kwargs: dict[str, Any] = {}
        if case == "relay":
            kwargs = {"listen": (), "bootstrap": (gateway,), "relay_client": True}
        if "libp2p yamux" in case:
            kwargs["muxer"] = "libp2p"
        async with open_network(_settings(pki, "receiver", **kwargs)) as net:
            done = trio.Event()
            got = [0]
            cpu = [0.0]

            async def on_stream(incoming: Any) -> None:
                if got[0] == 0:
                    cpu[0] = _cpu()
                async for chunk in incoming:
                    got[0] += len(chunk)
                if got[0] >= size:
                    done.set()

            net.on_tensor_stream(on_stream)
            if case == "relay":
                with trio.fail_after(30):
                    while not net.relay_addrs:
                        await trio.sleep(0.01)
                conn.send(str(net.relay_addrs[0]))
            else:
                conn.send(str(net.addrs[0]))
            await done.wait()
            conn.send({"cpu": _cpu() - cpu[0], "streams": streams})
            await trio.to_thread.run_sync(conn.recv)  # the sender is done with us

    trio.run(main)


def _hypha_sender(case: str, pki: dict[str, Any], size: int, addr: str, conn: Any) -> None:
    import trio

    from hypha.net import open_network

    payload = os.urandom(size)
    streams = 4 if case == "hypha x4" else 1
    per_stream = size // streams

    async def send(net: Any, peer: Any, index: int) -> None:
        view = memoryview(payload)[index * per_stream:(index + 1) * per_stream]
        async with await net.open_tensor_stream(peer, f"bench-{index}") as out:
            for start in range(0, len(view), CHUNK):
                await out.send(view[start:start + CHUNK])

    async def main() -> None:
        kwargs: dict[str, Any] = {}
        if "libp2p yamux" in case:
            kwargs["muxer"] = "libp2p"
        async with open_network(_settings(pki, "sender", **kwargs)) as net:
            t0 = time.perf_counter()
            peer = await net.dial(addr)
            setup = time.perf_counter() - t0
            cpu0, t1 = _cpu(), time.perf_counter()
            async with trio.open_nursery() as nursery:
                for index in range(streams):
                    nursery.start_soon(send, net, peer, index)
            conn.send({"seconds": time.perf_counter() - t1, "setup": setup,
                       "cpu": _cpu() - cpu0})

    trio.run(main)


# --- py-libp2p's own stack (the peer) ----------------------------------------------------------


def _noise_host():  # type: ignore[no-untyped-def]
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID, Transport
    from multiaddr import Multiaddr

    pair = create_new_key_pair()
    return new_host(key_pair=pair, sec_opt={
        PROTOCOL_ID: Transport(pair, noise_privkey=x25519_pair().private_key)},
        muxer_preference="YAMUX", listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")],
        connection_config=ConnectionConfig(max_connections_per_peer=1))


_BENCH_PROTOCOL = "/bench/bytes/1"


def _noise_receiver(size: int, conn: Any) -> None:
    import trio
    from libp2p.custom_types import TProtocol
    from multiaddr import Multiaddr

    async def main() -> None:
        host = _noise_host()
        done = trio.Event()
        cpu = [0.0]

        async def handler(stream: Any) -> None:
            cpu[0] = _cpu()
            got = 0
            while got < size:
                got += len(await stream.read(1 << 20))
            await stream.write(b"k")
            cpu[0] = _cpu() - cpu[0]
            done.set()

        host.set_stream_handler(TProtocol(_BENCH_PROTOCOL), handler)
        async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            conn.send(str(host.get_addrs()[0]))
            await done.wait()
            conn.send({"cpu": cpu[0]})
            await trio.to_thread.run_sync(conn.recv)

    trio.run(main)


def _noise_sender(size: int, addr: str, conn: Any) -> None:
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    payload = os.urandom(size)

    async def main() -> None:
        host = _noise_host()
        async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(Multiaddr(addr))
            t0 = time.perf_counter()
            await host.connect(info)
            setup = time.perf_counter() - t0
            cpu0, t1 = _cpu(), time.perf_counter()
            stream = await host.new_stream(info.peer_id, [TProtocol(_BENCH_PROTOCOL)])
            view = memoryview(payload)
            for start in range(0, size, CHUNK):
                await stream.write(bytes(view[start:start + CHUNK]))
            if await stream.read(1) != b"k":
                raise RuntimeError("no acknowledgement")
            conn.send({"seconds": time.perf_counter() - t1, "setup": setup,
                       "cpu": _cpu() - cpu0})

    trio.run(main)


# --- driver -----------------------------------------------------------------------------------


def run_case(case: str, pki: dict[str, Any], size: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    procs = []
    gw_conn = None
    try:
        gateway_addr = None
        if case == "relay":
            gw_conn, gw_child = ctx.Pipe()
            g = ctx.Process(target=_gateway, args=(pki, gw_child), daemon=True)
            g.start()
            procs.append(g)
            gateway_addr = gw_conn.recv()
        r_conn, r_child = ctx.Pipe()
        s_conn, s_child = ctx.Pipe()
        if case in SOCKET_CASES:
            r = ctx.Process(target=_socket_receiver, args=(case, pki, size, r_child), daemon=True)
        elif case == "py-libp2p noise":
            r = ctx.Process(target=_noise_receiver, args=(size, r_child), daemon=True)
        else:
            r = ctx.Process(target=_hypha_receiver, args=(case, pki, size, r_child, gateway_addr),
                            daemon=True)
        r.start()
        procs.append(r)
        if not r_conn.poll(120):
            raise RuntimeError(f"{case}: the receiver did not start")
        where = r_conn.recv()
        if case in SOCKET_CASES:
            s = ctx.Process(target=_socket_sender, args=(case, pki, size, where, s_child),
                            daemon=True)
        elif case == "py-libp2p noise":
            s = ctx.Process(target=_noise_sender, args=(size, where, s_child), daemon=True)
        else:
            s = ctx.Process(target=_hypha_sender, args=(case, pki, size, where, s_child),
                            daemon=True)
        s.start()
        procs.append(s)
        if not s_conn.poll(300):
            raise RuntimeError(f"{case}: the sender did not finish")
        sent = s_conn.recv()
        if not r_conn.poll(60):
            raise RuntimeError(f"{case}: the receiver did not report")
        received = r_conn.recv()
        if case not in SOCKET_CASES:
            r_conn.send("stop")
        row = {
            "case": case,
            "MB/s": size / sent["seconds"] / 1e6,
            "seconds": sent["seconds"],
            "setup ms": sent["setup"] * 1e3,
            "sender cpu s": sent["cpu"],
            "receiver cpu s": received["cpu"],
        }
        if gw_conn is not None:
            gw_conn.send("stop")
            if gw_conn.poll(30):
                row["relay cpu s"] = gw_conn.recv()["cpu"]
        return row
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def main(argv: list[str] | None = None) -> None:
    from bench._harness import Column, Recorder, add_common_args, sig

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256 << 20, help="bytes per transfer")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of: {', '.join(CASES)}")
    add_common_args(parser)
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    size = (64 << 20) if args.quick else args.size
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)

    rec = Recorder("transport", None if args.no_save else args.results_dir)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        pki = _make_pki(Path(tmp))
        for rep in range(repeats):
            for case in cases:
                row = run_case(case, pki, size)
                rows[case].append(row)
                print(f"  [{rep + 1}/{repeats}] {case:26s} {row['MB/s']:8.1f} MB/s  "
                      f"setup {row['setup ms']:6.1f} ms", flush=True)

    table = rec.table("throughput", [
        Column("case", "case", None, 24), Column("MB/s", "MB/s", sig(4), 7),
        Column("vs tls", "vs tls", sig(3), 6), Column("setup ms", "setup ms", sig(3), 8),
        Column("sender cpu s/GB", "sender cpu s/GB", sig(3), 15),
        Column("receiver cpu s/GB", "receiver cpu s/GB", sig(3), 17),
        Column("relay cpu s/GB", "relay cpu s/GB", sig(3), 14),
    ], title=f"{size >> 20} MiB, 4 MiB chunks, medians of {repeats} runs (fresh processes)")
    table.print_header()
    tls = statistics.median(r["MB/s"] for r in rows["tls"]) if rows.get("tls") else None
    gb = size / 1e9
    for case in cases:
        rs = rows[case]
        mbs = statistics.median(r["MB/s"] for r in rs)
        relay = [r["relay cpu s"] for r in rs if "relay cpu s" in r]
        table.add(**{
            "case": case, "MB/s": mbs, "vs tls": (mbs / tls) if tls else None,
            "setup ms": statistics.median(r["setup ms"] for r in rs),
            "sender cpu s/GB": statistics.median(r["sender cpu s"] for r in rs) / gb,
            "receiver cpu s/GB": statistics.median(r["receiver cpu s"] for r in rs) / gb,
            "relay cpu s/GB": statistics.median(relay) / gb if relay else None,
        })
    rec.note(f"{os.cpu_count()} cores; sender and receiver (and the relay) share them.")
    rec.save()


if __name__ == "__main__":
    main()
