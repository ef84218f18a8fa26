"""A bridge backend without a network: local files, and an in-memory loopback between bridges.

``LocalBackend`` serves single-machine runs and tests. It fetches ``source="path"`` files from
the work dir or from allow-listed directories; ``"peer"`` and ``"data"`` sources need the network
and answer 501. Backends that share a :class:`Loopback` can send each other files by peer id, so
two bridges in one process exchange files as two workers would. Metrics reports are kept in
memory (``reports``) and answered with a fixed instruction.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType

import trio

from hypha.executors._paths import (
    AtomicFile,
    confine,
    confine_source,
    open_for_reading,
)
from hypha.executors.bridge import (
    BridgeError,
    FetchRequest,
    IncomingFile,
    Instruction,
    deliver,
    incoming_destination,
)

__all__ = ["LocalBackend", "Loopback", "Report"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _copy(source: Path, dest: Path, *, overwrite: bool) -> tuple[Path, int]:
    """Copy checked ``source`` to checked ``dest`` atomically; blocking."""
    with open_for_reading(source) as src, AtomicFile(dest) as out:
        size = 0
        while chunk := src.read(_CHUNK):
            out.file.write(chunk)
            size += len(chunk)
        return out.commit(overwrite=overwrite), size


@dataclass(frozen=True)
class Report:
    """One ``POST /metrics`` a :class:`LocalBackend` received."""

    step: int
    values: dict[str, float]


class Loopback:
    """An in-memory "network" joining :class:`LocalBackend` s of one process by peer id."""

    def __init__(self) -> None:
        self._members: dict[str, LocalBackend] = {}

    def _join(self, peer_id: str, backend: LocalBackend) -> None:
        if peer_id in self._members:
            raise ValueError(f"peer id {peer_id!r} is already on this loopback")
        self._members[peer_id] = backend

    def _leave(self, peer_id: str) -> None:
        self._members.pop(peer_id, None)

    def _find(self, peer_id: str) -> LocalBackend:
        member = self._members.get(peer_id)
        if member is None:
            raise ConnectionError(f"peer {peer_id} is not reachable (not on this loopback)")
        return member


class LocalBackend:
    """A :class:`~hypha.executors.bridge.BridgeBackend` for one machine.

    - ``fetch`` with ``source="path"`` copies a file: a relative ``path`` is confined to the
      work dir; an absolute one must resolve inside the work dir or one of ``allowed_dirs``.
      Everything else is refused with 403.
    - ``send`` and ``incoming`` go through ``loopback`` under the name ``peer_id``; received
      files land in the receiver's ``incoming/`` (never overwriting: ``name-1.ext`` etc.) and
      wait in a queue of ``queue_size`` for a receive stream (a sender blocks when it is full).
      Without a loopback, ``send`` answers 501.

    - ``report`` appends each metrics report to ``reports`` (the last ``max_reports``) and
      answers ``instruction``: by default none (all None), as a job without a scheduler gets.
      Assign ``instruction`` to change the answer.

    ``close()`` (or leaving ``with``) takes it off the loopback and ends its receive streams.
    """

    def __init__(self, work_dir: Path, *, allowed_dirs: Iterable[Path] = (),
                 peer_id: str = "local", loopback: Loopback | None = None,
                 queue_size: int = 64, instruction: Instruction | None = None,
                 max_reports: int = 10_000) -> None:
        if queue_size < 1:
            raise ValueError(f"Invalid queue_size: {queue_size}")
        if max_reports < 1:
            raise ValueError(f"Invalid max_reports: {max_reports}")
        self.work_dir = Path(work_dir).resolve(strict=True)
        self.allowed_dirs = tuple(Path(d).resolve(strict=True) for d in allowed_dirs)
        for directory in (self.work_dir, *self.allowed_dirs):
            if not directory.is_dir():
                raise NotADirectoryError(f"{directory} is not a directory")
        self.peer_id = peer_id
        self._loopback = loopback
        self._inbox, self._outbox = trio.open_memory_channel[IncomingFile](queue_size)
        self._closed = False
        self.instruction: Instruction = instruction if instruction is not None else {
            "round": None, "batches": None, "parameter_server": None}
        self.reports: deque[Report] = deque(maxlen=max_reports)
        if loopback is not None:
            loopback._join(peer_id, self)

    async def fetch(self, request: FetchRequest, dest: Path) -> int:
        if request.source != "path":
            what = "a peer" if request.source == "peer" else "a data node"
            raise BridgeError(501, f"fetching from {what} (source {request.source!r}) is not "
                                   "available without a network: this bridge runs on the "
                                   "local backend")
        assert request.path is not None  # FetchRequest checks it
        if request.path.startswith("/"):
            source = confine_source((self.work_dir, *self.allowed_dirs), request.path)
        else:
            source = confine(self.work_dir, request.path, "path")
        _, size = await trio.to_thread.run_sync(partial(_copy, source, dest, overwrite=True))
        return size

    async def send(self, path: Path, peers: list[str], strategy: str, name: str) -> list[str]:
        loopback = self._loopback
        if loopback is None:
            raise BridgeError(501, "sending to peers is not available without a network: this "
                                   "bridge runs on the local backend")

        async def send_one(peer: str) -> None:
            await loopback._find(peer)._accept(self.peer_id, path, name)

        return await deliver(peers, strategy, send_one)

    async def incoming(self) -> AsyncIterator[IncomingFile]:
        async for file in self._outbox:
            yield file

    async def report(self, step: int, values: dict[str, float]) -> Instruction:
        self.reports.append(Report(step, dict(values)))
        return Instruction(**self.instruction)

    async def _accept(self, sender: str, source: Path, name: str) -> None:
        """Take a file that ``sender`` sends: write it under incoming/, then queue it."""
        if self._closed:
            raise ConnectionError(f"peer {self.peer_id} has closed")
        dest = incoming_destination(self.work_dir, name)
        final, size = await trio.to_thread.run_sync(
            partial(_copy, source, dest, overwrite=False))
        log.info("peer %s: received %s (%d bytes) from %s", self.peer_id, final.name, size,
                 sender)
        await self._inbox.send(IncomingFile(final, sender, name, size))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loopback is not None:
            self._loopback._leave(self.peer_id)
        self._inbox.close()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
