"""DiLoCo for existing PyTorch training loops, and the transports it exchanges bytes through.

>>> inner = torch.optim.AdamW(model.parameters(), lr=3e-4)        # doctest: +SKIP
>>> opt = DiLoCo(inner, comm, sync_every=100, codec="int4")        # doctest: +SKIP
"""

from hypha.optim._exchange import ExchangeError
from hypha.optim._transport import DistTransport, LocalTransport, PipeTransport, Transport
from hypha.optim.diloco import DiLoCo, DiLoCoStats

__all__ = [
    "DiLoCo",
    "DiLoCoStats",
    "DistTransport",
    "ExchangeError",
    "LocalTransport",
    "PipeTransport",
    "Transport",
]
