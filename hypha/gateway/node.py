"""The gateway node: a stable bootstrap address, a DHT anchor and a circuit relay. It runs no jobs.

``python -m hypha.gateway run`` loads :class:`~hypha.gateway.config.GatewayConfig` and calls
:func:`run`, which keeps the node up until it is interrupted. SIGHUP re-reads the CRL files: the
revoked peers' open connections are closed and their new ones refused.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio
from prometheus_client.core import Metric

from hypha.gateway.config import GatewayConfig
from hypha.messages import WORKER_TOPIC
from hypha.metrics import gauge, network_metrics, serve_metrics
from hypha.net import (
    MTLSTransport,
    Network,
    NetworkSettings,
    open_network,
    settings_from_sections,
)
from hypha.rolecli import until_stopped

__all__ = ["run", "settings_from_config"]

log = logging.getLogger("hypha.gateway")

#: The gateway's Gossipsub mesh: wide enough to push every advertisement to every subscriber
#: directly (see NetworkSettings.gossip_degree).
GATEWAY_GOSSIP_DEGREE = 1024


def settings_from_config(config: GatewayConfig) -> NetworkSettings:
    relay = config.relay
    limits = {
        "max_reservations": relay.max_reservations,
        "max_circuit_conns": relay.max_circuits,
        "reservation_ttl": max(1, round(relay.reservation_ttl)),
    }
    if relay.max_circuit_bytes:
        limits["data"] = relay.max_circuit_bytes
    return settings_from_sections(
        config.network, config.tls,
        relay_service=relay.enabled,
        relay_limits=limits,
        dht_mode="server",
        relay_topics=(WORKER_TOPIC,),
        gossip_degree=GATEWAY_GOSSIP_DEGREE,
        reload_on_sighup=True,
    )


async def run(config: GatewayConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
    """Run the gateway until cancelled. Returns 2 when its TLS files are unusable."""
    try:
        settings = settings_from_config(config)
        MTLSTransport(settings.tls)  # unusable files: one clear error, before anything starts
    except ValueError as exc:
        log.error("cannot start the gateway: %s", exc)
        return 2
    async with open_network(settings) as net:
        log.info("gateway %s up; peers bootstrap from: %s", net.peer_id,
                 " ".join(str(a) for a in net.addrs))
        if settings.relay_service:
            log.info("circuit relay v2 on (%d reservations, %d circuits at most)",
                     config.relay.max_reservations, config.relay.max_circuits)
        async with trio.open_nursery() as nursery:
            if config.metrics.port is not None:
                await nursery.start(partial(serve_metrics, partial(_collect, net),
                                            host=config.metrics.host, port=config.metrics.port))
            task_status.started(net)
            await until_stopped(log)
            nursery.cancel_scope.cancel()
    log.info("gateway stopped")
    return 0


def _collect(net: Network) -> list[Metric]:
    return [gauge("hypha_peers_connected", "peers with an open connection",
                  len(net.connected_peers())),
            gauge("hypha_relay_reservations", "peers reachable through this relay",
                  len(net.relay_reservations())), *network_metrics(net)]

