"""The gateway node: a stable bootstrap address, a DHT anchor and a circuit relay. It runs no jobs.

``python -m hypha.gateway run`` loads :class:`~hypha.gateway.config.GatewayConfig` and calls
:func:`run`, which keeps the node up until it is interrupted. SIGHUP re-reads the CRL files: the
revoked peers' open connections are closed and their new ones refused.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import trio

from hypha.gateway.config import GatewayConfig
from hypha.net import MTLSTransport, NetworkSettings, TLSFiles, open_network

__all__ = ["run", "settings_from_config"]

log = logging.getLogger("hypha.gateway")


def settings_from_config(config: GatewayConfig) -> NetworkSettings:
    relay = config.relay
    limits = {
        "max_reservations": relay.max_reservations,
        "max_circuit_conns": relay.max_circuits,
        "reservation_ttl": max(1, round(relay.reservation_ttl)),
    }
    if relay.max_circuit_bytes:
        limits["data"] = relay.max_circuit_bytes
    tls = config.tls
    return NetworkSettings(
        tls=TLSFiles(cert=tls.cert, key=tls.key, trust=tls.trust, crl=tuple(tls.crl)),
        listen=tuple(config.network.listen),
        external=tuple(config.network.external),
        bootstrap=tuple(config.network.bootstrap),
        relay_service=relay.enabled,
        relay_limits=limits,
        dht_mode="server",
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
        task_status.started(net)
        await _until_stopped()
    log.info("gateway stopped")
    return 0


async def _until_stopped() -> None:
    """Return on SIGINT or SIGTERM (a clean shutdown for a terminal and for systemd alike)."""
    if threading.current_thread() is not threading.main_thread():
        await trio.sleep_forever()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            return
