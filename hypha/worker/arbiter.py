"""The arbiter: which schedulers' advertisements this worker answers, and with what offer.

The allocation protocol (docs: DESIGN.md, "Control plane"): a scheduler advertises a
:class:`~hypha.messages.WorkerRequest` on the ``hypha/worker`` topic; a worker that can serve it
answers with a priced :class:`~hypha.messages.WorkerOffer` and holds the offered resources under a
short *temporary lease* (``offer_ttl``); the scheduler accepts by renewing that lease (its first
renewal, with the lease time it wants), keeps renewing at ~75% of it, and when a lease runs out
its resources are free again and the worker stops the jobs under it.

This module is the pure part of that: no network. The worker node feeds it batches of requests
(:func:`batches` collects the advertisements that arrive within a short window, so that the best
of several schedulers' requests wins rather than the first), sends the offers it returns, and
calls :meth:`Arbiter.renew` / :meth:`Arbiter.release` / :meth:`Arbiter.expire` from the lease
protocol handlers and a timer (sleep until :meth:`Arbiter.next_expiry`).

Pricing (:class:`Pricing`): prices and bids are per hour for the whole of what a request asks for
(not per core or per GiB). A worker answers a request only when

* the request's deadline has not passed,
* it offers the requested executor,
* the requested resources fit into what is free (total − temporary holds − accepted leases),
* and the price works out at or above ``floor``:

  - ``flexible``: offers exactly the requested resources, at the bid, when ``bid >= price``;
  - ``whole``: offers ALL its free resources, at ``max(bid, price)`` (it may ask more than the
    bid; the scheduler decides). The temporary hold covers all of them, and an accepted lease
    keeps all of them until it ends or is released.

No offer is ever priced below ``floor``. Within a batch, the requests that pass are served best
first by bid per unit of capacity (:meth:`Resources.capacity`), each against what the ones before
it left free, so the same resources are never offered twice at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

import trio

from hypha.leases import Lease, LeaseError, Ledger
from hypha.messages import Executor, Resources, WorkerOffer, WorkerRequest, new_id

__all__ = ["STRATEGIES", "Arbiter", "Hold", "Pricing", "batches"]

T = TypeVar("T")

log = logging.getLogger("hypha.worker")

#: The pricing strategies of :class:`Pricing`.
STRATEGIES: Final = ("flexible", "whole")

Strategy = Literal["flexible", "whole"]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number)")
    return float(value)


@dataclass(frozen=True)
class Pricing:
    """How a worker prices its offers; prices are per hour for the whole of an offer.

    ``strategy="flexible"`` offers exactly what a request asks for, at its bid, when the bid is
    at least ``price``. ``strategy="whole"`` offers all free resources at ``max(bid, price)``.
    Either way nothing is offered below ``floor``.
    """

    strategy: Strategy = "flexible"
    price: float = 1.0  #: asking price per hour (> 0)
    floor: float = 0.5  #: least acceptable price per hour (>= 0)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Invalid pricing strategy: {self.strategy!r} (expected one of "
                f"{', '.join(STRATEGIES)})"
            )
        if _number("price", self.price) <= 0:
            raise ValueError(f"Invalid price: {self.price} (expected a price per hour > 0)")
        if _number("floor", self.floor) < 0:
            raise ValueError(f"Invalid floor: {self.floor} (expected a price per hour >= 0)")

    def quote(self, bid: float) -> float | None:
        """The price to offer a request that bids ``bid``, or None to refuse it."""
        if isinstance(bid, bool) or not isinstance(bid, int | float) \
                or not math.isfinite(bid) or bid < 0:
            return None
        if self.strategy == "flexible":
            if bid < self.price:
                return None
            quoted = float(bid)
        else:
            quoted = max(float(bid), self.price)
        return quoted if quoted >= self.floor else None


@dataclass(frozen=True)
class Hold:
    """What a lease of this worker holds: the value stored in the arbiter's ledgers."""

    resources: Resources
    scheduler: str  #: peer id of the scheduler the offer went to
    request_id: str
    executor: Executor
    price: float  #: per hour
    accepted: bool = False  #: False: a temporary hold (an offer); True: an accepted lease


class Arbiter:
    """Decides offers for batches of requests and keeps the leases on this worker's resources.

    ``clock`` (seconds, ``trio.current_time`` by default, so a ``MockClock`` drives it in tests)
    times the leases; offers carry unix times (``now_unix``) because they cross machines.
    Not thread-safe: use it from one trio task tree.
    """

    def __init__(
        self,
        resources: Resources,
        executors: Iterable[Executor],
        pricing: Pricing,
        *,
        worker_id: str,
        offer_ttl: float = 5.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if not isinstance(resources, Resources):
            raise TypeError(f"resources: expected Resources, got {type(resources).__name__}")
        if not isinstance(pricing, Pricing):
            raise TypeError(f"pricing: expected Pricing, got {type(pricing).__name__}")
        if _number("offer_ttl", offer_ttl) <= 0:
            raise ValueError(f"Invalid offer_ttl: {offer_ttl} (expected seconds > 0)")
        if not worker_id:
            raise ValueError("worker_id: expected this worker's peer id, got an empty string")
        self.total = resources
        self.executors: tuple[Executor, ...] = tuple(executors)
        self.pricing = pricing
        self.worker_id = worker_id
        self.offer_ttl = float(offer_ttl)
        self._holds: Ledger[str, Hold] = Ledger(clock)  # temporary: offers not yet accepted
        self._leases: Ledger[str, Hold] = Ledger(clock)  # accepted by a scheduler

    # ------------------------------------------------------------------------------------------
    # offers

    def free(self) -> Resources:
        """Total resources less live temporary holds and all accepted leases.

        An accepted lease that has run out still counts until :meth:`expire` reports it, so the
        resources of a job that is still running are never offered before the caller has been
        told to stop it. A temporary hold stops counting the moment it runs out.
        """
        held = [le.value.resources for le in self._holds.live()]
        held += [le.value.resources for le in self._leases]
        free = self.total
        for resources in held:
            free = _less(free, resources)
        return free

    def decide(
        self, requests: Sequence[WorkerRequest], now_unix: float | None = None
    ) -> list[WorkerOffer]:
        """Offers for a batch of requests, best first; each places a temporary hold.

        A hold lasts ``offer_ttl`` seconds, or the request's ``lease_ttl`` when that is shorter
        (the scheduler says how long it needs to choose; the worker caps how long it waits).

        Skipped: requests whose deadline (unix seconds) is not after ``now_unix`` (default:
        ``time.time()``), whose executor this worker does not offer, whose price would be refused
        (:meth:`Pricing.quote`), or that do not fit into what is still free.
        """
        now = time.time() if now_unix is None else float(now_unix)
        candidates: list[tuple[float, int, WorkerRequest, float]] = []
        for i, request in enumerate(requests):
            reason, price = self._screen(request, now)
            if reason is not None:
                log.debug("not answering request %s from %s: %s",
                          request.id, request.scheduler, reason)
                continue
            assert price is not None
            candidates.append((-_score(request), i, request, price))
        candidates.sort(key=lambda c: (c[0], c[1]))  # best bid per capacity first, then arrival

        offers: list[WorkerOffer] = []
        free = self.free()
        for _, _, request, price in candidates:
            if not request.resources.fits(free):
                log.debug("not answering request %s from %s: %s do not fit into the free %s",
                          request.id, request.scheduler, request.resources, free)
                continue
            if self.pricing.strategy == "whole":
                if free.capacity() <= 0:  # a request for nothing, with nothing left to offer
                    continue
                offered = free
            else:
                offered = request.resources
            lease_id = new_id()
            ttl = min(self.offer_ttl, request.lease_ttl)
            hold = Hold(offered, request.scheduler, request.id, request.executor, price)
            self._holds.insert(lease_id, hold, ttl)
            free = _less(free, offered)
            offers.append(
                WorkerOffer(
                    request_id=request.id,
                    worker=self.worker_id,
                    resources=offered,
                    executors=[request.executor],
                    price=price,
                    lease_id=lease_id,
                    lease_expires=now + ttl,
                )
            )
            log.info("offering %s to %s for request %s at %g/h (lease %s)",
                     offered, request.scheduler, request.id, price, lease_id)
        return offers

    def _screen(self, request: WorkerRequest, now: float) -> tuple[str | None, float | None]:
        """Why ``request`` is refused regardless of what else is free (None: it is not), and
        the price it would be offered at."""
        if not request.deadline > now:
            return f"its deadline passed {now - request.deadline:.1f} s ago", None
        if request.executor not in self.executors:
            return f"executor {request.executor} is not offered here", None
        price = self.pricing.quote(request.bid)
        if price is None:
            p = self.pricing
            need = f"at least {p.price:g}" if p.strategy == "flexible" else "a price"
            return f"bid {request.bid:g}/h: {p.strategy} pricing needs {need} and a floor of " \
                   f"{p.floor:g}", None
        if not request.resources.fits(self.total):
            return f"it asks for {request.resources}, more than this worker has", None
        return None, price

    # ------------------------------------------------------------------------------------------
    # leases

    def accept(
        self, lease_id: str, ttl: float, *, scheduler: str | None = None
    ) -> Lease[str, Hold]:
        """Turn the temporary hold of an offer into a lease of ``ttl`` seconds (the scheduler's
        first renewal). Raises :class:`LeaseError` for an unknown, expired or already accepted
        offer, or (when ``scheduler`` is given) an offer made to another scheduler."""
        lease = self._holds.get(lease_id)
        if lease is None:
            if lease_id in self._leases:
                raise LeaseError(f"offer {lease_id!r} was already accepted; renew the lease")
            held = _peek(self._holds, lease_id)
            if held is not None:
                ago = self._holds.now() - held.expires
                raise LeaseError(
                    f"offer {lease_id!r} expired {ago:.1f} s ago (offers hold their resources "
                    f"for {self.offer_ttl:g} s); its resources are free again"
                )
            raise LeaseError(f"no offer {lease_id!r} on this worker")
        _check_owner(lease, scheduler)
        accepted = self._leases.insert(lease_id, dataclasses.replace(lease.value, accepted=True),
                                       ttl)
        self._holds.remove(lease_id)
        log.info("lease %s accepted by %s for %g s", lease_id, lease.value.scheduler, ttl)
        return accepted

    def renew(
        self, lease_id: str, ttl: float, *, scheduler: str | None = None
    ) -> Lease[str, Hold]:
        """Extend an accepted lease to ``ttl`` seconds from now; a live offer is accepted
        (:meth:`accept`), so the lease protocol's handler can call this for every renewal."""
        if lease_id in self._holds:
            return self.accept(lease_id, ttl, scheduler=scheduler)
        lease = self._leases.get(lease_id)
        if lease is None:
            if lease_id in self._leases:
                raise LeaseError(f"lease {lease_id!r} has expired; its jobs are being stopped")
            raise LeaseError(f"no lease {lease_id!r} on this worker")
        _check_owner(lease, scheduler)
        return self._leases.renew(lease_id, ttl)

    def release(self, lease_id: str, *, scheduler: str | None = None) -> Lease[str, Hold]:
        """End an offer or a lease now (the scheduler declined the offer, or its job is done);
        its resources are free again. The caller stops any job under it."""
        for ledger in (self._holds, self._leases):
            lease = _peek(ledger, lease_id)
            if lease is not None:
                _check_owner(lease, scheduler)
                return ledger.remove(lease_id)
        raise LeaseError(f"no lease {lease_id!r} on this worker")

    def expire(self) -> list[Lease[str, Hold]]:
        """Remove and return the offers and leases whose time ran out, soonest first; their
        resources are free again. The caller stops the jobs under the accepted ones
        (``lease.value.accepted``)."""
        out = []
        for ledger in (self._holds, self._leases):
            for lease in ledger.expired():
                out.append(ledger.remove(lease.key))
        out.sort(key=lambda le: le.expires)
        for lease in out:
            if lease.value.accepted:
                log.warning("lease %s of %s expired; freeing %s", lease.key,
                            lease.value.scheduler, lease.value.resources)
        return out

    def get(self, lease_id: str) -> Lease[str, Hold] | None:
        """The live offer or lease ``lease_id``, or None."""
        return self._leases.get(lease_id) or self._holds.get(lease_id)

    def leases(self) -> list[Lease[str, Hold]]:
        """The live accepted leases."""
        return self._leases.live()

    def next_expiry(self) -> float | None:
        """Clock time of the soonest expiry of a live offer or lease (to sleep until), or None."""
        times = [t for t in (self._holds.next_expiry(), self._leases.next_expiry())
                 if t is not None]
        return min(times) if times else None


def _peek(ledger: Ledger[str, Hold], key: str) -> Lease[str, Hold] | None:
    """The lease under ``key``, live or expired (``Ledger.get`` gives live ones only)."""
    return next((le for le in ledger if le.key == key), None)


def _check_owner(lease: Lease[str, Hold], scheduler: str | None) -> None:
    if scheduler is not None and scheduler != lease.value.scheduler:
        raise LeaseError(
            f"lease {lease.key!r} belongs to scheduler {lease.value.scheduler}, not {scheduler}"
        )


def _score(request: WorkerRequest) -> float:
    capacity = request.resources.capacity()
    return request.bid / capacity if capacity > 0 else math.inf


def _less(a: Resources, b: Resources) -> Resources:
    """``a - b`` field by field, never below zero.

    NOTE: holds are placed with fits() against a running difference, but summing the float cpu
    of several holds may round a hair above the total; clamping keeps free() a valid Resources.
    """
    return Resources(
        cpu=max(0.0, a.cpu - b.cpu),
        memory=max(0, a.memory - b.memory),
        storage=max(0, a.storage - b.storage),
        gpu=max(0, a.gpu - b.gpu),
    )


# ----------------------------------------------------------------------------------------------
# batching


async def batches(
    receive: trio.MemoryReceiveChannel[T], window: float, *, limit: int | None = None
) -> AsyncGenerator[list[T], None]:
    """Lists of the items that arrive within ``window`` seconds of the first item of each list.

    Waits (without limit) for a first item, then collects until ``window`` has passed since it
    arrived (or ``limit`` items are in hand), and yields them. When the channel closes, what was
    collected is yielded and the iteration ends. Iterate it within ``contextlib.aclosing``.
    """
    if _number("window", window) < 0:
        raise ValueError(f"Invalid window: {window} (expected seconds >= 0)")
    if limit is not None and limit < 1:
        raise ValueError(f"Invalid limit: {limit} (expected at least 1 item per batch)")
    while True:
        try:
            first = await receive.receive()
        except trio.EndOfChannel:
            return
        batch = [first]
        closed = False
        # NOTE: the generator never yields inside the cancel scope (trio forbids that).
        with trio.move_on_at(trio.current_time() + window):
            while limit is None or len(batch) < limit:
                try:
                    batch.append(await receive.receive())
                except trio.EndOfChannel:
                    closed = True
                    break
        yield batch
        if closed:
            return
