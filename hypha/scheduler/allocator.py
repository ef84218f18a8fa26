"""The scheduler's side of the allocation market: advertise, collect offers, choose, accept.

A scheduler publishes a :class:`~hypha.messages.WorkerRequest` (requirements and a bid) on the
``hypha/worker`` Gossipsub topic; workers that can serve it answer with a priced
:class:`~hypha.messages.WorkerOffer` over RPC, each holding its resources under a short temporary
lease. Once the offer window closes, the scheduler chooses and accepts the chosen offers by
renewing their leases; the others expire on their own.

Choosing is greedy by *capacity per unit of price*: among the offers that meet the requirements,
come from distinct workers and cost no more than the scheduler's private ``max_price``, the ones
that give the most capacity (``Resources.capacity()``) per unit of price win. An offer of a whole
machine at a slightly higher price can beat a bare-minimum one: greedy, but not blind to what each
offer includes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from hypha.messages import Executor, Resources, WorkerOffer

__all__ = ["Requirements", "choose"]


@dataclass(frozen=True)
class Requirements:
    """What one worker of a job must provide, and what the scheduler pays for it."""

    resources: Resources
    executor: Executor
    bid: float  #: offered price per hour (published)
    max_price: float  #: the most the scheduler accepts (private: never published)

    def __post_init__(self) -> None:
        for name in ("bid", "max_price"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive price, not {value!r}")
        if self.max_price < self.bid:
            raise ValueError(f"max_price ({self.max_price}) is below the bid ({self.bid}): "
                             "no offer at the bid could be accepted")

    def accepts(self, offer: WorkerOffer) -> bool:
        return (offer.price <= self.max_price
                and self.resources.fits(offer.resources)
                and any(e == self.executor for e in offer.executors))


def _value(offer: WorkerOffer) -> float:
    return offer.resources.capacity() / offer.price


def choose(offers: Iterable[WorkerOffer], requirements: Requirements, wanted: int, *,
           exclude: Iterable[str] = ()) -> list[WorkerOffer]:
    """The best ``wanted`` offers, at most one per worker, none from ``exclude``d workers."""
    if wanted < 0:
        raise ValueError(f"wanted must be >= 0, not {wanted}")
    skip = set(exclude)
    best: dict[str, WorkerOffer] = {}
    for offer in offers:
        if offer.worker in skip or not requirements.accepts(offer):
            continue
        held = best.get(offer.worker)
        if held is None or _value(offer) > _value(held):
            best[offer.worker] = offer
    ranked = sorted(best.values(), key=lambda o: (-_value(o), o.price, o.worker))
    return ranked[:wanted]
