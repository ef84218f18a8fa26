"""The scheduler's bookkeeping of which worker trains on which data slice.

Each slice of a dataset is, within an epoch, AVAILABLE → ASSIGNED (to a worker, for a job) →
USED. Workers are handed AVAILABLE slices in an order shuffled per epoch (deterministic given
``seed``); a worker may hold up to ``max_assigned_per_worker`` slices at once (the one it trains
on and the next, prefetched). A dead worker's slices go back to AVAILABLE, first in line. When
every slice is USED the next epoch begins with a new shuffle.

**Epochs overlap at their boundary.** When a worker asks and no slice of the epoch is left
AVAILABLE while another worker still holds some, the next epoch begins at once with the slices
nobody holds (in its new shuffle); the slices still held finish their old epoch and join the new
one when they are done (or released). Otherwise a worker would wait for another to finish its
slice, and in DiLoCo that other may be waiting for it at the synchronisation: a deadlock that only
the parameter server's timeout would break. A slice held across more than one boundary joins the
newest epoch when done: it is trained fewer times than the others, and nobody waits.

Pure logic: no network, no clock. The scheduler decides what to do with the errors:
:class:`NoSliceAvailable` means "ask again later", any other :class:`TrackerError` means the
worker's request makes no sense (a bug or a stale message) and should be refused.

    >>> t = SliceTracker("stdlib", 3, seed=1)
    >>> s, epoch = t.assign("worker-a")
    >>> t.done("worker-a", s, epoch)
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import random
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "DEFAULT_MAX_ASSIGNED",
    "Assignment",
    "NoSliceAvailable",
    "SliceState",
    "SliceTracker",
    "TrackerError",
    "TrackerStats",
]

#: A worker may hold the slice it trains on and prefetch one more.
DEFAULT_MAX_ASSIGNED: Final = 2
_SNAPSHOT_FORMAT: Final = "hypha-slice-tracker"
_SNAPSHOT_VERSION: Final = 1


class TrackerError(ValueError):
    """A request the tracker refuses (unknown slice, wrong worker, past epoch, bad snapshot...)."""


class NoSliceAvailable(TrackerError):
    """Every slice of the current epoch is assigned or used: ask again when some are done."""


class SliceState(enum.Enum):
    AVAILABLE = "available"
    ASSIGNED = "assigned"
    USED = "used"


@dataclass(frozen=True)
class Assignment:
    """Slice ``slice`` of epoch ``epoch`` is assigned to ``worker`` for ``job``."""

    slice: int
    epoch: int
    worker: str
    job: str | None = None


@dataclass(frozen=True)
class TrackerStats:
    """Counters for metrics: the current epoch's state, and totals since the tracker began."""

    epoch: int
    available: int
    in_flight: int
    used: int
    assigned_total: int
    used_total: int
    released_total: int
    reassigned_total: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class SliceTracker:
    """Slices ``0 .. n_slices-1`` of ``dataset``: AVAILABLE → ASSIGNED → USED, in epochs."""

    def __init__(
        self,
        dataset: str,
        n_slices: int,
        *,
        seed: int = 0,
        max_assigned_per_worker: int = DEFAULT_MAX_ASSIGNED,
    ) -> None:
        if not isinstance(dataset, str) or not dataset:
            raise TrackerError(f"dataset must be a non-empty string, got {dataset!r}")
        for key, value, low in (
            ("n_slices", n_slices, 1),
            ("seed", seed, 0),
            ("max_assigned_per_worker", max_assigned_per_worker, 1),
        ):
            if not _is_int(value) or value < low:
                raise TrackerError(f"{key} must be an integer >= {low}, got {value!r}")
        self.dataset = dataset
        self.n_slices = n_slices
        self.seed = seed
        self.max_assigned_per_worker = max_assigned_per_worker
        self._epoch = 0
        self._available: deque[int] = deque(self._order(0))
        self._assigned: dict[int, Assignment] = {}
        self._used: set[int] = set()
        self._released: set[int] = set()  # released this epoch and not handed out again yet
        self._assigned_total = 0
        self._used_total = 0
        self._released_total = 0
        self._reassigned_total = 0

    def __repr__(self) -> str:
        return (
            f"SliceTracker({self.dataset!r}, {self.n_slices}, epoch={self._epoch}, "
            f"available={len(self._available)}, in_flight={len(self._assigned)}, "
            f"used={len(self._used)})"
        )

    # ------------------------------------------------------------------------------------------
    # the protocol

    @property
    def epoch(self) -> int:
        return self._epoch

    def assign(self, worker: str, *, job: str | None = None) -> tuple[int, int]:
        """Hand ``worker`` the next AVAILABLE slice; return ``(slice, epoch)``.

        Raises :class:`NoSliceAvailable` when none is left in this epoch, and
        :class:`TrackerError` when ``worker`` already holds ``max_assigned_per_worker`` slices.
        """
        _check_worker(worker)
        if job is not None and not isinstance(job, str):
            raise TrackerError(f"job must be a string or None, got {job!r}")
        held = [a.slice for a in self._assigned.values() if a.worker == worker]
        if len(held) >= self.max_assigned_per_worker:
            raise TrackerError(
                f"worker {worker!r} already holds {len(held)} slices of {self.dataset!r} "
                f"({', '.join(map(str, held))}), the most allowed (max_assigned_per_worker="
                f"{self.max_assigned_per_worker}); report one done before asking for another"
            )
        if not self._available and len(self._assigned) < self.n_slices and any(
                a.worker != worker for a in self._assigned.values()):
            # every slice not held now is USED in this epoch, and another worker holds what is
            # left: begin the next one with the others (the asker's own slices end soon)
            self._start_epoch(self._epoch + 1, held=set(self._assigned))
        if not self._available:
            raise NoSliceAvailable(
                f"no slice of {self.dataset!r} is available in epoch {self._epoch}: "
                f"{len(self._assigned)} assigned, {len(self._used)} used; epoch "
                f"{self._epoch + 1} starts when the assigned ones are done"
            )
        index = self._available.popleft()
        self._assigned[index] = Assignment(index, self._epoch, worker, job)
        self._assigned_total += 1
        if index in self._released:
            self._released.discard(index)
            self._reassigned_total += 1
        return index, self._epoch

    def done(self, worker: str, slice: int, epoch: int) -> None:
        """``worker`` finished slice ``slice`` of ``epoch``: mark it USED. The last USED slice of
        an epoch starts the next one. Refuses a slice this worker does not hold now."""
        _check_worker(worker)
        self._check_slice(slice)
        if not _is_int(epoch) or epoch < 0:
            raise TrackerError(f"epoch must be an integer >= 0, got {epoch!r}")
        held = self._assigned.get(slice)
        carried = held is not None and held.worker == worker and held.epoch == epoch < self._epoch
        if epoch != self._epoch and not carried:
            when = "a past" if epoch < self._epoch else "a future"
            raise TrackerError(
                f"worker {worker!r} reported slice {slice} of epoch {epoch} done, {when} epoch: "
                f"{self.dataset!r} is at epoch {self._epoch}"
            )
        if held is None or held.worker != worker:
            if held is not None:
                now = f"it is assigned to worker {held.worker!r}"
            elif slice in self._used:
                now = "it is already used"
            else:
                now = "it is available (released: the worker was presumed dead)"
            raise TrackerError(
                f"worker {worker!r} reported slice {slice} of {self.dataset!r} done, but it does "
                f"not hold it: {now}"
            )
        del self._assigned[slice]
        self._used_total += 1
        if carried:
            # done with its old epoch, while the next one runs: it is trained in this one too
            self._available.append(slice)
            return
        self._used.add(slice)
        if len(self._used) == self.n_slices:
            self._start_epoch(self._epoch + 1)

    def release_worker(self, worker: str, *, job: str | None = None) -> list[int]:
        """Return ``worker``'s ASSIGNED slices (only ``job``'s, if given) to AVAILABLE, first in
        line; return them. Use it when a worker is dead or its lease expired."""
        _check_worker(worker)
        freed = [
            s
            for s, a in self._assigned.items()
            if a.worker == worker and (job is None or a.job == job)
        ]
        for s in freed:
            del self._assigned[s]
        self._available.extendleft(reversed(freed))
        self._released.update(freed)
        self._released_total += len(freed)
        return freed

    # ------------------------------------------------------------------------------------------
    # queries

    def state(self, slice: int) -> SliceState:
        self._check_slice(slice)
        if slice in self._assigned:
            return SliceState.ASSIGNED
        return SliceState.USED if slice in self._used else SliceState.AVAILABLE

    def holder(self, slice: int) -> Assignment | None:
        """Who holds ``slice`` now, if anyone."""
        self._check_slice(slice)
        return self._assigned.get(slice)

    def assigned_to(self, worker: str) -> list[Assignment]:
        """``worker``'s current assignments, oldest first."""
        return [a for a in self._assigned.values() if a.worker == worker]

    @property
    def stats(self) -> TrackerStats:
        return TrackerStats(
            epoch=self._epoch,
            available=len(self._available),
            in_flight=len(self._assigned),
            used=len(self._used),
            assigned_total=self._assigned_total,
            used_total=self._used_total,
            released_total=self._released_total,
            reassigned_total=self._reassigned_total,
        )

    # ------------------------------------------------------------------------------------------
    # persistence

    def snapshot(self) -> dict[str, Any]:
        """The whole state as a JSON-able dict; :meth:`restore` takes it back."""
        return {
            "format": _SNAPSHOT_FORMAT,
            "version": _SNAPSHOT_VERSION,
            "dataset": self.dataset,
            "n_slices": self.n_slices,
            "seed": self.seed,
            "max_assigned_per_worker": self.max_assigned_per_worker,
            "epoch": self._epoch,
            "available": list(self._available),
            "assigned": [
                {"slice": a.slice, "worker": a.worker, "job": a.job, "epoch": a.epoch}
                for a in self._assigned.values()
            ],
            "used": sorted(self._used),
            "released": sorted(self._released),
            "counters": {
                "assigned": self._assigned_total,
                "used": self._used_total,
                "released": self._released_total,
                "reassigned": self._reassigned_total,
            },
        }

    @classmethod
    def restore(
        cls,
        snapshot: object,
        *,
        dataset: str | None = None,
        n_slices: int | None = None,
    ) -> SliceTracker:
        """Rebuild a tracker from :meth:`snapshot`'s dict, validating it in full. With
        ``dataset`` / ``n_slices`` the snapshot must also be of that dataset."""
        d = _fields(snapshot, "snapshot", _SNAPSHOT_KEYS)
        if d["format"] != _SNAPSHOT_FORMAT:
            raise TrackerError(f"snapshot: not a slice tracker snapshot (format {d['format']!r})")
        if d["version"] != _SNAPSHOT_VERSION or not _is_int(d["version"]):
            raise TrackerError(
                f"snapshot: version {d['version']!r} is not supported (this Hypha reads "
                f"{_SNAPSHOT_VERSION})"
            )
        try:
            tracker = cls(
                d["dataset"],
                d["n_slices"],
                seed=d["seed"],
                max_assigned_per_worker=d["max_assigned_per_worker"],
            )
        except TrackerError as exc:
            raise TrackerError(f"snapshot: {exc}") from None
        if dataset is not None and tracker.dataset != dataset:
            raise TrackerError(f"snapshot: it tracks dataset {tracker.dataset!r}, not {dataset!r}")
        if n_slices is not None and tracker.n_slices != n_slices:
            raise TrackerError(
                f"snapshot: it tracks {tracker.n_slices} slices of {tracker.dataset!r}, the "
                f"dataset has {n_slices}; was the dataset prepared again?"
            )
        epoch = _count(d["epoch"], "snapshot.epoch")
        available = [
            tracker._slice_at(v, f"snapshot.available[{i}]")
            for i, v in enumerate(_list(d["available"], "snapshot.available"))
        ]
        used = [
            tracker._slice_at(v, f"snapshot.used[{i}]")
            for i, v in enumerate(_list(d["used"], "snapshot.used"))
        ]
        released = [
            tracker._slice_at(v, f"snapshot.released[{i}]")
            for i, v in enumerate(_list(d["released"], "snapshot.released"))
        ]
        assigned: dict[int, Assignment] = {}
        per_worker: dict[str, int] = {}
        for i, raw in enumerate(_list(d["assigned"], "snapshot.assigned")):
            where = f"snapshot.assigned[{i}]"
            a = _fields(raw, where, {"slice", "worker", "job", "epoch"}
                        if isinstance(raw, dict) and "epoch" in raw
                        else {"slice", "worker", "job"})
            s = tracker._slice_at(a["slice"], f"{where}.slice")
            worker, job = a["worker"], a["job"]
            held_epoch = _count(a.get("epoch", epoch), f"{where}.epoch")
            if held_epoch > epoch:
                raise TrackerError(f"{where}.epoch: {held_epoch} is after the snapshot's epoch "
                                   f"{epoch}")
            if not isinstance(worker, str) or not worker:
                raise TrackerError(f"{where}.worker: expected a non-empty string, got {worker!r}")
            if job is not None and not isinstance(job, str):
                raise TrackerError(f"{where}.job: expected a string or null, got {job!r}")
            if s in assigned:
                raise TrackerError(f"{where}: slice {s} is assigned twice")
            assigned[s] = Assignment(s, held_epoch, worker, job)
            per_worker[worker] = per_worker.get(worker, 0) + 1
            if per_worker[worker] > tracker.max_assigned_per_worker:
                raise TrackerError(
                    f"{where}: worker {worker!r} holds more than max_assigned_per_worker="
                    f"{tracker.max_assigned_per_worker} slices"
                )
        every = available + list(assigned) + used
        if sorted(every) != list(range(tracker.n_slices)):
            twice = sorted(s for s, n in Counter(every).items() if n > 1)
            lost = sorted(set(range(tracker.n_slices)) - set(every))
            raise TrackerError(
                "snapshot: available, assigned and used must hold every slice exactly once "
                f"(in several: {twice[:10]}; in none: {lost[:10]})"
            )
        if len(used) == tracker.n_slices:
            raise TrackerError("snapshot: every slice is used but the next epoch has not begun")
        if not set(released) <= set(available):
            raise TrackerError("snapshot.released: must list only available slices")
        counters = _fields(
            d["counters"], "snapshot.counters", {"assigned", "used", "released", "reassigned"}
        )
        totals = {k: _count(v, f"snapshot.counters.{k}") for k, v in counters.items()}
        if totals["assigned"] < len(assigned) + len(used) or totals["used"] < len(used):
            raise TrackerError("snapshot.counters: fewer assignments than the slices in use")
        tracker._epoch = epoch
        tracker._available = deque(available)
        tracker._assigned = assigned
        tracker._used = set(used)
        tracker._released = set(released)
        tracker._assigned_total = totals["assigned"]
        tracker._used_total = totals["used"]
        tracker._released_total = totals["released"]
        tracker._reassigned_total = totals["reassigned"]
        return tracker

    # ------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s shuffled order of the slices (the same for the same seed)."""
        key = f"hypha-slices\0{self.dataset}\0{self.seed}\0{epoch}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest(), "big"))
        order = list(range(self.n_slices))
        rng.shuffle(order)
        return order

    def _start_epoch(self, epoch: int, held: set[int] | None = None) -> None:
        """Begin ``epoch``; slices in ``held`` are still ASSIGNED in the one before and join
        this one when done."""
        self._epoch = epoch
        self._used.clear()
        self._released.clear()
        self._available = deque(s for s in self._order(epoch) if not held or s not in held)

    def _check_slice(self, slice: int) -> None:
        if not _is_int(slice) or not 0 <= slice < self.n_slices:
            raise TrackerError(
                f"{self.dataset!r} has slices 0..{self.n_slices - 1}; there is no slice {slice!r}"
            )

    def _slice_at(self, value: object, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.n_slices:
            raise TrackerError(f"{where}: expected a slice 0..{self.n_slices - 1}, got {value!r}")
        return value


_SNAPSHOT_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "dataset",
        "n_slices",
        "seed",
        "max_assigned_per_worker",
        "epoch",
        "available",
        "assigned",
        "used",
        "released",
        "counters",
    }
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_worker(worker: object) -> None:
    if not isinstance(worker, str) or not worker:
        raise TrackerError(f"worker must be a non-empty string (its peer id), got {worker!r}")


def _fields(value: object, where: str, keys: set[str] | frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TrackerError(f"{where}: expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise TrackerError(f"{where}: unknown key {unknown[0]!r}")
    missing = sorted(keys - set(value))
    if missing:
        raise TrackerError(f"{where}: missing key {missing[0]!r}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TrackerError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _count(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TrackerError(f"{where}: expected an integer >= 0, got {value!r}")
    return value
