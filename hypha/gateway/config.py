"""The gateway's configuration schema: [network], [tls], [log] and [relay]."""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from hypha.config import (
    InvalidSetting,
    LogSection,
    MetricsSection,
    NetworkSection,
    TLSSection,
    section,
    setting,
)

__all__ = ["GatewayConfig", "GatewayNetworkSection", "RelaySection"]


@dataclass(frozen=True)
class GatewayNetworkSection(NetworkSection):
    """libp2p addresses: a gateway listens on a fixed, well-known port so others can bootstrap."""

    listen: list[str] = setting(
        ["/ip4/0.0.0.0/tcp/4001"], "multiaddrs to listen on", flag="--listen", metavar="MULTIADDR"
    )


@dataclass(frozen=True)
class RelaySection:
    """Circuit relay v2: lets peers behind NAT be reached through this gateway."""

    enabled: bool = setting(True, "serve circuit relay v2")
    max_reservations: int = setting(128, "most relay reservations held at once")
    max_circuits: int = setting(64, "most relayed connections open at once")
    reservation_ttl: float = setting(
        3600.0, "seconds a reservation lasts before the peer must renew it"
    )
    max_circuit_bytes: int = setting(
        0, "bytes relayed per circuit before it is closed; 0 means unlimited"
    )

    def validate(self) -> None:
        for key in ("max_reservations", "max_circuits"):
            value = getattr(self, key)
            if value <= 0:
                raise InvalidSetting(key, f"must be a positive integer, got {value}")
        if not (self.reservation_ttl > 0 and math.isfinite(self.reservation_ttl)):
            raise InvalidSetting(
                "reservation_ttl",
                f"must be a positive number of seconds, got {self.reservation_ttl}",
            )
        if self.max_circuit_bytes < 0:
            raise InvalidSetting(
                "max_circuit_bytes",
                f"must be 0 (unlimited) or a positive number of bytes, got {self.max_circuit_bytes}",
            )


@dataclass(frozen=True)
class GatewayConfig:
    """A gateway is the stable entry point of a Hypha network: peers bootstrap through it, it
    anchors the Kademlia DHT, and it relays connections to peers behind NAT. It runs no jobs."""

    role: ClassVar[str] = "gateway"

    network: GatewayNetworkSection = section(GatewayNetworkSection)
    tls: TLSSection = section(TLSSection)
    log: LogSection = section(LogSection)
    relay: RelaySection = section(RelaySection)
    metrics: MetricsSection = section(MetricsSection)
