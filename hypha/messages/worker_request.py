"""Gossipsub topic ``hypha/worker``: scheduler → every worker, a task advertisement. Not an RPC.

A scheduler publishes a :class:`WorkerRequest` on the Gossipsub topic :data:`WORKER_TOPIC`
(``hypha/worker``) when it needs a worker for a job. Every worker subscribed to the topic may
answer before ``deadline`` with a priced :class:`~hypha.messages.WorkerOffer` sent straight to
``scheduler`` over ``/hypha/worker-offer/1``; workers that cannot or will not serve it stay
silent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final

from hypha.messages._codec import MaxItems, Message, Range, Text
from hypha.messages._common import Executor, Id, LeaseTTL, PeerId, Resources, Timestamp

__all__ = ["WORKER_TOPIC", "WorkerRequest"]

#: The Gossipsub topic task advertisements are published on.
WORKER_TOPIC: Final = "hypha/worker"


class WorkerRequest(Message, max_size=16 << 10):
    """A scheduler asks for ``resources`` and an ``executor``, bidding ``bid`` per hour.

    Offers must reach ``scheduler`` before ``deadline`` (Unix seconds); the temporary lease an
    offer holds should last ``lease_ttl`` seconds, long enough for the scheduler to choose.
    ``addrs`` are the scheduler's multiaddrs, so that a worker that has never met it can answer
    at once instead of looking it up in the DHT first (a cold lookup took seconds, past the
    deadline); the connection is still verified against ``scheduler`` by mTLS.
    """

    id: Id
    scheduler: PeerId
    resources: Resources
    executor: Executor
    bid: Annotated[float, Range(gt=0)]
    deadline: Timestamp
    lease_ttl: LeaseTTL
    addrs: Annotated[Sequence[Annotated[str, Text(256, min_len=1, pattern=r"/[^\x00\s]*",
                                                 hint="a multiaddr")]], MaxItems(8)] = ()
