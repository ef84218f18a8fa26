"""The gateway's command line: ``init`` writes a commented config, ``run`` (the default) starts it.

python -m hypha.gateway init [--config hypha-gateway.toml] [--force]
python -m hypha.gateway [run] [--config PATH] [--tls-cert PATH ...]
"""

from __future__ import annotations

from collections.abc import Sequence

from hypha.gateway.config import GatewayConfig
from hypha.rolecli import RoleCLI

__all__ = ["CLI", "DEFAULT_CONFIG", "main"]

CLI = RoleCLI(
    role="gateway",
    schema=GatewayConfig,
    node_module="hypha.gateway.node",
    description="Hypha gateway: bootstrap address, Kademlia anchor and circuit relay for a Hypha "
    "network.",
)
DEFAULT_CONFIG = CLI.default_config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hypha.gateway``; returns the exit status."""
    return CLI.main(argv)
