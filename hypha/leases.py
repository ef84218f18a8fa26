"""A small generic lease ledger: insert, renew, list expired, remove.

A lease is a value held for a limited time. Workers hold their resources under leases (a short
temporary lease per offer, a renewable one once a scheduler accepts); schedulers track the
leases they hold on workers. The ledger knows nothing about either: it stores values under keys
with an expiry, and the owner decides what expiry means (free resources, stop a job, find a
replacement).

Time comes from an injected clock (``trio.current_time`` by default, so tests can drive it with
``trio.testing.MockClock``; any ``() -> float`` in seconds works). Expired leases stay in the
ledger until the owner collects them with :meth:`Ledger.expired` and removes them, so an expiry
is never lost between two checks; a lease that has expired cannot be renewed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

__all__ = ["Lease", "LeaseError", "Ledger"]

K = TypeVar("K")
V = TypeVar("V")


class LeaseError(KeyError):
    """No such lease, or it has expired (then it cannot be renewed)."""

    def __str__(self) -> str:  # KeyError quotes its argument; a message reads better
        return str(self.args[0]) if self.args else "lease error"


@dataclass(frozen=True)
class Lease(Generic[K, V]):
    key: K
    value: V
    expires: float  #: clock time at which the lease ends
    renewals: int = 0

    def remaining(self, now: float) -> float:
        return self.expires - now


def _check_ttl(ttl: float) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) \
            or ttl <= 0:
        raise ValueError(f"lease ttl must be a positive number of seconds, not {ttl!r}")
    return float(ttl)


class Ledger(Generic[K, V]):
    """Leases by key. Not thread-safe: use it from one trio task tree."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._leases: dict[K, Lease[K, V]] = {}

    def now(self) -> float:
        return self._clock()

    def insert(self, key: K, value: V, ttl: float) -> Lease[K, V]:
        """Hold ``value`` under ``key`` for ``ttl`` seconds. A live lease under ``key`` is an
        error (renew it instead); an expired one is replaced."""
        ttl = _check_ttl(ttl)
        now = self.now()
        old = self._leases.get(key)
        if old is not None and old.expires > now:
            raise LeaseError(f"lease {key!r} is already held (for {old.expires - now:.1f} s more)")
        lease = Lease(key, value, now + ttl)
        self._leases[key] = lease
        return lease

    def renew(self, key: K, ttl: float, value: V | None = None) -> Lease[K, V]:
        """Extend a live lease to ``now + ttl`` (optionally replacing its value)."""
        ttl = _check_ttl(ttl)
        now = self.now()
        lease = self._leases.get(key)
        if lease is None:
            raise LeaseError(f"no lease {key!r}")
        if lease.expires <= now:
            raise LeaseError(f"lease {key!r} expired {now - lease.expires:.1f} s ago")
        renewed = Lease(key, lease.value if value is None else value, now + ttl,
                        lease.renewals + 1)
        self._leases[key] = renewed
        return renewed

    def get(self, key: K) -> Lease[K, V] | None:
        """The live lease under ``key``, or None (also when it has expired)."""
        lease = self._leases.get(key)
        if lease is None or lease.expires <= self.now():
            return None
        return lease

    def expired(self) -> list[Lease[K, V]]:
        """Leases whose time is up, soonest first. They stay until :meth:`remove`."""
        now = self.now()
        return sorted((le for le in self._leases.values() if le.expires <= now),
                      key=lambda le: le.expires)

    def remove(self, key: K) -> Lease[K, V]:
        lease = self._leases.pop(key, None)
        if lease is None:
            raise LeaseError(f"no lease {key!r}")
        return lease

    def next_expiry(self) -> float | None:
        """Clock time of the soonest expiry among live leases (to sleep until), or None."""
        now = self.now()
        live = [le.expires for le in self._leases.values() if le.expires > now]
        return min(live) if live else None

    def live(self) -> list[Lease[K, V]]:
        now = self.now()
        return [le for le in self._leases.values() if le.expires > now]

    def __contains__(self, key: object) -> bool:
        return key in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[Lease[K, V]]:
        return iter(list(self._leases.values()))
