"""``/hypha/worker-offer/1``: worker → scheduler, answering a task advertisement.

A worker that can serve a :class:`~hypha.messages.WorkerRequest` sets the resources aside under
a temporary lease (``lease_id``, held until ``lease_expires``) and sends the scheduler a priced
:class:`WorkerOffer`; the scheduler acknowledges receipt with :class:`OfferReceived`, which
accepts nothing yet. The scheduler accepts an offer by renewing its lease
(``/hypha/renew-lease/1``) before it expires; an offer it does not take simply lapses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from hypha.messages._codec import MaxItems, Message, Range
from hypha.messages._common import Executor, Id, PeerId, Resources, Timestamp
from hypha.net import Protocol

__all__ = ["WORKER_OFFER", "OfferReceived", "WorkerOffer"]


class WorkerOffer(Message):
    """The worker ``worker`` offers ``resources`` and ``executors`` for ``price`` per hour, held
    for the scheduler under lease ``lease_id`` until ``lease_expires`` (Unix seconds)."""

    request_id: Id
    worker: PeerId
    resources: Resources
    executors: Annotated[Sequence[Executor], MaxItems(32)]
    price: Annotated[float, Range(gt=0)]
    lease_id: Id
    lease_expires: Timestamp


class OfferReceived(Message):
    """The scheduler has the offer for request ``request_id`` (it has not accepted it)."""

    request_id: Id


WORKER_OFFER = Protocol("worker-offer", "1", max_request=WorkerOffer.MAX_SIZE,
                        max_response=OfferReceived.MAX_SIZE)
