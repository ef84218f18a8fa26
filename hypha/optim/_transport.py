"""How DiLoCo workers move bytes: one small interface, three implementations.

A :class:`Transport` connects ``world_size`` ranks. It sends a message (bytes) to a peer without
waiting for the peer, and receives the next message from a given peer; messages between two ranks
arrive in the order they were sent. That is all DiLoCo needs: a payload travels as several
messages (the codec header, then one message per chunk), so a receiver decodes chunks while later
ones are still on the wire. The Hypha network plugs in by implementing the same four calls over
its streams.

* :class:`LocalTransport`: ranks are threads of one process (tests, simulating a run on a laptop).
* :class:`PipeTransport`: ranks are processes on one machine, connected by OS pipes.
* :class:`DistTransport`: ranks of a ``torch.distributed`` process group (gloo, or NCCL).

Only one thread per rank may call a transport (the optimizer's exchange thread does).
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from abc import ABC, abstractmethod
from multiprocessing.connection import Connection
from typing import Any

import torch

__all__ = ["DistTransport", "LocalTransport", "PipeTransport", "Transport"]

Buffer = bytes | bytearray | memoryview


class Transport(ABC):
    """Point-to-point messages between ``world_size`` ranks; this object is rank ``rank``.

    Subclasses implement :meth:`_send` and :meth:`_recv`; the public methods check the peer and
    count the bytes (``bytes_sent`` / ``bytes_received``: message bodies plus whatever framing
    the implementation puts on the wire).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.rank = rank
        self.world_size = world_size
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False

    def _check_peer(self, peer: int) -> None:
        if self.closed:
            raise ConnectionError(f"rank {self.rank}: the transport is closed")
        if not isinstance(peer, int) or not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(
                f"rank {self.rank}: peer must be another rank in [0, {self.world_size}), got {peer!r}"
            )

    def send(self, peer: int, data: Buffer) -> None:
        """Queues ``data`` for ``peer`` and returns without waiting for the peer to receive it.
        The caller may reuse ``data`` afterwards."""
        self._check_peer(peer)
        self.bytes_sent += self._send(peer, data)

    def recv(self, peer: int, timeout: float | None = None) -> bytes:
        """The next message from ``peer``. Raises TimeoutError after ``timeout`` seconds, and
        ConnectionError when the peer is gone."""
        self._check_peer(peer)
        data, wire = self._recv(peer, timeout)
        self.bytes_received += wire
        return data

    def flush(self, timeout: float | None = None) -> None:  # noqa: B027 (optional override)
        """Waits until every queued message has been handed to its peer (or the OS); a transport
        whose sends are delivered when queued keeps this no-op."""

    def close(self) -> None:
        self.closed = True

    @abstractmethod
    def _send(self, peer: int, data: Buffer) -> int:
        """Queues the message; returns the bytes it puts on the wire."""

    @abstractmethod
    def _recv(self, peer: int, timeout: float | None) -> tuple[bytes, int]:
        """Returns the next message from ``peer`` and the bytes it took on the wire."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


_CLOSED = object()  # end-of-stream marker in a LocalTransport queue


class LocalTransport(Transport):
    """Ranks as threads of one process: one unbounded queue per (sender, receiver) pair.

    >>> comms = LocalTransport.create(4)   # hand comms[i] to worker thread i
    """

    def __init__(self, rank: int, world_size: int, queues: dict[tuple[int, int], queue.Queue[Any]]):
        super().__init__(rank, world_size)
        self._queues = queues

    @classmethod
    def create(cls, world_size: int) -> list[LocalTransport]:
        queues: dict[tuple[int, int], queue.Queue[Any]] = {
            (a, b): queue.Queue() for a in range(world_size) for b in range(world_size) if a != b
        }
        return [cls(rank, world_size, queues) for rank in range(world_size)]

    def _send(self, peer: int, data: Buffer) -> int:
        message = bytes(data)
        self._queues[(self.rank, peer)].put(message)
        return len(message)

    def _recv(self, peer: int, timeout: float | None) -> tuple[bytes, int]:
        try:
            item = self._queues[(peer, self.rank)].get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"rank {self.rank}: nothing from rank {peer} within {timeout} s"
            ) from None
        if item is _CLOSED:
            self._queues[(peer, self.rank)].put(_CLOSED)  # later calls see it too
            raise ConnectionError(f"rank {self.rank}: rank {peer} closed its transport")
        return item, len(item)

    def close(self) -> None:
        if not self.closed:
            for peer in range(self.world_size):
                if peer != self.rank:
                    self._queues[(self.rank, peer)].put(_CLOSED)
        super().close()


class PipeTransport(Transport):
    """Ranks as processes on one machine, connected pairwise by OS pipes.

    ``PipeTransport.create(n)`` returns one transport per rank; pass each to its process (they
    pickle into ``multiprocessing.Process(args=...)``). A sender thread per peer writes the
    queued messages, so :meth:`send` never blocks on a full pipe.
    """

    def __init__(self, rank: int, world_size: int, conns: dict[int, Connection]) -> None:
        super().__init__(rank, world_size)
        if sorted(conns) != [p for p in range(world_size) if p != rank]:
            raise ValueError(
                f"rank {rank} needs one connection per peer, got peers {sorted(conns)}"
            )
        self._conns = conns
        self._outbox: dict[int, queue.Queue[Any]] = {}
        self._senders: dict[int, threading.Thread] = {}
        self._errors: dict[int, BaseException] = {}

    @classmethod
    def create(cls, world_size: int, *, context: Any = None) -> list[PipeTransport]:
        import multiprocessing

        ctx = context or multiprocessing.get_context()
        conns: list[dict[int, Connection]] = [{} for _ in range(world_size)]
        for a in range(world_size):
            for b in range(a + 1, world_size):
                conns[a][b], conns[b][a] = ctx.Pipe(duplex=True)
        return [cls(rank, world_size, conns[rank]) for rank in range(world_size)]

    def __getstate__(self) -> dict[str, Any]:
        if self._senders:
            raise RuntimeError(
                "a PipeTransport can be sent to another process only before first use"
            )
        return {"rank": self.rank, "world_size": self.world_size, "conns": self._conns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["rank"], state["world_size"], state["conns"])  # type: ignore[misc]

    def _sender(self, peer: int) -> None:
        conn, box = self._conns[peer], self._outbox[peer]
        while (item := box.get()) is not _CLOSED:
            try:
                conn.send_bytes(item)
            except (OSError, ValueError) as exc:  # the peer is gone: report on the next call
                self._errors[peer] = exc
            finally:
                box.task_done()
        box.task_done()

    def _send(self, peer: int, data: Buffer) -> int:
        if peer in self._errors:
            raise ConnectionError(
                f"rank {self.rank}: sending to rank {peer} failed: {self._errors[peer]}"
            )
        if peer not in self._senders:
            self._outbox[peer] = queue.Queue()
            thread = threading.Thread(
                target=self._sender,
                args=(peer,),
                name=f"hypha-pipe-{self.rank}->{peer}",
                daemon=True,
            )
            self._senders[peer] = thread
            thread.start()
        message = bytes(data)
        self._outbox[peer].put(message)
        return len(message) + 4  # multiprocessing frames each message with a 4-byte length

    def _recv(self, peer: int, timeout: float | None) -> tuple[bytes, int]:
        conn = self._conns[peer]
        try:
            if not conn.poll(timeout):
                raise TimeoutError(f"rank {self.rank}: nothing from rank {peer} within {timeout} s")
            data = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise ConnectionError(f"rank {self.rank}: rank {peer} is gone ({exc!r})") from None
        return data, len(data) + 4

    def flush(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for peer, box in self._outbox.items():
            while box.unfinished_tasks:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"rank {self.rank}: rank {peer} did not take its messages")
                time.sleep(0.001)
            if peer in self._errors:
                raise ConnectionError(
                    f"rank {self.rank}: sending to rank {peer} failed: {self._errors[peer]}"
                )

    def close(self) -> None:
        if self.closed:
            return
        for box in self._outbox.values():
            box.put(_CLOSED)
        for thread in self._senders.values():
            thread.join(timeout=10)
        for conn in self._conns.values():
            conn.close()
        super().close()


_LEN = torch.int64


class DistTransport(Transport):
    """Ranks of a ``torch.distributed`` process group, over its point-to-point send/recv.

    By default it makes its own gloo group of all ranks (a collective call: every rank constructs
    it at the same point), so the exchange never interleaves with the user's own collectives and
    works whatever the default backend is: DiLoCo's payloads are compressed host bytes, and gloo
    moves them without a trip through the GPU. Pass ``group=`` an NCCL group to move them through
    the GPU instead (the bytes are then copied to ``torch.cuda.current_device()``).

    Each message is two sends: its length (8 bytes) and its body.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistTransport needs torch.distributed initialised first "
                "(torchrun, or dist.init_process_group(...))"
            )
        self._dist = dist
        self._group = group if group is not None else dist.new_group(backend="gloo")
        super().__init__(dist.get_rank(self._group), dist.get_world_size(self._group))
        backend = str(dist.get_backend(self._group)).lower()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )
        self._pending: list[tuple[Any, tuple[torch.Tensor, ...]]] = []

    def _global(self, peer: int) -> int:
        return int(self._dist.get_global_rank(self._group, peer))

    def _send(self, peer: int, data: Buffer) -> int:
        n = len(memoryview(data).cast("B"))
        length = torch.tensor([n], dtype=_LEN, device=self.device)
        tensors: tuple[torch.Tensor, ...] = (length,)
        works = [self._dist.isend(length, self._global(peer), group=self._group)]
        if n:
            body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
            tensors += (body,)
            works.append(self._dist.isend(body, self._global(peer), group=self._group))
        self._pending.extend((w, tensors) for w in works)
        if len(self._pending) > 64:  # forget finished sends now and then, not on every send
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        return n + 8

    def _wait(self, work: Any, peer: int, timeout: float | None) -> None:
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:
            text = str(exc).lower()
            if "timeout" in text or "timed out" in text:
                raise TimeoutError(
                    f"rank {self.rank}: nothing from rank {peer} within {timeout} s"
                ) from exc
            raise ConnectionError(
                f"rank {self.rank}: receiving from rank {peer} failed: {exc}"
            ) from exc

    def _recv(self, peer: int, timeout: float | None) -> tuple[bytes, int]:
        length = torch.empty(1, dtype=_LEN, device=self.device)
        self._wait(self._dist.irecv(length, self._global(peer), group=self._group), peer, timeout)
        n = int(length.item())
        if n < 0 or n > 1 << 34:
            raise ConnectionError(f"rank {self.rank}: rank {peer} announced a message of {n} bytes")
        if n == 0:
            return b"", 8
        body = torch.empty(n, dtype=torch.uint8, device=self.device)
        self._wait(self._dist.irecv(body, self._global(peer), group=self._group), peer, timeout)
        return body.cpu().numpy().tobytes(), n + 8

    def flush(self, timeout: float | None = None) -> None:
        for work, _ in self._pending:
            self._wait(work, -1, timeout)
        self._pending.clear()

    def close(self) -> None:
        if not self.closed:
            try:
                self.flush(timeout=30)
            finally:
                super().close()
