"""The job bridge's backend on the Hypha network: data slices, files between peers, local files.

One :class:`NetworkBackend` per job, built by the worker's job manager; one :class:`StreamRouter`
per worker, installed as the network's only tensor-stream handler.

``fetch`` (``POST /resources/fetch``):

* ``source="data"`` without ``slice``: the job's next slice. The backend asks the job's scheduler
  (``/hypha/data-slice/1``), which assigns one and names the data node serving it; asks that
  node for it (``/hypha/data-fetch/1``), receives the tensor stream ``slice:<dataset>:<n>``,
  writes it atomically at ``dest`` and checks its size and SHA-256 against the node's answer
  and the stream's meta. While every slice of the epoch is handed out, it asks again with
  backoff until one is free (the script's request waits). Slices of one dataset are fetched one
  at a time per job.
* ``source="data"`` with ``slice``: that slice, from a data node found in the DHT, outside the
  scheduler's bookkeeping (evaluation data, a slice to look at).
* ``source="path"``: a local file, as :class:`~hypha.executors.LocalBackend` does it.
* ``source="peer"``: the file ``path`` that ``peer`` serves (``/hypha/file-fetch/1``, see
  :mod:`hypha.files`; the scheduler serves the job's files and names itself in the job's config
  as ``files_peer``). The peer answers with the file's size and SHA-256 and the name of the
  tensor stream ``file-fetch:<token>`` that carries it; the backend writes it atomically at
  ``dest`` and checks both (a mismatch: 502, nothing written). The peer's refusals keep its
  message: 400 (a malformed path, not a regular file), 403 (outside the served directory, not
  allowed), 404 (no such file), 503 (busy); an unreachable peer or a broken transfer is 502.

**When a slice counts as used.** The scheduler marks a slice USED when the job is done with it,
which the job says by asking for its next slice of that dataset, or by finishing (exit 0):
:meth:`NetworkBackend.finish` then reports the slices it was handed. A job that fails or is
stopped reports nothing, and the scheduler gives its slices back to AVAILABLE when it learns of
the job's end, as it does for a worker it lost: a slice is never counted as trained on by a job
that did not get through it.

**Prefetch.** After each slice it hands over, the backend asks for the next one at once and
downloads it into ``.hypha/prefetch/`` (the worker's part of the work directory), one slice
ahead at most. The next fetch waits for that download instead of starting one, and copies the
file into place. A prefetch that fails, or finds no slice free, leaves nothing behind: the next
fetch does the work itself (a slice assigned but not downloaded is fetched first).

``send`` (``POST /resources/send``) opens a tensor stream ``file:<scheduler>:<name>`` (meta
``{"job", "size"}``) to each peer, with the strategies of :func:`~hypha.executors.deliver`.
On the receiving worker the router hands it to a job of the same scheduler (jobs of one run
exchange files; a job id is not known to other workers), which writes it under ``incoming/``
and yields it from ``incoming()`` (``POST /resources/receive``). The sender is a peer with a
certificate of the network's CA; what it claims in the meta is not checked further. Every file
is bounded by :data:`MAX_FILE_BYTES` and every job by a queue of files waiting to be received.

``report`` (``POST /metrics``) returns at once with the latest instruction the job's scheduler
gave (round, batches, parameter server; all None before its first answer). The report itself
waits for a background task that sends it to the scheduler as
:class:`~hypha.messages.MetricsReport` (``/hypha/metrics/1``), one at a time and at most one
every :data:`METRICS_INTERVAL` seconds: a report that comes while another waits replaces it
(the latest wins), and a step lower than one already reported is refused (400). The instruction
is the one in the scheduler's latest answer. A report that cannot be delivered is dropped and
logged (a warning every :data:`METRICS_WARN_INTERVAL` seconds at most); the script never sees
it. :meth:`NetworkBackend.finish` sends the last report before it reports the slices used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, cast

import trio
from libp2p.peer.id import ID

from hypha.data.node import NO_SLICE_AVAILABLE, dataset_key, slice_stream
from hypha.executors._paths import PathRefused
from hypha.executors.bridge import (
    PRIVATE_DIR,
    BridgeError,
    FetchRequest,
    IncomingFile,
    Instruction,
    deliver,
    incoming_destination,
    read_chunks,
    write_chunks,
)
from hypha.executors.local import LocalBackend
from hypha.files import BUSY, FILE_FETCH_PREFIX, FORBIDDEN, INVALID, NOT_FOUND
from hypha.messages import (
    PROTOCOLS,
    DataSliceAssignment,
    DataSliceDone,
    DataSliceRecorded,
    DataSliceRequest,
    FetchFile,
    FetchSlice,
    FileComing,
    MessageError,
    MetricsReceived,
    MetricsReport,
    SliceComing,
    decode,
    encode,
)
from hypha.net import (
    DialError,
    IncomingTensorStream,
    Network,
    NetworkClosed,
    RemoteError,
    RPCError,
    TensorStreamError,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "FILE_PREFIX",
    "MAX_FILE_BYTES",
    "MAX_SLICE_BYTES",
    "SLICE_PREFIX",
    "FileReceiver",
    "NetworkBackend",
    "StreamRouter",
    "checkpoint_stream",
    "file_stream",
]

log = logging.getLogger(__name__)

#: Tensor streams carrying data slices are named ``slice:<dataset>:<n>``.
SLICE_PREFIX: Final = "slice:"
#: Tensor streams carrying files between jobs are named ``file:<scheduler>:<name>``.
FILE_PREFIX: Final = "file:"
#: Tensor streams carrying a parameter server's checkpoint to its scheduler are named
#: ``checkpoint:<job id>:<round>``.
CHECKPOINT_PREFIX: Final = "checkpoint:"
#: The largest slice a worker accepts.
MAX_SLICE_BYTES: Final = 16 << 30
#: The largest file a job accepts from a peer.
MAX_FILE_BYTES: Final = 16 << 30
#: Seconds an RPC (to the scheduler or a data node) may take.
RPC_TIMEOUT: Final = 10.0
#: Seconds a data node may take to start the stream it announced (it may be busy with others).
STREAM_START_TIMEOUT: Final = 120.0
#: Seconds a peer may take to answer a file fetch.
# NOTE: longer than RPC_TIMEOUT: the peer reads the whole file for its SHA-256 before it answers
# (16 GiB at ~1 GB/s; cached after the first fetch).
FILE_RPC_TIMEOUT: Final = 300.0
#: Seconds a stream from a peer waits at the router for the fetch that asked for it to learn its
#: name (the peer may open it before its answer to the fetch has been read).
ANNOUNCE_WAIT: Final = 30.0
#: Seconds a stream may stall between two chunks.
IDLE_TIMEOUT: Final = 60.0
#: Seconds to open a stream to a peer a file is sent to.
CONNECT_TIMEOUT: Final = 30.0
#: Attempts at one slice's transfer before the fetch fails (502).
TRANSFER_ATTEMPTS: Final = 3
#: Seconds between asking for a slice again while none is available (doubling, capped).
SLICE_RETRY: Final = (0.5, 10.0)
#: Files received at once per job; more senders wait (their streams stall).
MAX_RECEIVING: Final = 4
#: Bytes read from a file per chunk that is sent.
SEND_CHUNK: Final = 4 << 20
#: Seconds between two metrics reports forwarded to the scheduler (the reports in between are
#: replaced by the latest).
METRICS_INTERVAL: Final = 0.1
#: Seconds between two warnings about metrics that could not be forwarded.
METRICS_WARN_INTERVAL: Final = 60.0
_PREFETCH_DIR: Final = "prefetch"


def file_stream(scheduler: str, name: str) -> str:
    """The name of the tensor stream that carries file ``name`` to the jobs of ``scheduler``."""
    return f"{FILE_PREFIX}{scheduler}:{name}"


def checkpoint_stream(job_id: str, round_: int) -> str:
    """The name of the tensor stream that carries parameter-server job ``job_id``'s checkpoint
    after ``round_`` rounds to its scheduler (see :mod:`hypha.scheduler.custody`)."""
    return f"{CHECKPOINT_PREFIX}{job_id}:{round_}"


class _TransferFailed(Exception):
    """One attempt at a slice's transfer failed; another may succeed."""


class _NoSliceYet(Exception):
    """The scheduler has no slice free now."""


# ------------------------------------------------------------------------------------------------
# routing incoming streams


class _Expected:
    """A fetch waiting for one tensor stream."""

    def __init__(self) -> None:
        self._arrived = trio.Event()
        self.released = trio.Event()
        self._stream: IncomingTensorStream | None = None
        self._announce: Callable[[str], None] | None = None

    def announce(self, name: str) -> None:
        """The stream's name, once known (:meth:`StreamRouter.expect_announced` only)."""
        assert self._announce is not None, "only for StreamRouter.expect_announced"
        self._announce(name)

    def hand(self, stream: IncomingTensorStream) -> None:
        self._stream = stream
        self._arrived.set()

    async def wait(self) -> IncomingTensorStream:
        await self._arrived.wait()
        assert self._stream is not None
        return self._stream


class FileReceiver(Protocol):
    """A job that takes ``file:<scheduler>:<name>`` streams: it says which names it takes, and
    reads (or refuses) each one it is handed."""

    def takes(self, name: str) -> bool: ...

    async def accept(self, incoming: IncomingTensorStream, name: str) -> None: ...


class StreamRouter:
    """The worker's one tensor-stream handler: each incoming stream goes to whoever awaits it.

    * ``slice:...`` streams go to a fetch that registered, with :meth:`expect`, exactly that name
      from exactly that peer (the data node it asked); a slice nobody asked for is refused.
    * ``file-fetch:...`` streams likewise, to a fetch that registered with
      :meth:`expect_announced` before it asked that peer, and learnt the name from its answer;
      while a fetch from that peer still waits for its answer, the stream waits for it.
    * ``file:<scheduler>:<name>`` streams go to a job of ``scheduler`` running here that takes
      ``name`` (:class:`FileReceiver`; the first to have registered, when there are several;
      the parameter-server executor registers first for ``delta-*``); none: refused.
    * Anything else is refused.
    """

    def __init__(self) -> None:
        self._expected: dict[tuple[str, str], deque[_Expected]] = {}
        self._unnamed: Counter[tuple[str, str]] = Counter()  # (peer, prefix) → fetches asking
        self._changed = trio.Event()  # set (and replaced) when an unnamed fetch learns its name
        self._receivers: dict[str, list[FileReceiver]] = {}
        self.refused = 0

    def install(self, net: Network) -> None:
        net.on_tensor_stream(self.handle)

    @contextmanager
    def expect(self, peer: ID, name: str) -> Iterator[_Expected]:
        """Register for the stream ``name`` from ``peer``; the stream is the caller's to read
        until the ``with`` ends (then the sender learns whether it was read to its end)."""
        key = (str(peer), name)
        expected = _Expected()
        self._expected.setdefault(key, deque()).append(expected)
        try:
            yield expected
        finally:
            waiting = self._expected.get(key)
            if waiting is not None and expected in waiting:
                waiting.remove(expected)
                if not waiting:
                    del self._expected[key]
            expected.released.set()

    @contextmanager
    def expect_announced(self, peer: ID, prefix: str) -> Iterator[_Expected]:
        """Register for a stream from ``peer`` whose name (starting with ``prefix``) the caller
        learns later, from the answer to its request: it calls ``announce(name)`` then. Like
        :meth:`expect` otherwise."""
        unnamed = (str(peer), prefix)
        expected = _Expected()
        named: tuple[str, str] | None = None

        def announce(name: str) -> None:
            nonlocal named
            if named is not None or not name.startswith(prefix):
                raise ValueError(f"cannot expect {name!r} here (prefix {prefix!r}, once)")
            named = (str(peer), name)
            self._expected.setdefault(named, deque()).append(expected)
            self._forget_unnamed(unnamed)

        expected._announce = announce
        self._unnamed[unnamed] += 1
        try:
            yield expected
        finally:
            if named is None:
                self._forget_unnamed(unnamed)
            else:
                waiting = self._expected.get(named)
                if waiting is not None and expected in waiting:
                    waiting.remove(expected)
                    if not waiting:
                        del self._expected[named]
            expected.released.set()

    def _forget_unnamed(self, key: tuple[str, str]) -> None:
        self._unnamed[key] -= 1
        if self._unnamed[key] <= 0:
            del self._unnamed[key]
        self._changed.set()
        self._changed = trio.Event()

    def add_receiver(self, scheduler: str, backend: FileReceiver, *, first: bool = False) -> None:
        receivers = self._receivers.setdefault(scheduler, [])
        if first:
            receivers.insert(0, backend)
        else:
            receivers.append(backend)

    def remove_receiver(self, scheduler: str, backend: FileReceiver) -> None:
        receivers = self._receivers.get(scheduler, [])
        if backend in receivers:
            receivers.remove(backend)
        if not receivers:
            self._receivers.pop(scheduler, None)

    async def handle(self, incoming: IncomingTensorStream) -> None:
        name = incoming.name
        if name.startswith(FILE_FETCH_PREFIX):
            # the fetch may not have read the peer's answer yet: wait while one from this peer
            # still waits for its answer
            key, unnamed = (str(incoming.peer), name), (str(incoming.peer), FILE_FETCH_PREFIX)
            with trio.move_on_after(ANNOUNCE_WAIT):
                while not self._expected.get(key) and self._unnamed[unnamed] > 0:
                    await self._changed.wait()
        if name.startswith((SLICE_PREFIX, FILE_FETCH_PREFIX)):
            waiting = self._expected.get((str(incoming.peer), name))
            if not waiting:
                await self._refuse(incoming, f"no fetch of {name!r} from you is waiting here")
                return
            expected = waiting.popleft()
            if not waiting:
                del self._expected[(str(incoming.peer), name)]
            expected.hand(incoming)
            await expected.released.wait()
        elif name.startswith(FILE_PREFIX):
            scheduler, _, file_name = name[len(FILE_PREFIX):].partition(":")
            receiver = next((r for r in self._receivers.get(scheduler, ())
                             if file_name and r.takes(file_name)), None)
            if receiver is None:
                await self._refuse(incoming, f"no job of scheduler {scheduler!r} that takes "
                                   f"{file_name!r} runs on this worker")
                return
            await receiver.accept(incoming, file_name)
        else:
            await self._refuse(incoming, f"this worker takes no tensor stream named {name!r}")

    async def _refuse(self, incoming: IncomingTensorStream, reason: str) -> None:
        self.refused += 1
        log.warning("refused tensor stream %r from %s: %s", incoming.name, incoming.peer, reason)
        await incoming.refuse(reason)


# ------------------------------------------------------------------------------------------------
# the backend


@dataclass(frozen=True)
class _Slice:
    dataset: str
    index: int
    epoch: int | None  #: None: outside the scheduler's bookkeeping
    provider: ID


@dataclass
class _Ahead:
    """A prefetch: its assignment once the scheduler gave one, its file once downloaded."""

    assignment: _Slice | None = None
    path: Path | None = None
    size: int = 0
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Feed:
    """One dataset's slices for one job."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    delivered: list[_Slice] = field(default_factory=list)  #: handed over, not reported used
    pending: _Slice | None = None  #: assigned to us, not handed over (a transfer failed)
    ahead: _Ahead | None = None


class NetworkBackend:
    """A :class:`~hypha.executors.bridge.BridgeBackend` for job ``job_id``, dispatched by
    ``scheduler``, in ``work_dir``; see the module doc.

    Start it with ``await nursery.start(backend.run)`` (prefetches run there, and received files
    are routed to it while it runs); ``await backend.finish()`` when the job exited 0;
    ``await backend.aclose()`` when the job is over. ``counts`` (shared by the worker's jobs)
    counts ``slices fetched``, ``slices prefetched``, ``prefetch used``, ``files fetched``,
    ``files sent``, ``files received``, ``metrics reported`` (by the script), ``metrics sent``
    (to the scheduler) and ``metrics failed`` (not delivered).
    """

    def __init__(self, net: Network, router: StreamRouter, *, job_id: str, scheduler: ID,
                 work_dir: Path, allowed_dirs: Iterable[Path] = (), prefetch: bool = True,
                 queue_size: int = 64, counts: Counter[str] | None = None) -> None:
        self.net = net
        self.router = router
        self.job_id = job_id
        self.scheduler = scheduler
        self.work_dir = Path(work_dir).resolve(strict=True)
        self.prefetch = prefetch
        self.counts: Counter[str] = counts if counts is not None else Counter()
        self._local = LocalBackend(self.work_dir, allowed_dirs=allowed_dirs)
        self._feeds: dict[str, _Feed] = {}
        self._providers: dict[str, ID] = {}
        self._inbox, self._outbox = trio.open_memory_channel[IncomingFile](queue_size)
        self._receiving = trio.Semaphore(MAX_RECEIVING)
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._stopped = trio.Event()
        self._instruction: Instruction = {"round": None, "batches": None,
                                          "parameter_server": None}
        self._report: MetricsReport | None = None  #: waiting to be sent
        self._reported_step = -1
        self._report_ready = trio.Event()
        self._sending_report = trio.Lock()
        self._report_failures = 0  #: since the last warning
        self._report_warned: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Route this job's files to it and host its prefetches, until :meth:`aclose`."""
        self._started = True
        self.router.add_receiver(str(self.scheduler), self)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._forward_reports)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self.router.remove_receiver(str(self.scheduler), self)
            self._inbox.close()
            self._local.close()
            for feed in self._feeds.values():
                if feed.ahead is not None and feed.ahead.path is not None:
                    _unlink_quietly(feed.ahead.path)
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop prefetching and receiving; returns once :meth:`run` has cleaned up."""
        self._scope.cancel()
        if self._started:
            with trio.CancelScope(shield=True):
                await self._stopped.wait()

    async def finish(self) -> None:
        """The job exited 0: send its last metrics report, and report the slices it was handed
        as used."""
        await self._send_report()
        for feed in self._feeds.values():
            async with feed.lock:
                await self._report_used(feed)

    # -- metrics ----------------------------------------------------------------------------------------
    async def report(self, step: int, values: dict[str, float]) -> Instruction:
        if step < self._reported_step:
            raise BridgeError(400, f"step {step} goes back: this job already reported step "
                                   f"{self._reported_step}")
        try:
            report = MetricsReport(job_id=self.job_id, step=step, values=values,
                                   time=time.time())
        except MessageError as exc:
            raise BridgeError(400, f"the report cannot be sent: {exc}") from None
        self._reported_step = step
        self._report = report
        self._report_ready.set()
        self.counts["metrics reported"] += 1
        return Instruction(**self._instruction)

    async def _forward_reports(self) -> None:
        """Send the waiting report, one at a time, at most one every METRICS_INTERVAL s."""
        while True:
            await self._report_ready.wait()
            self._report_ready = trio.Event()
            await self._send_report()
            await trio.sleep(METRICS_INTERVAL)

    async def _send_report(self) -> None:
        async with self._sending_report:
            report, self._report = self._report, None
            if report is None:
                return
            try:
                with trio.fail_after(RPC_TIMEOUT):
                    reply = await self.net.request(self.scheduler, PROTOCOLS["metrics"],
                                                   encode(report))
                answer = decode(MetricsReceived, reply)
                if answer.job_id != self.job_id:
                    raise ValueError(f"the answer is for job {answer.job_id}, not "
                                     f"{self.job_id}")
            except (RPCError, DialError, NetworkClosed, MessageError, ValueError,
                    trio.TooSlowError) as exc:
                # NOTE: not the script's problem, and decided here: the next report carries the
                # newer numbers; the instruction stays the last one the scheduler gave.
                self.counts["metrics failed"] += 1
                self._report_failures += 1
                now = trio.current_time()
                if self._report_warned is None or now - self._report_warned >= \
                        METRICS_WARN_INTERVAL:
                    log.warning("job %s: %d metrics report(s) could not be sent to the "
                                "scheduler %s; the last: %s", self.job_id,
                                self._report_failures, self.scheduler,
                                str(exc) or "no answer in time")
                    self._report_warned, self._report_failures = now, 0
                return
            self.counts["metrics sent"] += 1
            self._instruction = {"round": answer.round, "batches": answer.batches,
                                 "parameter_server": answer.parameter_server}

    # -- fetch ------------------------------------------------------------------------------------------
    async def fetch(self, request: FetchRequest, dest: Path) -> int:
        if request.source == "path":
            return await self._local.fetch(request, dest)
        if request.source == "peer":
            return await self._fetch_file(request, dest)
        assert request.dataset is not None  # FetchRequest checks it
        try:
            FetchSlice(dataset=request.dataset, slice=request.slice or 0)
        except MessageError as exc:
            raise BridgeError(400, f"dataset {request.dataset!r} is not a dataset name: "
                                   f"{exc.problem}") from None
        if request.slice is not None:
            provider = await self._provider_of(request.dataset)
            return await self._transfer(_Slice(request.dataset, request.slice, None, provider),
                                        dest)
        return await self._fetch_next(request.dataset, dest)

    async def _fetch_next(self, dataset: str, dest: Path) -> int:
        feed = self._feeds.setdefault(dataset, _Feed())
        async with feed.lock:
            await self._report_used(feed)
            ahead = await self._take_ahead(feed)
            if ahead is not None:
                assert ahead.path is not None and ahead.assignment is not None
                try:
                    async with aclosing(_reading(ahead.path)) as chunks:
                        # NOTE: a copy, not a rename: write_chunks is what writes at a path the
                        # script controls without following symlinks; a slice is a few MiB.
                        _, size = await write_chunks(dest, chunks)
                except BaseException:
                    feed.ahead = ahead  # still complete: the next fetch tries it again
                    raise
                _unlink_quietly(ahead.path)
                slice_ = ahead.assignment
                self.counts["prefetch used"] += 1
            else:
                if feed.pending is None:
                    feed.pending = await self._assign(dataset, wait=True)
                slice_ = feed.pending
                size = await self._transfer(slice_, dest)
                feed.pending = None
            feed.delivered.append(slice_)
            self.counts["slices fetched"] += 1
            log.info("job %s: slice %d of %s (epoch %s, %d bytes) handed over", self.job_id,
                     slice_.index, dataset, slice_.epoch, size)
            if self.prefetch and self._nursery is not None:
                feed.ahead = _Ahead()
                self._nursery.start_soon(self._prefetch, dataset, feed.ahead)
            return size

    async def _take_ahead(self, feed: _Feed) -> _Ahead | None:
        """The prefetched slice, once its download ended, if it succeeded."""
        ahead = feed.ahead
        if ahead is None:
            return None
        await ahead.done.wait()
        feed.ahead = None
        if ahead.path is not None:
            return ahead
        if ahead.assignment is not None:
            feed.pending = ahead.assignment  # assigned but not downloaded: fetch it now
        return None

    async def _prefetch(self, dataset: str, ahead: _Ahead) -> None:
        try:
            ahead.assignment = await self._assign(dataset, wait=False)
            dest = self._prefetch_path(ahead.assignment)
            ahead.size = await self._transfer(ahead.assignment, dest)
            ahead.path = dest
            self.counts["slices prefetched"] += 1
        except _NoSliceYet:
            log.debug("job %s: no slice of %s free to prefetch", self.job_id, dataset)
        except Exception as exc:
            # NOTE: any failure of a prefetch is tolerated, and decided here: the next fetch
            # does the work in the foreground and reports what goes wrong to the script.
            log.info("job %s: prefetching a slice of %s failed: %s", self.job_id, dataset,
                     getattr(exc, "message", exc))
        finally:
            ahead.done.set()

    def _prefetch_path(self, slice_: _Slice) -> Path:
        return self.work_dir / PRIVATE_DIR / _PREFETCH_DIR / \
            f"{slice_.dataset}-{slice_.index:05d}.safetensors"

    async def _report_used(self, feed: _Feed) -> None:
        while feed.delivered:
            slice_ = feed.delivered.pop(0)
            assert slice_.epoch is not None
            try:
                with trio.fail_after(RPC_TIMEOUT):
                    reply = await self.net.request(
                        self.scheduler, PROTOCOLS["data-slice-done"],
                        encode(DataSliceDone(job_id=self.job_id, dataset=slice_.dataset,
                                             slice=slice_.index, epoch=slice_.epoch)))
                decode(DataSliceRecorded, reply)
            except (RPCError, DialError, NetworkClosed, MessageError, trio.TooSlowError) as exc:
                # NOTE: not fatal to the job: the scheduler gives the slice to someone else
                # (it released it, or will when it gives up on this worker).
                log.warning("job %s: could not report slice %d of %s used: %s", self.job_id,
                            slice_.index, slice_.dataset, exc)

    async def _assign(self, dataset: str, *, wait: bool) -> _Slice:
        """The scheduler's next slice for this job; with ``wait``, asks again while none is free."""
        delay, cap = SLICE_RETRY
        while True:
            try:
                with trio.fail_after(RPC_TIMEOUT):
                    reply = await self.net.request(
                        self.scheduler, PROTOCOLS["data-slice"],
                        encode(DataSliceRequest(job_id=self.job_id, dataset=dataset)))
                assignment = decode(DataSliceAssignment, reply)
                if assignment.dataset != dataset:
                    raise BridgeError(502, f"the scheduler assigned a slice of "
                                           f"{assignment.dataset!r}, not of {dataset!r}")
                return _Slice(dataset, assignment.slice, assignment.epoch,
                              ID.from_base58(assignment.provider))
            except RemoteError as exc:
                if NO_SLICE_AVAILABLE not in str(exc):
                    raise BridgeError(502, f"the scheduler refused a slice of {dataset!r}: "
                                           f"{exc}") from None
                if not wait:
                    raise _NoSliceYet(str(exc)) from None
                log.info("job %s: %s; asking again in %.1f s", self.job_id, exc, delay)
            except (RPCError, DialError, NetworkClosed, MessageError, ValueError,
                    trio.TooSlowError) as exc:
                raise BridgeError(502, f"could not get a slice of {dataset!r} from the scheduler "
                                       f"{self.scheduler}: {exc}") from None
            await trio.sleep(delay)
            delay = min(delay * 2, cap)

    async def _provider_of(self, dataset: str) -> ID:
        provider = self._providers.get(dataset)
        if provider is None:
            try:
                with trio.fail_after(RPC_TIMEOUT):
                    found = await self.net.find_providers(dataset_key(dataset))
            except (ConnectionError, ValueError, trio.TooSlowError) as exc:
                raise BridgeError(502, f"looking up the data nodes of {dataset!r} failed: {exc}"
                                  ) from None
            others = [p.peer_id for p in found if p.peer_id != self.net.peer_id]
            if not others:
                raise BridgeError(404, f"no data node announces dataset {dataset!r}")
            provider = self._providers[dataset] = others[0]
        return provider

    async def _transfer(self, slice_: _Slice, dest: Path) -> int:
        """Download ``slice_`` to ``dest``, trying again a few times; BridgeError(502) when it
        cannot."""
        reason = ""
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            try:
                return await self._transfer_once(slice_, dest)
            except _TransferFailed as exc:
                reason = str(exc)
                log.warning("job %s: slice %d of %s from %s, attempt %d of %d: %s", self.job_id,
                            slice_.index, slice_.dataset, slice_.provider, attempt,
                            TRANSFER_ATTEMPTS, reason)
            if attempt < TRANSFER_ATTEMPTS:
                await trio.sleep(0.5 * attempt)
        raise BridgeError(502, f"slice {slice_.index} of {slice_.dataset!r} could not be fetched "
                               f"from the data node {slice_.provider}: {reason}")

    async def _transfer_once(self, slice_: _Slice, dest: Path) -> int:
        name = slice_stream(slice_.dataset, slice_.index)
        with self.router.expect(slice_.provider, name) as expected:
            try:
                with trio.fail_after(RPC_TIMEOUT):
                    reply = await self.net.request(
                        slice_.provider, PROTOCOLS["data-fetch"],
                        encode(FetchSlice(dataset=slice_.dataset, slice=slice_.index)))
                coming = decode(SliceComing, reply)
            except (RPCError, DialError, NetworkClosed, MessageError, trio.TooSlowError) as exc:
                raise _TransferFailed(f"asking for it failed: {exc}") from None
            if (coming.dataset, coming.slice, coming.stream) != (slice_.dataset, slice_.index,
                                                                 name):
                raise _TransferFailed(f"the data node announced {coming.stream!r} (slice "
                                      f"{coming.slice} of {coming.dataset!r}) instead of {name!r}")
            if coming.size > MAX_SLICE_BYTES:
                raise _TransferFailed(f"the data node announced {coming.size} bytes, over the "
                                      f"{MAX_SLICE_BYTES}-byte limit")
            try:
                with trio.fail_after(STREAM_START_TIMEOUT):
                    incoming = await expected.wait()
            except trio.TooSlowError:
                raise _TransferFailed(f"the stream did not start within {STREAM_START_TIMEOUT} "
                                      "s") from None
            digest = incoming.meta.get("sha256")
            if not isinstance(digest, str) or len(digest) != 64:
                raise _TransferFailed("the stream's meta carries no SHA-256")
            incoming.max_bytes = coming.size
            try:
                async with aclosing(_checked(incoming, coming.size, digest)) as chunks:
                    _, size = await write_chunks(dest, chunks)
            except (TensorStreamError, trio.TooSlowError, _Corrupt) as exc:
                raise _TransferFailed(str(exc) or "the stream stalled") from None
            return size

    # -- files from peers -----------------------------------------------------------------------------
    async def _fetch_file(self, request: FetchRequest, dest: Path) -> int:
        """The file ``request.path`` that ``request.peer`` serves, written at ``dest``."""
        assert request.peer is not None and request.path is not None  # FetchRequest checks it
        peer = _peer_id(request.peer)
        if peer == self.net.peer_id:
            raise BridgeError(400, f"peer {request.peer} is this worker; fetch a local file with "
                                   "source 'path'")
        try:
            ask = FetchFile(path=request.path)
        except MessageError as exc:
            raise BridgeError(400, f"path {request.path!r} cannot be asked for: "
                                   f"{exc.problem}") from None
        what = f"{request.path!r} from {peer}"
        with self.router.expect_announced(peer, FILE_FETCH_PREFIX) as expected:
            try:
                with trio.fail_after(FILE_RPC_TIMEOUT):
                    reply = await self.net.request(peer, PROTOCOLS["file-fetch"], encode(ask))
                coming = decode(FileComing, reply)
            except RemoteError as exc:
                raise _file_refused(f"peer {peer} refused {request.path!r}", str(exc)) from None
            except (RPCError, DialError, NetworkClosed, MessageError, trio.TooSlowError) as exc:
                raise BridgeError(502, f"asking for {what} failed: "
                                       f"{str(exc) or 'no answer in time'}") from None
            if coming.path != ask.path or not coming.stream.startswith(FILE_FETCH_PREFIX):
                raise BridgeError(502, f"asked for {what}, the peer announced {coming.path!r} "
                                       f"as the stream {coming.stream!r}")
            if coming.size > MAX_FILE_BYTES:
                raise BridgeError(502, f"{what} is {coming.size} bytes, over the "
                                       f"{MAX_FILE_BYTES}-byte limit")
            expected.announce(coming.stream)
            try:
                with trio.fail_after(STREAM_START_TIMEOUT):
                    incoming = await expected.wait()
            except trio.TooSlowError:
                raise BridgeError(502, f"{what}: the stream did not start within "
                                       f"{STREAM_START_TIMEOUT} s") from None
            incoming.max_bytes = coming.size
            try:
                async with aclosing(_checked(incoming, coming.size, coming.sha256)) as chunks:
                    _, size = await write_chunks(dest, chunks)
            except (TensorStreamError, trio.TooSlowError, _Corrupt) as exc:
                raise BridgeError(502, f"{what}: {str(exc) or 'the stream stalled'}; nothing "
                                       "was written") from None
        self.counts["files fetched"] += 1
        log.info("job %s: fetched %s (%d bytes)", self.job_id, what, size)
        return size

    # -- send and receive -----------------------------------------------------------------------------
    async def send(self, path: Path, peers: list[str], strategy: str, name: str) -> list[str]:
        ids = {peer: _peer_id(peer) for peer in peers}
        size = os.stat(path).st_size
        stream = file_stream(str(self.scheduler), name)

        async def send_one(peer: str) -> None:
            with trio.fail_after(CONNECT_TIMEOUT):
                out = await self.net.open_tensor_stream(ids[peer], stream,
                                                        {"job": self.job_id, "size": size})
            async with out, aclosing(_reading(path, SEND_CHUNK)) as chunks:
                async for chunk in chunks:
                    await out.send(chunk)

        sent = await deliver(peers, strategy, send_one)
        self.counts["files sent"] += len(sent)
        return sent

    async def incoming(self) -> AsyncIterator[IncomingFile]:
        async for file in self._outbox:
            yield file

    def takes(self, name: str) -> bool:
        """Every file a peer sends to a job of this scheduler (see :class:`FileReceiver`)."""
        return True

    async def accept(self, incoming: IncomingTensorStream, name: str) -> None:
        """Take a file a peer sends to this job: write it under incoming/, then queue it."""
        size = incoming.meta.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
            await incoming.refuse(f"meta 'size' must be 0 .. {MAX_FILE_BYTES} bytes")
            return
        statistics = self._inbox.statistics()
        if statistics.current_buffer_used >= statistics.max_buffer_size:
            await incoming.refuse(f"job {self.job_id} has {statistics.current_buffer_used} files "
                                  "waiting to be received; try again later")
            return
        try:
            dest = incoming_destination(self.work_dir, name)
        except PathRefused as exc:
            await incoming.refuse(exc.message)
            return
        incoming.max_bytes = size
        try:
            async with self._receiving, aclosing(_checked(incoming, size, None)) as chunks:
                final, written = await write_chunks(dest, chunks, overwrite=False)
        except (TensorStreamError, trio.TooSlowError, _Corrupt) as exc:
            log.warning("job %s: receiving %s from %s failed: %s", self.job_id, name,
                        incoming.peer, str(exc) or "the stream stalled")
            return
        file = IncomingFile(final, str(incoming.peer), name, written)
        log.info("job %s: received %s (%d bytes) from %s", self.job_id, final.name, written,
                 incoming.peer)
        self.counts["files received"] += 1
        try:
            self._inbox.send_nowait(file)
        except trio.WouldBlock:
            await self._inbox.send(file)
        except trio.ClosedResourceError:
            log.warning("job %s ended before %s could be received", self.job_id, final.name)


class _Corrupt(Exception):
    """The bytes received are not what was announced."""


async def _checked(incoming: IncomingTensorStream, size: int,
                   sha256: str | None) -> AsyncGenerator[bytes, None]:
    """The stream's chunks; raises at the end unless they are ``size`` bytes (of ``sha256``),
    and when a chunk takes longer than IDLE_TIMEOUT."""
    digest = hashlib.sha256()
    received = 0
    chunks = aiter(incoming)
    while True:
        with trio.fail_after(IDLE_TIMEOUT):
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
        received += len(chunk)
        if sha256 is not None:
            digest.update(chunk)
        yield chunk
    if received != size:
        raise _Corrupt(f"got {received} bytes of the {size} announced")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise _Corrupt(f"SHA-256 {digest.hexdigest()[:16]}… does not match the announced "
                       f"{sha256[:16]}…")


def _reading(path: Path, chunk_size: int = 1 << 20) -> AsyncGenerator[bytes, None]:
    # read_chunks is an async generator (declared as an iterator): closed early, it closes the file
    return cast(AsyncGenerator[bytes, None], read_chunks(path, chunk_size))


#: The job bridge's status for each kind of refusal of a file fetch (see hypha.files).
_REFUSALS: Final = {INVALID: 400, FORBIDDEN: 403, NOT_FOUND: 404, BUSY: 503}


def _file_refused(refused: str, error: str) -> BridgeError:
    """The bridge's answer to a peer's refusal ``error`` (``/hypha/file-fetch/1: <kind>: ...``)."""
    message = error.removeprefix(f"{PROTOCOLS['file-fetch'].id}: ")
    kind = message.partition(":")[0]
    return BridgeError(_REFUSALS.get(kind, 502), f"{refused}: {message}")


def _peer_id(text: str) -> ID:
    try:
        peer = ID.from_base58(text)
    except ValueError:
        peer = None
    if peer is None or peer.to_base58() != text or len(peer.to_bytes()) < 2:
        raise BridgeError(400, f"{text!r} is not a peer id")
    return peer


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
