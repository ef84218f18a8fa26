"""DiLoCo for existing PyTorch training loops, the transports it exchanges bytes through, and a
central parameter server for it.

>>> inner = torch.optim.AdamW(model.parameters(), lr=3e-4)        # doctest: +SKIP
>>> opt = DiLoCo(inner, comm, sync_every=100, codec="int4")        # doctest: +SKIP

With ``comm`` a :class:`Transport` the ranks share the outer step; with a :class:`ServerLink` an
:class:`OuterServer` runs it (:class:`LocalParameterServer` / :class:`LocalServerLink` run one in
this process).
"""

from hypha.optim._exchange import ExchangeError
from hypha.optim._link import ServerLink
from hypha.optim._transport import DistTransport, LocalTransport, PipeTransport, Transport
from hypha.optim.diloco import DiLoCo, DiLoCoStats
from hypha.optim.server import (
    Contribution,
    LocalParameterServer,
    LocalServerLink,
    OuterServer,
    RoundStats,
    ServerRound,
)

__all__ = [
    "Contribution",
    "DiLoCo",
    "DiLoCoStats",
    "DistTransport",
    "ExchangeError",
    "LocalParameterServer",
    "LocalServerLink",
    "LocalTransport",
    "OuterServer",
    "PipeTransport",
    "RoundStats",
    "ServerLink",
    "ServerRound",
    "Transport",
]
