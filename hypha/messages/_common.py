"""Types shared by several protocols: resources, executors, peer ids, ids and timestamps."""

from __future__ import annotations

import uuid
from typing import Annotated, Final, Literal

from hypha.messages._codec import Message, Range, Text

__all__ = [
    "GIB",
    "MAX_LEASE_TTL",
    "DatasetName",
    "Executor",
    "ExecutorKind",
    "Id",
    "LeaseTTL",
    "PeerId",
    "Resources",
    "Timestamp",
    "new_id",
]

GIB: Final = 1 << 30
#: The longest a lease may be held or renewed for at once, in seconds.
MAX_LEASE_TTL: Final = 3600.0

#: A libp2p peer id in its base58 text form (``QmYyQ...``, ``12D3KooW...``).
# NOTE: checked by shape only, so that messages need not import libp2p.
PeerId = Annotated[str, Text(128, min_len=20, pattern=r"[1-9A-HJ-NP-Za-km-z]{20,128}",
                             hint="a base58 peer id (20-128 characters of "
                                  "[1-9A-HJ-NP-Za-km-z])")]
#: A request, lease or job id: 32 lower-case hex digits, as made by :func:`new_id`.
Id = Annotated[str, Text(32, min_len=32, pattern=r"[0-9a-f]{32}",
                         hint="an id of 32 lower-case hex digits (uuid4().hex)")]
#: A point in time, in Unix seconds.
Timestamp = Annotated[float, Range(ge=0)]
#: How long a lease is held, in seconds.
LeaseTTL = Annotated[float, Range(gt=0, le=MAX_LEASE_TTL)]
#: The name a data node announces a prepared dataset under.
DatasetName = Annotated[str, Text(64, min_len=1, pattern=r"[a-z0-9._-]{1,64}")]

ExecutorKind = Literal["process", "parameter-server"]

# NOTE: float cpu sums carry rounding residue (0.1 + 0.2 - 0.3 > 0); fits() and subtraction
# forgive this much so that adding then removing the same jobs returns to where it started.
_CPU_SLACK: Final = 1e-9


def new_id() -> str:
    """A fresh request, lease or job id."""
    return uuid.uuid4().hex


class Resources(Message):
    """Compute resources: what a job asks for, what a worker offers or still has free.

    ``cpu`` in cores (fractions allowed), ``memory`` and ``storage`` in bytes, ``gpu`` in whole
    devices. ``Resources()`` is nothing at all; ``+`` and ``-`` add and remove holdings.
    """

    cpu: Annotated[float, Range(ge=0)] = 0.0
    memory: Annotated[int, Range(ge=0)] = 0
    storage: Annotated[int, Range(ge=0)] = 0
    gpu: Annotated[int, Range(ge=0)] = 0

    def fits(self, other: Resources) -> bool:
        """True when every component of ``self`` is at most that of ``other``."""
        return (self.cpu <= other.cpu + _CPU_SLACK and self.memory <= other.memory
                and self.storage <= other.storage and self.gpu <= other.gpu)

    def capacity(self) -> float:
        """One number for how much this is, so that offers can be compared by capacity / price.

        ``cpu + memory / GiB + storage / (100 GiB) + 4 * gpu``
        """
        # NOTE: the weights price one core like 1 GiB of memory, 100 GiB of storage or a quarter
        # of a GPU. They are a rough exchange rate for ranking offers of different shapes, not a
        # measurement; a scheduler that cares about one component should compare it directly.
        return self.cpu + self.memory / GIB + self.storage / (100 * GIB) + 4.0 * self.gpu

    def __add__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        return Resources(cpu=self.cpu + other.cpu, memory=self.memory + other.memory,
                         storage=self.storage + other.storage, gpu=self.gpu + other.gpu)

    def __sub__(self, other: Resources) -> Resources:
        """What is left after taking ``other`` away; ValueError if any component would go
        below zero."""
        if not isinstance(other, Resources):
            return NotImplemented
        if not other.fits(self):
            short = [name for name, mine, theirs in (
                ("cpu", self.cpu + _CPU_SLACK, other.cpu), ("memory", self.memory, other.memory),
                ("storage", self.storage, other.storage), ("gpu", self.gpu, other.gpu))
                if theirs > mine]
            raise ValueError(f"cannot take {other} from {self}: {', '.join(short)} would go "
                             "below zero")
        return Resources(cpu=max(self.cpu - other.cpu, 0.0), memory=self.memory - other.memory,
                         storage=self.storage - other.storage, gpu=self.gpu - other.gpu)


class Executor(Message):
    """A way of running a job that a worker provides.

    ``kind`` is ``"process"`` (any training script, talking to the worker over the job bridge)
    or ``"parameter-server"`` (the built-in DiLoCo aggregator); ``name`` picks one executor of
    that kind on the worker; ``runtime`` is what it runs on (``"python3.11"``, ``"torch-2.13"``).
    """

    kind: ExecutorKind
    name: Annotated[str, Text(64, min_len=1, pattern=r"[a-z0-9._-]{1,64}")]
    runtime: Annotated[str, Text(64, min_len=1, pattern=r"[A-Za-z0-9._+-]{1,64}")]
