"""How a DiLoCo worker talks to a central parameter server: one small interface.

With a :class:`ServerLink` as its ``comm``, :class:`~hypha.optim.DiLoCo` does not shard the outer
step among the workers: each worker pushes its whole compressed pseudo-gradient (of one fragment)
to a parameter server, which averages the contributions that came, runs the outer Nesterov step,
and sends every worker the same compressed update. The worker applies exactly those bytes to its
global copy, as the server does to its own (see :class:`~hypha.optim.OuterServer`).

Payloads are opaque here: the bytes DiLoCo produces (an envelope, then the codec's header and
chunks) go out in order and come back in order. Implementations:

* :class:`~hypha.optim.LocalServerLink`: a server in the same process (tests, a laptop);
* ``hypha.executors.train.BridgeServerLink``: the Hypha network, through the job bridge.

Only one thread per worker calls a link (DiLoCo's exchange thread, or the training thread).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

__all__ = ["ServerLink"]


class ServerLink(ABC):
    """A worker's connection to its parameter server.

    ``bytes_sent`` / ``bytes_received`` count every payload byte the link moved (implementations
    add their own framing if they want it counted)."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False

    @abstractmethod
    def push(self, round_: int, payload: Iterable[bytes]) -> None:
        """Send this worker's contribution to outer round ``round_`` (its pieces in order; the
        first starts with DiLoCo's envelope). May return before the server has it all."""

    @abstractmethod
    def pull(self, round_: int, timeout: float) -> Iterator[bytes]:
        """The server's update of round ``round_``, piece by piece, as it arrives. Raises
        ``TimeoutError`` when nothing came within ``timeout`` seconds, ``ConnectionError`` when
        the server is gone."""

    @abstractmethod
    def pull_initial(self, timeout: float) -> Iterator[bytes]:
        """The server's current global model (sent when this worker joins), piece by piece;
        raises like :meth:`pull`."""

    def close(self) -> None:
        self.closed = True
