"""Admission control for inbound streams, and the record of what this layer refused.

A peer's RPC requests pass a token bucket (sustained rate and burst) and two caps on handlers in
flight (the peer's own, and the node's total); its tensor streams pass a per-peer cap on streams
open at once. Everything is decided from the peer ID alone, before a byte of the request is read:
peers are CA-certified (mutual TLS), so a flooder cannot mint identities to spread its load, and
one bucket per identity is enough.

State is bounded: a peer's entry is dropped once it is idle (nothing in flight and its bucket
full again, which is exactly a fresh entry), and the table never holds more than ``max_peers``
entries (past it, the least recently seen peer with nothing in flight is forgotten).

:class:`Refusals` counts every refusal by reason and logs one line per (peer, reason) at most
every ``LOG_INTERVAL`` seconds, with the number of refusals it left out. Both classes take a
``clock`` so that tests can drive time by hand.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = [
    "LOG_INTERVAL",
    "MAX_TRACKED_PEERS",
    "Admission",
    "Limits",
    "Refusal",
    "Refusals",
    "TokenBucket",
]

Clock = Callable[[], float]

#: Seconds between two log lines for the same (peer, reason); those in between are counted.
LOG_INTERVAL = 10.0
#: Peers whose buckets and counts are remembered at once (idle ones are dropped before).
#: NOTE: a deployment has hundreds of nodes; an entry takes ~260 bytes (tracemalloc), so 4096
#: cost ~1 MiB. Past it, the least recently seen peer with nothing in flight is forgotten, which can
#: only hand it a fresh burst.
MAX_TRACKED_PEERS = 4096
#: Seconds between sweeps for idle entries (each sweep stops at the first recent entry).
SWEEP_INTERVAL = 1.0


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; a request takes one token or is refused."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Refill for the time since the last call, then take one token if there is one."""
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        """Whether the bucket would be full at ``now`` (indistinguishable from a new one)."""
        return self.tokens + max(0.0, now - self.stamp) * self.rate >= self.burst


@dataclass(frozen=True)
class Limits:
    """What one peer, and all peers together, may have this node do at once."""

    #: sustained RPC requests per second from one peer
    rate: float = 200.0
    #: requests a peer may send at once above the sustained rate (the bucket's size)
    burst: int = 400
    #: RPC handlers running (or reading their request) for one peer
    per_peer: int = 32
    #: RPC handlers running for all peers together
    total: int = 1024
    #: incoming tensor streams open at once from one peer
    tensor_streams: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, int | float) and self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"request_rate must be a positive number of requests per second, "
                             f"not {self.rate!r}")
        for name, value in (("request_burst", self.burst), ("max_requests_per_peer",
                            self.per_peer), ("max_requests", self.total),
                            ("max_tensor_streams_per_peer", self.tensor_streams)):
            if not (isinstance(value, int) and not isinstance(value, bool)
                    and 1 <= value <= 1_000_000):
                raise ValueError(f"{name} must be an integer in 1 .. 1000000, not {value!r}")
        if self.per_peer > self.total:
            raise ValueError(f"max_requests_per_peer ({self.per_peer}) cannot exceed "
                             f"max_requests ({self.total})")


@dataclass(frozen=True)
class Refusal:
    """Why a stream was turned away: ``reason`` for the counters, ``message`` for the peer."""

    reason: str
    message: str


class _Peer:
    __slots__ = ("bucket", "requests", "seen", "tensor_streams")

    def __init__(self, bucket: TokenBucket, now: float) -> None:
        self.bucket = bucket
        self.seen = now
        self.requests = 0
        self.tensor_streams = 0

    def idle(self, now: float) -> bool:
        """Nothing in flight and a full bucket: forgetting it changes nothing."""
        return self.requests == 0 and self.tensor_streams == 0 and self.bucket.full(now)


class Admission:
    """Per-peer token buckets and in-flight counts. Not thread-safe (one trio thread uses it).

    ``admit_request(peer)`` either returns a :class:`Refusal` or holds a slot that the caller
    gives back with ``release_request(peer)``; likewise for tensor streams.
    """

    def __init__(self, limits: Limits | None = None, *, max_peers: int = MAX_TRACKED_PEERS,
                 clock: Clock = time.monotonic) -> None:
        if max_peers < 1:
            raise ValueError(f"max_peers must be at least 1, not {max_peers!r}")
        self.limits = limits or Limits()
        self.max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[Hashable, _Peer] = OrderedDict()
        self.requests_in_flight = 0
        self._next_sweep = clock() + SWEEP_INTERVAL

    def __len__(self) -> int:
        """Peers remembered now (bounded by ``max_peers``)."""
        return len(self._peers)

    def admit_request(self, peer: Hashable) -> Refusal | None:
        limits = self.limits
        now = self._clock()
        state = self._touch(peer, now)
        # NOTE: the token goes first: a request refused for concurrency still spends one, so a
        # peer that keeps hammering at its cap drains its bucket like any other flooder.
        if not state.bucket.take(now):
            return Refusal("rate-limited", f"rate limited: more than {limits.rate:g} requests/s "
                                           f"from you (burst {limits.burst})")
        if state.requests >= limits.per_peer:
            return Refusal("too-many-concurrent", f"too many concurrent requests: "
                                                  f"{state.requests} of yours are in progress "
                                                  f"(limit {limits.per_peer})")
        if self.requests_in_flight >= limits.total:
            return Refusal("overloaded", f"overloaded: {self.requests_in_flight} requests in "
                                         f"progress (limit {limits.total}); try again later")
        state.requests += 1
        self.requests_in_flight += 1
        return None

    def release_request(self, peer: Hashable) -> None:
        self.requests_in_flight -= 1
        state = self._peers.get(peer)
        if state is not None:
            state.requests -= 1

    def admit_tensor_stream(self, peer: Hashable) -> Refusal | None:
        limit = self.limits.tensor_streams
        state = self._touch(peer, self._clock())
        if state.tensor_streams >= limit:
            return Refusal("tensor-stream-refused", f"too many concurrent tensor streams: "
                                                    f"{state.tensor_streams} of yours are open "
                                                    f"(limit {limit})")
        state.tensor_streams += 1
        return None

    def release_tensor_stream(self, peer: Hashable) -> None:
        state = self._peers.get(peer)
        if state is not None:
            state.tensor_streams -= 1

    def in_flight(self, peer: Hashable) -> tuple[int, int]:
        """(requests, tensor streams) of ``peer`` in progress now."""
        state = self._peers.get(peer)
        return (0, 0) if state is None else (state.requests, state.tensor_streams)

    def _touch(self, peer: Hashable, now: float) -> _Peer:
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._sweep(now)
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.max_peers:
                self._evict_one()
            state = self._peers[peer] = _Peer(TokenBucket(self.limits.rate, self.limits.burst,
                                                          now), now)
        else:
            state.seen = now
            self._peers.move_to_end(peer)
        return state

    def _sweep(self, now: float) -> None:
        """Drop idle entries, least recently seen first, up to the first one seen within the
        time a bucket takes to refill (the later ones cannot be idle yet)."""
        refill = self.limits.burst / self.limits.rate
        stale = []
        for peer, state in self._peers.items():
            if state.seen + refill > now:
                break
            if state.idle(now):
                stale.append(peer)
        for peer in stale:
            del self._peers[peer]

    def _evict_one(self) -> None:
        # NOTE: entries with something in flight are kept (their counts must balance). Unless
        # every tracked peer has something in flight (the table then exceeds max_peers by at most
        # the slots in use), the least recently seen of the others goes, idle or not: that can
        # only hand it a fresh burst, and takes max_peers certified peers to arrange.
        for peer, state in self._peers.items():
            if state.requests == 0 and state.tensor_streams == 0:
                del self._peers[peer]
                return


class _Said:
    __slots__ = ("at", "suppressed")

    def __init__(self, at: float) -> None:
        self.at = at
        self.suppressed = 0


class Refusals:
    """Counts refusals by reason (``counts``) and logs them, at most one line per (peer, reason)
    every ``interval`` seconds; the next line says how many were left out in between."""

    def __init__(self, logger: logging.Logger, *, interval: float = LOG_INTERVAL,
                 max_entries: int = MAX_TRACKED_PEERS, clock: Clock = time.monotonic) -> None:
        self.counts: Counter[str] = Counter()
        self.interval = interval
        self.max_entries = max_entries
        self._logger = logger
        self._clock = clock
        self._said: OrderedDict[tuple[str, str], _Said] = OrderedDict()

    def __len__(self) -> int:
        """(peer, reason) pairs remembered for log rate limiting (bounded by ``max_entries``)."""
        return len(self._said)

    def record(self, reason: str, peer: object, message: str, *, level: int = logging.WARNING,
               exc_info: bool = False) -> None:
        """Count one refusal of ``reason`` and log ``message`` unless one was logged lately."""
        self.counts[reason] += 1
        now = self._clock()
        key = (str(peer), reason)
        said = self._said.get(key)
        if said is not None and now - said.at < self.interval:
            said.suppressed += 1
            return
        suffix = ""
        if said is not None:
            if said.suppressed:
                suffix = (f" (and {said.suppressed} more from this peer in the last "
                          f"{now - said.at:.0f} s)")
            del self._said[key]
        self._forget_old(now)
        self._said[key] = _Said(now)
        self._logger.log(level, "%s [%s]%s", message, reason, suffix, exc_info=exc_info)

    def _forget_old(self, now: float) -> None:
        """Drop entries past their interval (saying what they held back), and any over the cap."""
        while self._said:
            key, said = next(iter(self._said.items()))
            if now - said.at < self.interval and len(self._said) < self.max_entries:
                return
            del self._said[key]
            if said.suppressed:
                peer, reason = key
                self._logger.warning("%d more refusals [%s] from %s since the last line about "
                                     "them, %.0f s ago", said.suppressed, reason, peer,
                                     now - said.at)
