"""The gateway role: a stable entry point (bootstrap address, Kademlia anchor, circuit relay v2).

Run it with ``python -m hypha.gateway`` (``init`` writes a commented config, ``run`` starts it).
"""

from hypha.gateway.config import GatewayConfig, GatewayNetworkSection, RelaySection

__all__ = ["GatewayConfig", "GatewayNetworkSection", "RelaySection"]
