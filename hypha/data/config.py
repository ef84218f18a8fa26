"""The data node's configuration schema: [network], [tls], [log] and [data]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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

__all__ = ["DataConfig", "DataNetworkSection", "DataSection"]


@dataclass(frozen=True)
class DataNetworkSection(NetworkSection):
    """libp2p addresses: where this data node listens and which gateways it joins through.

    A data node needs at least one bootstrap address to announce its datasets; the default is
    empty only so that a fresh config loads; the node refuses to start without one.
    """

    bootstrap: list[str] = setting(
        [],
        "multiaddrs of gateways to join the network through, each ending in /p2p/<peer id>; "
        "a data node needs at least one",
        metavar="MULTIADDR",
    )


@dataclass(frozen=True)
class DataSection:
    """The datasets this node serves: directories made with `python -m hypha.data prepare`."""

    datasets: list[Path] = setting(
        [],
        "prepared dataset directories to serve (each DIR/NAME holds a manifest.json); each is "
        "announced under its name (required to run a data node)",
        metavar="DIR",
    )
    verify: bool = setting(
        True, "read every slice and check its SHA-256 before serving (slow for large datasets; "
        "each slice is checked again whenever it is sent)"
    )
    max_transfers: int = setting(
        4, "slices sent at once (each is held in memory while it is sent); more requests wait"
    )

    def validate(self) -> None:
        if self.max_transfers < 1:
            raise InvalidSetting("max_transfers", f"must be at least 1, got {self.max_transfers}")


@dataclass(frozen=True)
class DataConfig:
    """A data node announces prepared datasets in the DHT and streams their SafeTensors slices to
    the workers that the schedulers send to it."""

    role: ClassVar[str] = "data"

    network: DataNetworkSection = section(DataNetworkSection)
    tls: TLSSection = section(TLSSection)
    log: LogSection = section(LogSection)
    data: DataSection = section(DataSection)
    metrics: MetricsSection = section(MetricsSection)
