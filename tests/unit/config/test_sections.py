"""The shared sections ([network], [tls], [log]) and the gateway's schema ([relay])."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypha import gateway
from hypha.config import (
    ConfigError,
    LogSection,
    NetworkSection,
    TLSSection,
    configure_logging,
    load,
)
from hypha.gateway.config import GatewayConfig, GatewayNetworkSection, RelaySection

PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
TLS = {"tls.cert": "/c.pem", "tls.key": "/k.pem", "tls.trust": "/t.pem"}


def gateway_config(**overrides: object) -> GatewayConfig:
    return load(GatewayConfig, None, env={}, overrides={**TLS, **overrides})


def problem(**overrides: object) -> str:
    with pytest.raises(ConfigError) as exc:
        gateway_config(**overrides)
    return str(exc.value)


def test_gateway_exports() -> None:
    assert sorted(gateway.__all__) == ["GatewayConfig", "GatewayNetworkSection", "RelaySection"]


def test_gateway_defaults() -> None:
    cfg = gateway_config()
    assert cfg.network == GatewayNetworkSection()
    assert cfg.network.listen == ["/ip4/0.0.0.0/tcp/4001"]
    assert NetworkSection().listen == ["/ip4/0.0.0.0/tcp/0"]  # other roles listen anywhere
    assert cfg.network.external == [] and cfg.network.bootstrap == []
    assert cfg.tls == TLSSection(cert=Path("/c.pem"), key=Path("/k.pem"), trust=Path("/t.pem"))
    assert cfg.tls.crl == []
    assert cfg.log == LogSection(level="info", format="text")
    assert cfg.relay == RelaySection(
        enabled=True,
        max_reservations=128,
        max_circuits=64,
        reservation_ttl=3600.0,
        max_circuit_bytes=0,
    )


def test_gateway_needs_the_tls_files() -> None:
    with pytest.raises(ConfigError) as exc:
        load(GatewayConfig, None, env={})
    assert [p.split(":")[0] for p in exc.value.problems] == ["tls.cert", "tls.key", "tls.trust"]
    assert "HYPHA_TLS_KEY" in str(exc.value) and "--tls-trust" in str(exc.value)


def test_tls_paths_need_not_exist_but_must_not_be_empty() -> None:
    assert gateway_config(**{"tls.crl": ["/nowhere/a.crl"]}).tls.crl == [Path("/nowhere/a.crl")]
    assert "flag --tls-cert: tls.cert: expected a path, got an empty string" in problem(
        **{"tls.cert": ""}
    )


def test_multiaddrs_are_checked() -> None:
    ok = gateway_config(**{
        "network.listen": ["/ip4/127.0.0.1/tcp/0", "/ip6/::/udp/4001/quic-v1"],
        "network.external": ["/dns4/gw.example.org/tcp/4001"],
        "network.bootstrap": [f"/ip4/203.0.113.7/tcp/4001/p2p/{PEER}"],
    })  # fmt: skip
    assert ok.network.bootstrap == [f"/ip4/203.0.113.7/tcp/4001/p2p/{PEER}"]

    msg = problem(**{"network.listen": ["/ip4/127.0.0.1/tcp/0", "/ip4/999.0.0.1/tcp/1"]})
    assert msg.startswith("flag --network-listen: network.listen[1]: invalid multiaddr '/ip4/999")
    assert "expected e.g. /ip4/203.0.113.7/tcp/4001" in msg
    assert "network.external[0]: invalid multiaddr 'localhost:4001'" in problem(
        **{"network.external": ["localhost:4001"]}
    )
    assert "network.bootstrap[0]: '/ip4/1.2.3.4/tcp/4001' does not end in /p2p/<peer id>" in (
        problem(**{"network.bootstrap": ["/ip4/1.2.3.4/tcp/4001"]})
    )
    assert "network.bootstrap[0]: invalid multiaddr" in problem(
        **{"network.bootstrap": ["/ip4/1.2.3.4/tcp/4001/p2p/not-a-peer-id"]}
    )


def test_multiaddrs_from_env_name_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load(GatewayConfig, None, env={"HYPHA_NETWORK_BOOTSTRAP": "/ip4/1.2.3.4/tcp/1"},
             overrides=TLS)  # fmt: skip
    assert str(exc.value).startswith(
        "environment variable HYPHA_NETWORK_BOOTSTRAP: network.bootstrap[0]: "
    )


def test_log_choices() -> None:
    assert gateway_config(**{"log.level": "debug", "log.format": "json"}).log == LogSection(
        level="debug", format="json"
    )
    assert "log.level: expected one of debug, info, warning, error, got 'verbose'" in problem(
        **{"log.level": "verbose"}
    )
    assert "(did you mean warning?)" in problem(**{"log.level": "warn"})
    assert "log.format: expected one of text, json, got 'yaml'" in problem(**{"log.format": "yaml"})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_reservations", 0, "relay.max_reservations: must be a positive integer, got 0"),
        ("max_circuits", -1, "relay.max_circuits: must be a positive integer, got -1"),
        ("reservation_ttl", 0, "relay.reservation_ttl: must be a positive number of seconds, got 0.0"),
        ("reservation_ttl", "inf", "relay.reservation_ttl: must be a positive number of seconds, got inf"),
        ("max_circuit_bytes", -5, "relay.max_circuit_bytes: must be 0 (unlimited) or a positive number of bytes, got -5"),
    ],
)  # fmt: skip
def test_relay_limits(key: str, value: object, message: str) -> None:
    assert message in problem(**{f"relay.{key}": value})


def test_relay_accepts_unlimited_bytes_and_disabling() -> None:
    cfg = gateway_config(**{"relay.max_circuit_bytes": 0, "relay.enabled": "false"})
    assert cfg.relay.max_circuit_bytes == 0 and cfg.relay.enabled is False
    assert gateway_config(**{"relay.max_circuit_bytes": "1048576"}).relay.max_circuit_bytes == 2**20


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_logging(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging(LogSection(level="warning", format="json"), stream)
    configure_logging(LogSection(level="warning", format="json"), stream)  # replaces, not adds
    logging.getLogger("hypha.test").info("hidden")
    logging.getLogger("hypha.test").warning("shown %d", 1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["level"], record["logger"], record["message"]) == (
        "warning",
        "hypha.test",
        "shown 1",
    )

    stream = io.StringIO()
    configure_logging(LogSection(level="debug", format="text"), stream)
    logging.getLogger("hypha.test").debug("plain")
    assert stream.getvalue().rstrip().endswith("DEBUG   hypha.test: plain")
    assert len([h for h in root_logger.handlers if h.get_name() == "hypha"]) == 1
