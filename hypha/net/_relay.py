"""Circuit relay v2: the gateway relays for peers that have no reachable address.

Every node speaks the relay's *stop* side (it can accept a connection relayed to it) and can dial
``<relay addr>/p2p-circuit/p2p/<peer>`` addresses. The gateway also runs the *hop* side (it relays),
bounded by its limits. A node with ``relay_client`` reserves a slot on each bootstrap relay, so
that others can reach it at ``<relay>/p2p-circuit/p2p/<its id>``.

A relayed connection is still secured end to end by our mTLS: the relay sees only ciphertext, and
the two peers verify each other's certificates exactly as on a direct connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from multiaddr import Multiaddr

__all__ = ["DEFAULT_LIMITS", "Relay", "is_circuit"]

logger = logging.getLogger("hypha.net.relay")

#: What the gateway grants by default (the ``[relay]`` config section overrides these).
DEFAULT_LIMITS: dict[str, int] = {
    "duration": 24 * 3600,  # seconds a relayed connection may live
    "data": 1 << 62,  # bytes a relayed connection may carry ("unlimited")
    "max_circuit_conns": 64,
    "max_reservations": 128,
    "reservation_ttl": 3600,
}


def is_circuit(addr: Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


@dataclass
class Relay:
    """The relay protocol of one host: stop side always, hop side on the gateway."""

    host: IHost
    serve_hop: bool
    client: bool
    limits: dict[str, Any] = field(default_factory=dict)
    protocol: CircuitV2Protocol = field(init=False)
    transport: CircuitV2Transport = field(init=False)
    reserved: dict[ID, Multiaddr] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.limits) - set(DEFAULT_LIMITS)
        if unknown:
            raise ValueError(f"unknown relay limit(s) {sorted(unknown)}; known: "
                             f"{sorted(DEFAULT_LIMITS)}")
        values = {**DEFAULT_LIMITS, **self.limits}
        for key, value in values.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"relay limit {key} must be a positive integer, not {value!r}")
        self.protocol = CircuitV2Protocol(self.host, limits=RelayLimits(**values),
                                          allow_hop=self.serve_hop)
        roles = RelayRole.STOP | (RelayRole.CLIENT if self.client else RelayRole(0))
        if self.serve_hop:
            roles |= RelayRole.HOP
        self.transport = CircuitV2Transport(self.host, self.protocol, RelayConfig(roles=roles))

    async def dial(self, addr: Multiaddr) -> ID:
        """Connect through a relay; the connection joins the swarm like a direct one."""
        conn = await self.transport.dial(addr)
        return conn.muxed_conn.peer_id

    async def reserve(self, relay: ID, relay_addr: Multiaddr, nursery: trio.Nursery) -> Multiaddr:
        """Reserve a slot on ``relay``; returns the circuit address others can dial us at."""
        stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
        try:
            ok = await self.transport.reserve(stream, relay, nursery)
        finally:
            await stream.close()
        if not ok:
            raise ConnectionError(f"relay {relay} refused a reservation")
        base = str(relay_addr)
        if f"/p2p/{relay}" not in base:
            base = f"{base}/p2p/{relay}"
        circuit = Multiaddr(f"{base}/p2p-circuit/p2p/{self.host.get_id()}")
        self.reserved[relay] = circuit
        logger.info("reserved a relay slot: reachable at %s", circuit)
        return circuit
