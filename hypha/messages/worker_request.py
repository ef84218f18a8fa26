"""Gossipsub topic ``hypha/worker``: scheduler → every worker, a task advertisement. Not an RPC.

A scheduler publishes a :class:`WorkerRequest` on the Gossipsub topic :data:`WORKER_TOPIC`
(``hypha/worker``) when it needs a worker for a job. Every worker subscribed to the topic may
answer before ``deadline`` with a priced :class:`~hypha.messages.WorkerOffer` sent straight to
``scheduler`` over ``/hypha/worker-offer/1``; workers that cannot or will not serve it stay
silent.
"""

from __future__ import annotations

from typing import Annotated, Final

from hypha.messages._codec import Message, Range
from hypha.messages._common import Executor, Id, LeaseTTL, PeerId, Resources, Timestamp

__all__ = ["WORKER_TOPIC", "WorkerRequest"]

#: The Gossipsub topic task advertisements are published on.
WORKER_TOPIC: Final = "hypha/worker"


class WorkerRequest(Message, max_size=16 << 10):
    """A scheduler asks for ``resources`` and an ``executor``, bidding ``bid`` per hour.

    Offers must reach ``scheduler`` before ``deadline`` (Unix seconds); the temporary lease an
    offer holds should last ``lease_ttl`` seconds, long enough for the scheduler to choose.
    """

    id: Id
    scheduler: PeerId
    resources: Resources
    executor: Executor
    bid: Annotated[float, Range(gt=0)]
    deadline: Timestamp
    lease_ttl: LeaseTTL
