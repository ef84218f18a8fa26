"""The ``Network`` handle: what application code holds instead of a libp2p host.

One driver task owns the host. It runs the host, the Kademlia DHT and Gossipsub services in its
nursery, and executes the handle's actions (dial, DHT, publish, open a stream...) as tasks of that
nursery; a caller awaits the reply, and cancelling the caller cancels its action. Streams handed
out (RPC calls, tensor streams) are then read and written by the caller's own task, so a 256 MiB
transfer never queues behind the driver.

Usage::

    async with open_network(settings) as net:
        net.serve(Protocol("echo"), handler)
        await net.dial("/ip4/10.0.0.2/tcp/4001/p2p/12D3Koo...")
        with trio.fail_after(10):
            reply = await net.request(peer, Protocol("echo"), b"hi")
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import outcome
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIP_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIP_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from . import _rpc
from ._admission import Admission, Limits, Refusals
from ._host import build_host, muxer_class
from ._relay import Relay, is_circuit
from ._tensor_stream import PROTOCOL_ID as TENSOR_PROTOCOL_ID
from ._tensor_stream import IncomingTensorStream, OutgoingTensorStream, TensorStreamError
from ._tls import MTLSTransport, PeerRefused, TLSFiles
from ._wire import reset_quietly

__all__ = [
    "DialError",
    "Message",
    "Network",
    "NetworkClosed",
    "NetworkSettings",
    "Subscription",
    "open_network",
    "settings_from_sections",
]

logger = logging.getLogger("hypha.net")

T = TypeVar("T")

#: Namespace of every DHT key (``/hypha/...``); other keys are refused by our validator.
DHT_NAMESPACE = "hypha"
#: Largest DHT value accepted (records are small pointers; bulk data goes over streams).
MAX_DHT_VALUE = 64 << 10
#: Largest Gossipsub message accepted.
MAX_PUBSUB_MESSAGE = 1 << 20
#: Seconds the peerstore keeps addresses a peer announced for itself.
ADDR_TTL = 600
#: Seconds between attempts to reach a bootstrap peer that is not up yet (doubling, capped).
BOOTSTRAP_RETRY = (0.5, 30.0)
#: Seconds a refused tensor stream stays open after its refusal, for a sender that fits in the
#: muxer's initial window to reach ``close()`` and read why; then it is reset, which also frees a
#: sender blocked on a window that will not open (it fails with a broken stream).
REFUSED_STREAM_GRACE = 2.0

TensorStreamHandler = Callable[[IncomingTensorStream], Awaitable[None]]


class NetworkClosed(RuntimeError):
    """The network was closed; no further actions are possible."""


class DialError(ConnectionError):
    """Could not connect to a peer. ``refused`` is True when its certificate check failed."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True)
class NetworkSettings:
    """How a node joins the network (built from the ``[network]`` and ``[tls]`` sections)."""

    tls: TLSFiles
    listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)
    external: Sequence[str] = ()
    bootstrap: Sequence[str] = ()
    #: serve circuit relay v2 (the gateway does)
    relay_service: bool = False
    relay_limits: dict[str, Any] = field(default_factory=dict)
    #: reserve a slot on the bootstrap relays so that peers can dial us through them
    relay_client: bool = False
    dht_mode: str = "server"
    #: Gossipsub heartbeat in seconds (py-libp2p's default, 120 s, delays the mesh for minutes)
    gossip_heartbeat: float = 1.0
    #: Gossipsub mesh degree (peers a message is pushed to per topic). The gateway, the hub of a
    #: star, uses a mesh wide enough for every subscriber: with the usual 6 (at most 12), peers
    #: pruned from its mesh heard of a message only through gossip, seconds later or never
    #: (bench/alloc.py: 14 of 32 workers reached).
    gossip_degree: int = 6
    #: reload the CRL on SIGHUP (only possible from the main thread; roles turn it on)
    reload_on_sighup: bool = False
    #: "hypha" (ours) or "libp2p" (py-libp2p's yamux: same wire protocol, ~2x slower here)
    muxer: str = "hypha"
    #: Gossipsub topics to join only to forward them (the gateway: peers that know nobody but
    #: the gateway reach each other's topics through it; Gossipsub relays only joined topics)
    relay_topics: Sequence[str] = ()
    # Admission control of inbound streams, per peer (its certified peer ID); over a limit a
    # request is answered at once with an error naming the limit, and its handler never runs.
    # NOTE: the busiest legitimate caller, a worker running a few jobs, sends a handful of RPCs
    # per training step to its scheduler (slices, slice done, metrics, job status) and a
    # scheduler renews each lease every few seconds: tens of requests/s at most. 200/s leaves a
    # 10x margin, and is a small share of a node: with no limits, one flooder on 127.0.0.1 was
    # served ~1700 trivial RPCs/s, the server's whole core (2-core box). The burst of 400 (2 s
    # at the sustained rate) absorbs a reconnect, when a worker's jobs all report at once.
    # Measured with these defaults (tests/integration/test_flood.py): a flooder attempting
    # 10-22k requests/s gets ~100/s served, the rest refused; a peer sending one request every
    # 50 ms meanwhile sees a median of 6-19 ms and a p95 of 17-140 ms.
    #: sustained RPC requests per second accepted from one peer
    request_rate: float = 200.0
    #: requests one peer may send at once above the sustained rate (the token bucket's size)
    request_burst: int = 400
    #: RPC handlers in progress for one peer (no role runs more than a few calls to one peer
    #: at once; 32 also bounds what one peer pins: 32 x its protocols' max_request bytes)
    max_requests_per_peer: int = 32
    #: RPC handlers in progress for all peers together (bounds the memory requests in progress
    #: pin: 1024 x the 64 KiB most messages are limited to = 64 MiB; a scheduler with hundreds
    #: of workers, each with a call or two in progress, stays well below it)
    max_requests: int = 1024
    #: incoming tensor streams open at once from one peer (a worker gets at most a few per job:
    #: parameters, prefetched slices; each can pin the muxer's 16 MiB window, so 16 x 16 MiB)
    max_tensor_streams_per_peer: int = 16

    def __post_init__(self) -> None:
        for name in ("listen", "external", "bootstrap"):
            for addr in getattr(self, name):
                try:
                    Multiaddr(addr)
                except Exception as exc:  # py-multiaddr raises several types
                    raise ValueError(f"network.{name}: {addr!r} is not a multiaddr ({exc})"
                                     ) from exc
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                raise ValueError(f"network.bootstrap: {addr!r} lacks /p2p/<peer id>")
        if not (isinstance(self.gossip_degree, int) and 1 <= self.gossip_degree <= 10_000):
            raise ValueError(f"gossip_degree must be 1 .. 10000, not {self.gossip_degree!r}")
        if self.muxer not in ("hypha", "libp2p"):
            raise ValueError(f"muxer must be 'hypha' or 'libp2p', not {self.muxer!r}")
        if self.dht_mode not in ("server", "client"):
            raise ValueError(f"dht_mode must be 'server' or 'client', not {self.dht_mode!r}")
        if not (self.gossip_heartbeat > 0 and math.isfinite(self.gossip_heartbeat)):
            raise ValueError(f"gossip_heartbeat must be a positive number of seconds, not "
                             f"{self.gossip_heartbeat!r}")
        self.admission_limits()  # raises ValueError for bad admission settings

    def admission_limits(self) -> Limits:
        """The admission limits these settings describe (ValueError if they are invalid)."""
        return Limits(rate=self.request_rate, burst=self.request_burst,
                      per_peer=self.max_requests_per_peer, total=self.max_requests,
                      tensor_streams=self.max_tensor_streams_per_peer)


def settings_from_sections(network: Any, tls: Any, **kwargs: Any) -> NetworkSettings:
    """NetworkSettings from a role config's ``[network]`` and ``[tls]`` sections (hypha.config)."""
    return NetworkSettings(
        tls=TLSFiles(cert=tls.cert, key=tls.key, trust=tls.trust, crl=tuple(tls.crl)),
        listen=tuple(network.listen),
        external=tuple(network.external),
        bootstrap=tuple(network.bootstrap),
        **kwargs,
    )


@dataclass(frozen=True)
class Message:
    """A Gossipsub message as delivered: its topic, payload and the peer that published it."""

    topic: str
    data: bytes
    sender: ID


class Subscription:
    """Messages of one topic: ``async for msg in sub`` or ``await sub.get()``."""

    def __init__(self, topic: str, inner: Any, network: Network) -> None:
        self.topic = topic
        self._inner = inner
        self._network = network

    async def get(self) -> Message:
        msg = await self._inner.get()
        return Message(topic=self.topic, data=bytes(msg.data), sender=ID(msg.from_id))

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        return await self.get()

    async def unsubscribe(self) -> None:
        await self._network._call(lambda: self._network._pubsub.unsubscribe(self.topic))


class _HyphaValidator(Validator):
    """DHT records: keys under ``/hypha/``, values at most MAX_DHT_VALUE bytes, newest wins."""

    def validate(self, key: str, value: bytes) -> None:
        if not key.startswith(f"/{DHT_NAMESPACE}/"):
            raise ValueError(f"DHT key {key!r} is outside /{DHT_NAMESPACE}/")
        if len(value) > MAX_DHT_VALUE:
            raise ValueError(f"DHT value of {len(value)} bytes exceeds {MAX_DHT_VALUE}")

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


class _Action(Generic[T]):
    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.scope = trio.CancelScope()
        self.result: outcome.Outcome[T] | None = None

    async def run(self) -> None:
        with self.scope:
            self.result = await outcome.acapture(self.fn)
        if self.result is None or self.scope.cancelled_caught:
            self.result = outcome.Error(NetworkClosed("the action was cancelled"))
        self.done.set()


class Network:
    """A node's handle on the Hypha network. Build it with :func:`open_network`."""

    def __init__(self, settings: NetworkSettings) -> None:
        self.settings = settings
        self.transport = MTLSTransport(settings.tls)
        self.peer_id: ID = self.transport.peer_id
        self._host: BasicHost = build_host(
            self.transport,
            listen=[Multiaddr(a) for a in settings.listen],
            external=[Multiaddr(a) for a in settings.external],
            muxer=muxer_class(settings.muxer),
        )
        self._dht = KadDHT(
            self._host,
            DHTMode.SERVER if settings.dht_mode == "server" else DHTMode.CLIENT,
            protocol_prefix=TProtocol(f"/{DHT_NAMESPACE}"),
        )
        self._dht.register_validator(DHT_NAMESPACE, _HyphaValidator())
        degree = settings.gossip_degree
        self._gossip = GossipSub(
            protocols=[GOSSIP_V11, GOSSIP_V10], degree=degree, degree_low=min(4, degree),
            degree_high=2 * degree,
            heartbeat_interval=settings.gossip_heartbeat,  # type: ignore[arg-type]
            heartbeat_initial_delay=0.1, adaptive_gossip_enabled=False,
        )
        self._pubsub = Pubsub(self._host, self._gossip, strict_signing=True)
        self._send_action, self._receive_action = trio.open_memory_channel[_Action[Any]](64)
        self._closed = False
        self._tensor_handler: TensorStreamHandler | None = None
        self._host.set_stream_handler(TENSOR_PROTOCOL_ID, _guarded(self._on_tensor_stream))
        self._relay = Relay(self._host, serve_hop=settings.relay_service,
                            client=settings.relay_client, limits=dict(settings.relay_limits))
        self._nursery: trio.Nursery | None = None
        self._stop = trio.CancelScope()
        self._admission = Admission(settings.admission_limits())
        self._refusals = Refusals(logging.getLogger("hypha.net.refused"))
        #: inbound requests and streams this node refused or failed, by reason (see serve and
        #: on_tensor_stream); hypha.metrics.network_metrics exports them
        self.refusals: Counter[str] = self._refusals.counts
        self.transport.refusals = self.refusals  # refused handshakes count here too

    # -- lifecycle ----------------------------------------------------------------------------
    async def _drive(self, *, task_status: Any = trio.TASK_STATUS_IGNORED
                     ) -> None:
        with self._stop:
            await self._drive_host(task_status)

    async def _drive_host(self, task_status: Any) -> None:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(
                self._host.run(listen_addrs=[Multiaddr(a) for a in self.settings.listen]))
            # Pubsub before any connection: its notifee blocks on an unbuffered channel otherwise
            await stack.enter_async_context(background_trio_service(self._pubsub))
            await stack.enter_async_context(background_trio_service(self._gossip))
            await self._pubsub.wait_until_ready()
            await stack.enter_async_context(background_trio_service(self._dht))
            await stack.enter_async_context(background_trio_service(self._relay.protocol))
            await self._relay.protocol.event_started.wait()
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._nursery = nursery
            if self.settings.reload_on_sighup and threading.current_thread() is \
                    threading.main_thread():
                await nursery.start(self._watch_sighup)
            for addr in self.settings.bootstrap:
                nursery.start_soon(self._bootstrap, addr)
            for topic in self.settings.relay_topics:
                nursery.start_soon(self._forward_only, await self._pubsub.subscribe(topic))
            logger.info("node %s listening on %s", self.peer_id,
                        ", ".join(str(a) for a in self.addrs) or "nothing")
            task_status.started()
            async for action in self._receive_action:
                nursery.start_soon(action.run)
            nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Stop the node: no new actions, the host and its connections close."""
        if not self._closed:
            self._closed = True
            await self._send_action.aclose()
        self._stop.cancel()

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise NetworkClosed("the network is closed")
        action: _Action[T] = _Action(fn)
        try:
            await self._send_action.send(action)
        except trio.ClosedResourceError:
            raise NetworkClosed("the network is closed") from None
        try:
            await action.done.wait()
        except BaseException:
            action.scope.cancel()
            raise
        assert action.result is not None
        return action.result.unwrap()

    # -- peers ----------------------------------------------------------------------------------
    @property
    def addrs(self) -> list[Multiaddr]:
        """Our addresses, each ending in /p2p/<our peer id> (what others bootstrap from)."""
        return list(self._host.get_addrs())

    def connected_peers(self) -> list[ID]:
        return list(self._host.get_connected_peers())

    @property
    def relay_addrs(self) -> list[Multiaddr]:
        """Circuit addresses reserved on relays (``relay_client``): how NATed nodes are dialled."""
        return list(self._relay.reserved.values())

    def relay_reservations(self) -> list[ID]:
        """Peers holding a reservation on this node's relay (the gateway's)."""
        manager = getattr(self._relay.protocol, "resource_manager", None)
        return list(getattr(manager, "_reservations", {}))

    async def dial(self, addr: str | Multiaddr | PeerInfo) -> ID:
        """Connect to a peer at a multiaddr ending in /p2p/<id>; returns its peer ID.

        ``<relay addr>/p2p-circuit/p2p/<id>`` goes through a circuit relay (the gateway).
        """
        if not isinstance(addr, PeerInfo) and is_circuit(addr):
            return await self._dial_circuit(Multiaddr(str(addr)))
        info = addr if isinstance(addr, PeerInfo) else _peer_info(addr)

        async def connect() -> ID:
            try:
                await self._host.connect(info)
            except Exception as exc:  # py-libp2p raises many types; classify
                refusal = _find_refusal(exc)
                if refusal is not None:
                    raise DialError(f"{info.peer_id} refused: {refusal.reason}",
                                    refused=True) from exc
                raise DialError(f"cannot connect to {info.peer_id} at "
                                f"{', '.join(map(str, info.addrs))}: {_root_cause(exc)}") from exc
            return info.peer_id

        return await self._call(connect)

    async def _dial_circuit(self, addr: Multiaddr) -> ID:
        async def connect() -> ID:
            try:
                return await self._relay.dial(addr)
            except Exception as exc:  # classify py-libp2p's errors
                refusal = _find_refusal(exc)
                if refusal is not None:
                    raise DialError(f"{addr} refused: {refusal.reason}", refused=True) from exc
                raise DialError(f"cannot connect through the relay at {addr}: "
                                f"{_root_cause(exc)}") from exc

        return await self._call(connect)

    async def disconnect(self, peer: ID) -> None:
        await self._call(lambda: self._host.disconnect(peer))

    async def _bootstrap(self, addr: str) -> None:
        delay, cap = BOOTSTRAP_RETRY
        info = _peer_info(addr)
        while True:
            try:
                await self.dial(info)
            except DialError as exc:
                if exc.refused:
                    logger.error("bootstrap peer %s refused us (not retrying): %s", addr, exc)
                    return
                logger.info("bootstrap peer %s not reachable yet (%s); retrying in %.1f s",
                            addr, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            except NetworkClosed:
                return
            await self._dht.add_peer(info.peer_id)
            logger.info("bootstrapped from %s", addr)
            if self.settings.relay_client:
                await self._reserve(info)
            return

    async def _reserve(self, info: PeerInfo) -> None:
        assert self._nursery is not None
        nursery = self._nursery
        try:
            await self._call(lambda: self._relay.reserve(info.peer_id, info.addrs[0], nursery))
        except Exception as exc:  # a relay without a slot is logged, not fatal
            logger.error("no relay reservation on %s: %s", info.peer_id, _root_cause(exc))

    async def _forward_only(self, subscription: Any) -> None:
        while True:  # joined for forwarding: what arrives here is not ours to handle
            await subscription.get()

    async def reload_crl(self) -> list[ID]:
        """Re-read the CRL files; close the connections of peers they revoke. Returns them."""

        async def reload() -> list[ID]:
            revoked = self.transport.reload_crl()
            peers = []
            for session in revoked:
                peer = session.get_remote_peer()
                logger.warning("closing the connection of revoked peer %s (%s)", peer,
                               session.remote_certificate.subject.rfc4514_string())
                await session.close()
                peers.append(peer)
            for peer in set(peers):
                try:
                    await self._host.disconnect(peer)
                except Exception as exc:  # the session is closed already
                    logger.debug("disconnecting %s: %s", peer, exc)
            return peers

        return await self._call(reload)

    async def _watch_sighup(self, *, task_status: Any = trio.TASK_STATUS_IGNORED
                            ) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                logger.info("SIGHUP: reloading the CRL")
                try:
                    await self.reload_crl()
                except ValueError as exc:
                    logger.error("CRL reload failed, the previous CRL stays in force: %s", exc)

    # -- request/response ----------------------------------------------------------------------
    def serve(self, protocol: _rpc.Protocol, handler: _rpc.Handler) -> None:
        """Answer ``protocol`` requests with ``handler(peer, request) -> response``.

        A request is admitted before any of it is read: over the peer's rate (``request_rate``,
        ``request_burst``), its handlers in progress (``max_requests_per_peer``) or the node's
        (``max_requests``) it is answered with an error naming the limit, and the connection
        stays. Each refusal is counted in ``refusals`` and logged (rate-limited per peer).
        """

        admission, refusals = self._admission, self._refusals

        async def on_stream(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            refusal = admission.admit_request(peer)
            if refusal is not None:
                refusals.record(refusal.reason, peer, f"{protocol.id} from {peer}: refused "
                                f"unread: {refusal.message}")
                await _rpc.refuse(stream, refusal.message)
                return
            try:
                await _rpc.serve(stream, protocol, handler, peer, refusals)
            finally:
                admission.release_request(peer)

        self._host.set_stream_handler(protocol.id, _guarded(on_stream))

    async def request(self, peer: ID, protocol: _rpc.Protocol, payload: bytes) -> bytes:
        """One call; bound it with a cancel scope at the call site."""
        stream = await self._open_stream(peer, protocol.id)
        return await _rpc.call(stream, protocol, payload)

    async def _open_stream(self, peer: ID, protocol: TProtocol) -> INetStream:
        async def open_stream() -> INetStream:
            try:
                if peer not in self._host.get_connected_peers() and not self._known_addrs(peer):
                    # NOTE: a peer we only heard of (e.g. a Gossipsub publisher relayed by the
                    # gateway): look its addresses up in the DHT before dialling.
                    found = await self._dht.find_peer(peer)
                    if found is None or not found.addrs:
                        raise DialError(f"cannot reach {peer}: not connected, and the DHT "
                                        "knows no address for it")
                    await self._host.connect(found)
                return await self._host.new_stream(peer, [protocol])
            except DialError:
                raise
            except Exception as exc:  # classify py-libp2p's errors
                refusal = _find_refusal(exc)
                if refusal is not None:
                    raise DialError(f"{peer} refused: {refusal.reason}", refused=True) from exc
                raise DialError(f"cannot open {protocol} to {peer}: {_root_cause(exc)}"
                                ) from exc

        return await self._call(open_stream)

    def learn_addrs(self, peer: ID, addrs: Sequence[str]) -> None:
        """Remember addresses a peer announced for itself (e.g. in a signed advertisement).

        A later dial still verifies the peer's certificate against ``peer``; addresses that do
        not parse, or that name another peer, are ignored.
        """
        parsed = []
        for text in addrs:
            try:
                addr = Multiaddr(text)
            except Exception:  # py-multiaddr raises several types
                continue
            if "/p2p/" in text:
                try:
                    info = info_from_p2p_addr(addr)
                except Exception:
                    continue
                if info.peer_id != peer or "/p2p-circuit" in text:
                    continue
                parsed.extend(info.addrs)
            else:
                parsed.append(addr)
        if parsed:
            self._host.get_peerstore().add_addrs(peer, parsed, ADDR_TTL)

    def _known_addrs(self, peer: ID) -> list[Multiaddr]:
        try:
            return list(self._host.get_peerstore().addrs(peer))
        except PeerStoreError:
            return []

    # -- tensor streams --------------------------------------------------------------------------
    def on_tensor_stream(self, handler: TensorStreamHandler) -> None:
        """``handler(incoming)`` consumes each incoming tensor stream (``async for chunk in ...``).

        A stream the handler leaves unread is reset; the sender's ``close`` then fails. A peer
        with ``max_tensor_streams_per_peer`` streams open has more refused before they are read.
        """
        self._tensor_handler = handler

    async def open_tensor_stream(self, peer: ID, name: str,
                                 meta: dict[str, Any] | None = None) -> OutgoingTensorStream:
        stream = await self._open_stream(peer, TENSOR_PROTOCOL_ID)
        out = OutgoingTensorStream(stream, peer, name)
        try:
            await out.start(meta or {})
        except BaseException:
            await out.abort()
            raise
        return out

    async def _on_tensor_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        incoming = IncomingTensorStream(stream, peer)
        refusal = self._admission.admit_tensor_stream(peer)
        if refusal is not None:
            self._refusals.record(refusal.reason, peer, f"tensor stream from {peer}: refused "
                                  f"unread: {refusal.message}")
            await incoming.refuse(refusal.message)
            await trio.sleep(REFUSED_STREAM_GRACE)
            await reset_quietly(stream)
            return
        try:
            await self._receive_tensor_stream(incoming)
        finally:
            self._admission.release_tensor_stream(peer)
            await incoming.aclose()

    async def _receive_tensor_stream(self, incoming: IncomingTensorStream) -> None:
        peer = incoming.peer
        try:
            await incoming.read_header()
        except trio.TooSlowError:
            self._refusals.record("tensor-stream-slow", peer, f"tensor stream from {peer}: no "
                                  "header in time; dropped")
            return
        except (TensorStreamError, ConnectionError) as exc:
            self._refusals.record("tensor-stream-malformed", peer, f"tensor stream from {peer}: "
                                  f"bad header; dropped: {exc}")
            return
        if self._tensor_handler is None:
            self._refusals.record("tensor-stream-unwanted", peer, f"tensor stream "
                                  f"{incoming.name!r} from {peer}: this node accepts none")
            await incoming.refuse("this node accepts no tensor streams")
            return
        try:
            await self._tensor_handler(incoming)
        except TensorStreamError as exc:
            self._refusals.record("tensor-stream-failed", peer, f"{exc}")
        except Exception:
            self._refusals.record("tensor-handler-failed", peer, f"the tensor-stream handler "
                                  f"failed on {incoming.name!r} from {peer}", level=logging.ERROR,
                                  exc_info=True)

    # -- DHT ---------------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes) -> None:
        """Store a record under ``/hypha/...`` on the closest DHT peers."""
        _HyphaValidator().validate(key, value)
        await self._call(lambda: self._dht.put_value(key, value))

    async def get(self, key: str) -> bytes | None:
        return await self._call(lambda: self._dht.get_value(key))

    async def provide(self, key: str) -> bool:
        """Announce that this node provides ``key`` (e.g. a dataset name)."""
        return await self._call(lambda: self._dht.provide(key))

    async def find_providers(self, key: str, count: int = 20) -> list[PeerInfo]:
        return await self._call(lambda: self._dht.find_providers(key, count))

    async def find_peer(self, peer: ID) -> PeerInfo | None:
        return await self._call(lambda: self._dht.find_peer(peer))

    # -- pub/sub -------------------------------------------------------------------------------
    async def subscribe(self, topic: str) -> Subscription:
        inner = await self._call(lambda: self._pubsub.subscribe(topic))
        return Subscription(topic, inner, self)

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > MAX_PUBSUB_MESSAGE:
            raise ValueError(f"message of {len(data)} bytes exceeds {MAX_PUBSUB_MESSAGE}")
        await self._call(lambda: self._pubsub.publish(topic, data))


@asynccontextmanager
async def open_network(settings: NetworkSettings) -> AsyncIterator[Network]:
    """Start a node; on exit, stop it and close every connection."""
    network = Network(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(network._drive)
        try:
            yield network
        finally:
            await network.aclose()
            nursery.cancel_scope.cancel()


def _guarded(handler: Callable[[INetStream], Awaitable[None]]
             ) -> Callable[[INetStream], Awaitable[None]]:
    """A stream handler that cannot take the node down.

    NOTE: in py-libp2p 0.8.1 an exception escaping a stream handler propagates through the
    connection's tasks to ``host.run()`` and ends the process. Whatever a peer sends, we reset
    that one stream and log.
    """

    async def guarded(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception:
            logger.exception("stream handler for %s failed; stream reset", stream.get_protocol())
            await reset_quietly(stream)

    return guarded


def _peer_info(addr: str | Multiaddr) -> PeerInfo:
    try:
        return info_from_p2p_addr(Multiaddr(addr) if isinstance(addr, str) else addr)
    except Exception as exc:  # py-multiaddr/libp2p raise several types
        raise ValueError(f"{addr!s} is not a peer address (expected .../p2p/<peer id>): {exc}"
                         ) from exc


def _walk(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        for attr in ("exceptions", "errors"):  # exception groups; py-libp2p's MultiError
            inner = getattr(e, attr, None)
            if isinstance(inner, list | tuple):
                todo.extend(x for x in inner if isinstance(x, BaseException))
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                todo.append(nxt)
    return seen


def _find_refusal(exc: BaseException) -> PeerRefused | None:
    for e in _walk(exc):
        if isinstance(e, PeerRefused):
            return e
    return None


def _root_cause(exc: BaseException) -> str:
    chain = _walk(exc)
    last = chain[-1]
    return f"{last}" or type(last).__name__
