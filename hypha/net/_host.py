"""The one place a py-libp2p host is built: TCP, yamux, Hypha's mTLS, and nothing else.

- Security: only :class:`MTLSTransport`. py-libp2p's defaults (Noise, its TLS, SECIO and
  *plaintext*) are never offered: a host built without ``sec_opt`` accepted plaintext peers when
  measured here.
- Muxer: yamux only (mplex ran at ~20 MB/s here; QUIC lost data silently and is left off).
- No dial retries inside the swarm: a refused handshake is final, and the network layer retries
  only the errors that can heal (nothing listening yet, a reset) at the call site.
- No auto-connector: py-libp2p dials peers from its peerstore to keep 50+ connections (and would
  redial refused or revoked peers every cycle). Hypha nodes connect to the peers they work with.
- One connection per peer: with more allowed, py-libp2p's dialler staggers parallel dials by a
  happy-eyeballs delay, which cost ~250 ms per connection here; with one it connects in ~20 ms.
"""

from __future__ import annotations

from collections.abc import Sequence

from libp2p import new_swarm
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.swarm import Swarm
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from multiaddr import Multiaddr

from ._tls import PROTOCOL_ID as MTLS_PROTOCOL_ID
from ._tls import MTLSTransport
from ._yamux import install as install_muxer

__all__ = ["build_host", "muxer_class"]


class _NoAutoConnect(AutoConnector):
    async def maybe_connect(self) -> None:
        return None


def muxer_class(name: str = "hypha") -> type:
    """Our yamux (``"hypha"``) or py-libp2p's (``"libp2p"``); both speak /yamux/1.0.0."""
    if name == "libp2p":
        from libp2p.stream_muxer.yamux.yamux import Yamux as Libp2pYamux

        return Libp2pYamux
    from ._yamux import Yamux

    return Yamux


def build_host(transport: MTLSTransport, *, listen: Sequence[Multiaddr],
               external: Sequence[Multiaddr] = (), muxer: type | None = None) -> BasicHost:
    swarm = new_swarm(
        key_pair=transport.key_pair,
        sec_opt={MTLS_PROTOCOL_ID: transport},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): muxer or muxer_class()},
        listen_addrs=list(listen),
        enable_tcp=True,
        enable_quic=False,
        enable_websocket=False,
        retry_config=RetryConfig(max_retries=0),
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    assert isinstance(swarm, Swarm)
    # NOTE: py-libp2p 0.8.1 builds its own Yamux for /yamux/1.0.0 whatever muxer_opt says;
    # install() makes the upgrader use the class we registered (see _yamux.install).
    install_muxer(swarm.upgrader)
    swarm.auto_connector = _NoAutoConnect(swarm=swarm, auto_connect_interval=3600.0)
    return BasicHost(network=swarm, announce_addrs=list(external) or None)
