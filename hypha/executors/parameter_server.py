"""The built-in parameter-server executor: the outer step of a DiLoCo run, inside a worker.

A scheduler that runs a DiLoCo job leases one worker offering
``Executor(kind="parameter-server", name="diloco")`` and dispatches this job to it; the training
workers (``python -m hypha.executors.train``) send it their compressed pseudo-gradients. Per
outer round ``r``:

1. **Plan.** Ask the scheduler (``/hypha/round-plan/1``) whom to expect in round ``r`` and how
   long to wait; ask again every :data:`PLAN_REFRESH` seconds while the round is open, so a
   worker that joins or is lost changes the round.
2. **Join.** A worker named for the first time gets the current global model as the file
   ``global-<r>`` (a tensor stream ``file:<scheduler>:global-<r>`` that its job receives through
   the bridge), so a replacement starts from the same model as everyone else.
3. **Accumulate.** Each worker's contribution arrives as the stream ``file:<scheduler>:delta-<r>``;
   the executor's :class:`~hypha.executors.network.StreamRouter` registration hands it here, and
   each piece is fed to the round's :class:`~hypha.optim.server.Contribution` as it comes: chunks
   are decoded and added to the accumulator at once, never buffered whole. A stream for a round
   not open yet waits (with backpressure) until it opens; one for a closed round is read and
   dropped (its sender already has the update); one from a peer the scheduler did not name is
   refused.
4. **Close.** When every named worker's contribution is complete, or ``timeout`` seconds after the
   first one completed, average what came, apply the fused outer Nesterov step and encode the
   update (:meth:`~hypha.optim.server.ServerRound.close`); save the checkpoint atomically
   (``checkpoint.pt`` in the job's work directory: global weights, outer momentum, round); send
   ``update-<r>`` to every named worker; report the round's numbers to the scheduler.

After ``rounds`` rounds the job finishes. The global model is built from the job's ``model``
(:func:`hypha.models.load_model` with ``model_seed``), so every worker and the server agree on
the initial weights and on the order of the parameters; a checkpoint found in the work directory
is resumed instead.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from libp2p.peer.id import ID

from hypha.executors.network import (
    MAX_FILE_BYTES,
    NetworkBackend,
    checkpoint_stream,
    file_stream,
)
from hypha.executors.process import JobStatus, _only_cancelled
from hypha.messages import (
    PROTOCOLS,
    MessageError,
    MetricsReceived,
    MetricsReport,
    RoundPlan,
    RoundPlanRequest,
    decode,
    encode,
)
from hypha.net import IncomingTensorStream, Network, TensorStreamError

__all__ = ["CHECKPOINT_NAME", "ParameterServerConfig", "ParameterServerExecutor"]

log = logging.getLogger(__name__)

#: The checkpoint in the job's work directory, replaced atomically after every round.
CHECKPOINT_NAME: Final = "checkpoint.pt"
#: Seconds between two questions to the scheduler about the round's workers.
PLAN_REFRESH: Final = 1.0
#: Seconds an RPC to the scheduler may take.
RPC_TIMEOUT: Final = 10.0
#: Seconds to open a stream to a worker and to send it one file.
SEND_TIMEOUT: Final = 120.0
#: Seconds a contribution may stall between two pieces before it is cut off.
IDLE_TIMEOUT: Final = 60.0
#: Seconds a contribution for a round not yet open waits for it.
EARLY_WAIT: Final = 300.0
#: Bytes per piece of a file sent to a worker.
SEND_PIECE: Final = 4 << 20
#: Attempts at handing a round's checkpoint to the scheduler.
CUSTODY_ATTEMPTS: Final = 3
#: Seconds a resumed server waits for the scheduler's checkpoint.
RESUME_TIMEOUT: Final = 120.0

_DELTA, _UPDATE, _GLOBAL = "delta-", "update-", "global-"


@dataclass(frozen=True)
class ParameterServerConfig:
    """The job configuration keys the parameter server reads (the rest belongs to the trainers).

    Unknown keys are ignored here: the job's configuration is shared with the training workers,
    whose executor checks every key."""

    rounds: int
    model: str = "gpt"
    model_seed: int = 0
    codec: str = "int2"
    fragments: int = 1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    round_timeout: float = 60.0
    #: send every round's checkpoint to the scheduler before the update goes out
    custody: bool = False
    #: resume from the scheduler's checkpoint of this round (it sends it as a file)
    resume_round: int | None = None
    resume_sha256: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> ParameterServerConfig:
        def get(key: str, kind: type, default: Any) -> Any:
            value = config.get(key, default)
            if value is None:
                raise ValueError(f"job config: {key!r} is required by the parameter server")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind in (int, float) and isinstance(value, str):
                try:
                    value = kind(value)
                except ValueError:
                    raise ValueError(f"job config: {key!r} must be a number, got {value!r}") \
                        from None
            if kind is bool and value in ("true", "false"):
                value = value == "true"
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ValueError(f"job config: {key!r} must be {kind.__name__}, got {value!r}")
            return value

        made = cls(rounds=get("rounds", int, None), model=get("model", str, cls.model),
                   model_seed=get("model_seed", int, cls.model_seed),
                   codec=get("codec", str, cls.codec),
                   fragments=get("fragments", int, cls.fragments),
                   outer_lr=get("outer_lr", float, cls.outer_lr),
                   outer_momentum=get("outer_momentum", float, cls.outer_momentum),
                   round_timeout=get("round_timeout", float, cls.round_timeout),
                   custody=get("custody", bool, False),
                   resume_round=None if config.get("resume_round") is None
                   else get("resume_round", int, None),
                   resume_sha256=None if config.get("resume_sha256") is None
                   else get("resume_sha256", str, None))
        if made.rounds < 1:
            raise ValueError(f"job config: 'rounds' must be at least 1, got {made.rounds}")
        if made.fragments < 1:
            raise ValueError(f"job config: 'fragments' must be at least 1, got {made.fragments}")
        if not (math.isfinite(made.round_timeout) and made.round_timeout > 0):
            raise ValueError(f"job config: 'round_timeout' must be positive, got "
                             f"{made.round_timeout}")
        if (made.resume_round is None) != (made.resume_sha256 is None):
            raise ValueError("job config: 'resume_round' and 'resume_sha256' come together")
        if made.resume_round is not None and made.resume_round < 0:
            raise ValueError(f"job config: 'resume_round' must be >= 0, got {made.resume_round}")
        if made.resume_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}",
                                                               made.resume_sha256):
            raise ValueError("job config: 'resume_sha256' must be a hex SHA-256")
        return made


def build_server(config: ParameterServerConfig, work_dir: Path) -> Any:
    """The :class:`~hypha.optim.OuterServer` of the job: resumed from the work directory's
    checkpoint when there is one, else fresh from the model's initial weights."""
    import torch

    from hypha.models import load_model, training_parameters
    from hypha.optim import OuterServer

    torch.manual_seed(config.model_seed)
    model = load_model(config.model)
    params = [p.detach() for p in training_parameters(model)]
    checkpoint = work_dir / CHECKPOINT_NAME
    if checkpoint.exists():
        server = OuterServer.load(checkpoint, params, codec=config.codec,
                                  fragments=config.fragments, outer_lr=config.outer_lr,
                                  outer_momentum=config.outer_momentum)
        log.info("resumed the parameter server from %s at round %d", checkpoint, server.round)
        return server
    return OuterServer(params, codec=config.codec, fragments=config.fragments,
                       outer_lr=config.outer_lr, outer_momentum=config.outer_momentum)


@dataclass
class _Round:
    number: int
    state: Any  #: the ServerRound
    workers: set[str] = field(default_factory=set)
    timeout: float = 60.0
    complete: set[str] = field(default_factory=set)
    started: float | None = None  #: when the first contribution completed (trio clock)
    changed: trio.Event = field(default_factory=trio.Event)
    late: int = 0
    refused: int = 0

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class _Server:
    """One parameter-server job: the rounds, the streams, the scheduler."""

    def __init__(self, net: Network, backend: NetworkBackend, spec: Mapping[str, Any],
                 config: ParameterServerConfig, server: Any, work_dir: Path) -> None:
        self.net = net
        self.backend = backend
        self.job_id = str(spec["id"])
        self.scheduler = ID.from_base58(str(spec["scheduler"]))
        self.config = config
        self.server = server
        self.work_dir = work_dir
        self.round: _Round | None = None
        self.opened = trio.Event()  #: set (and replaced) whenever a round opens
        self.feeding = trio.Lock()  #: one contribution's piece is decoded at a time
        self.joined: set[str] = set()  #: workers that were sent the global model
        self._sends: trio.Nursery | None = None  #: where the updates are sent from
        self.bytes_received = 0
        self.bytes_sent = 0
        #: the update of the round before the first, sent again when resumed from a checkpoint
        self.resend: bytes | None = server.last_update if config.resume_round else None
        self.custody_failed = 0

    # -- the router registration (see FileReceiver) ------------------------------------------------
    def takes(self, name: str) -> bool:
        return name.startswith(_DELTA)

    async def accept(self, incoming: IncomingTensorStream, name: str) -> None:
        peer = str(incoming.peer)
        try:
            number = int(name[len(_DELTA):])
        except ValueError:
            await incoming.refuse(f"{name!r} is not delta-<round>")
            return
        size = incoming.meta.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_FILE_BYTES:
            await incoming.refuse(f"meta 'size' must be 1 .. {MAX_FILE_BYTES} bytes")
            return
        incoming.max_bytes = size
        with trio.move_on_after(EARLY_WAIT):
            while self.round is None or self.round.number < number:
                await self.opened.wait()
        current = self.round
        if current is None or current.number < number:
            await incoming.refuse(f"round {number} did not open within {EARLY_WAIT} s")
            return
        if current.number > number:
            # the sender was too late for its round; it has (or will get) the update, so its
            # send must not fail: read the stream to its end and drop it
            current.late += 1
            log.info("job %s: the contribution of %s to round %d came after the round closed; "
                     "dropped", self.job_id, peer, number)
            await self._drain(incoming)
            return
        if peer not in current.workers:
            await self._refresh_plan(current)
        if peer not in current.workers:
            current.refused += 1
            await incoming.refuse(f"the scheduler did not name {peer} in round {number}")
            return
        try:
            contribution = current.state.contribution(peer)
        except ValueError as exc:
            current.refused += 1
            await incoming.refuse(str(exc))
            return
        from hypha.optim import ExchangeError

        incoming.hold_ack = True  # the verdict comes after the end: is the payload complete?
        try:
            async with aclosing(_pieces(incoming)) as pieces:
                async for piece in pieces:
                    self.bytes_received += len(piece)
                    async with self.feeding:
                        if self.round is not current:  # closed while this piece travelled
                            break
                        await trio.to_thread.run_sync(contribution.feed, piece)
                else:
                    contribution.finish()
        except ExchangeError as exc:
            log.warning("job %s: refused the contribution of %s to round %d: %s", self.job_id,
                        peer, number, exc)
            current.refused += 1
            await incoming.refuse(str(exc)[:1000])
            return
        except (TensorStreamError, trio.TooSlowError) as exc:
            log.warning("job %s: the contribution of %s to round %d broke off: %s", self.job_id,
                        peer, number, exc or "it stalled")
            return
        await incoming.accept()
        if self.round is current and contribution.complete:
            current.complete.add(peer)
            if current.started is None:
                current.started = trio.current_time()
            current.poke()

    async def _drain(self, incoming: IncomingTensorStream) -> None:
        try:
            async with aclosing(_pieces(incoming)) as pieces:
                async for piece in pieces:
                    self.bytes_received += len(piece)
        except (TensorStreamError, trio.TooSlowError):
            pass

    # -- the rounds ----------------------------------------------------------------------------------
    async def run(self) -> None:
        # NOTE: updates go out in the background: a worker that is unreachable (cut off, or
        # dead and not yet dropped by the scheduler) must not hold up the next round. The last
        # updates are waited for before the job ends.
        async with trio.open_nursery() as sends:
            self._sends = sends
            await self._rounds()

    async def _rounds(self) -> None:
        while self.server.round < self.config.rounds:
            current = _Round(self.server.round, self.server.open_round(),
                             timeout=self.config.round_timeout)
            self.round = current
            self.opened.set()
            self.opened = trio.Event()
            t0 = trio.current_time()
            await self._wait_for_plan(current)
            if self.resend is not None:
                # resumed: the last update may not have reached every trainer before the old
                # server died; those that have it already drop it (its round is past for them)
                assert self._sends is not None
                self._sends.start_soon(self._broadcast, f"{_UPDATE}{current.number - 1}",
                                       [self.resend], sorted(current.workers))
                self.resend = None
            await self._collect(current)
            async with self.feeding:
                self.round = None  # contributions still arriving are now late
                pieces, stats = await trio.to_thread.run_sync(current.state.close)
            await trio.to_thread.run_sync(self.server.save, self.work_dir / CHECKPOINT_NAME)
            if self.config.custody:
                # NOTE: before the update goes out: the scheduler's copy is then never behind an
                # update a trainer applied, so a replacement resumes where everyone is
                await self._custody(current.number + 1)
            waited = trio.current_time() - t0
            # only to the workers the plan names: one the scheduler dropped gets nothing more
            assert self._sends is not None
            self._sends.start_soon(self._broadcast, f"{_UPDATE}{current.number}", pieces,
                                   sorted(current.workers))
            log.info("job %s: round %d closed with %d of %d contribution(s) (%d partial, %d "
                     "late, %d refused) after %.2f s; sending the update (%d bytes) to %d "
                     "worker(s)", self.job_id, current.number, stats.contributors,
                     len(current.workers), stats.partial, current.late, current.refused, waited,
                     sum(map(len, pieces)), len(current.workers))
            await self._report(current, stats, waited)

    async def _wait_for_plan(self, current: _Round) -> None:
        """Ask the scheduler until it names at least one worker; send new ones the model."""
        while True:
            await self._refresh_plan(current)
            if current.workers:
                return
            await trio.sleep(PLAN_REFRESH)

    async def _refresh_plan(self, current: _Round) -> None:
        try:
            with trio.fail_after(RPC_TIMEOUT):
                reply = await self.net.request(
                    self.scheduler, PROTOCOLS["round-plan"],
                    encode(RoundPlanRequest(job_id=self.job_id, round=current.number)))
            plan = decode(RoundPlan, reply)
        except (MessageError, ConnectionError, OSError, trio.TooSlowError) as exc:
            log.warning("job %s: could not get the plan of round %d: %s", self.job_id,
                        current.number, exc)
            return
        if plan.round != current.number:
            log.warning("job %s: the scheduler answered with the plan of round %d, not %d",
                        self.job_id, plan.round, current.number)
            return
        current.workers = set(plan.workers)
        current.timeout = plan.timeout
        # a worker the scheduler no longer names is forgotten: if it comes back, it is sent
        # the model again
        self.joined.intersection_update(plan.workers)
        new = sorted(set(plan.workers) - self.joined)
        if new:
            self.joined.update(new)
            async with self.feeding:  # never a model half way through a round's close
                pieces = await trio.to_thread.run_sync(self.server.initial_payload)
            await self._broadcast(f"{_GLOBAL}{current.number}", pieces, new)
        current.poke()

    async def _collect(self, current: _Round) -> None:
        """Until every named worker's contribution is complete, or the timeout after the first."""
        next_plan = trio.current_time() + PLAN_REFRESH
        while True:
            if current.workers and current.workers <= current.complete:
                return
            now = trio.current_time()
            if current.started is not None and now >= current.started + current.timeout:
                missing = sorted(current.workers - current.complete)
                log.warning("job %s: round %d: no contribution from %s within %.1f s of the "
                            "first; averaging the %d that came", self.job_id, current.number,
                            ", ".join(missing), current.timeout, len(current.complete))
                return
            if now >= next_plan:
                await self._refresh_plan(current)
                next_plan = trio.current_time() + PLAN_REFRESH
            deadline = next_plan
            if current.started is not None:
                deadline = min(deadline, current.started + current.timeout)
            with trio.move_on_at(deadline):
                await current.changed.wait()

    async def _broadcast(self, name: str, pieces: list[bytes], workers: list[str]) -> int:
        """Send ``pieces`` as file ``name`` to each of ``workers``; returns how many got it."""
        size = sum(map(len, pieces))
        stream = file_stream(str(self.scheduler), name)
        sent = 0

        async def send(worker: str) -> None:
            nonlocal sent
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    out = await self.net.open_tensor_stream(ID.from_base58(worker), stream,
                                                            {"job": self.job_id, "size": size})
                    async with out:
                        for piece in pieces:
                            for i in range(0, len(piece), SEND_PIECE):
                                await out.send(piece[i:i + SEND_PIECE])
            except (ConnectionError, OSError, TensorStreamError, trio.TooSlowError) as exc:
                log.warning("job %s: could not send %s to %s: %s", self.job_id, name, worker,
                            exc or "it timed out")
                return
            sent += 1
            self.bytes_sent += size

        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(send, worker)
        return sent

    async def _custody(self, round_: int) -> None:
        """Send the checkpoint (after ``round_`` rounds) to the scheduler, which keeps it; a
        failure is logged and counted, and training goes on (the local copy still exists)."""
        path = self.work_dir / CHECKPOINT_NAME
        size, digest = await trio.to_thread.run_sync(_digest, path)
        meta = {"job": self.job_id, "round": round_, "size": size, "sha256": digest}
        for attempt in range(1, CUSTODY_ATTEMPTS + 1):
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    out = await self.net.open_tensor_stream(
                        self.scheduler, checkpoint_stream(self.job_id, round_), meta)
                    async with out:
                        with open(path, "rb") as f:
                            while piece := await trio.to_thread.run_sync(f.read, SEND_PIECE):
                                await out.send(piece)
                return
            except (ConnectionError, OSError, TensorStreamError, trio.TooSlowError) as exc:
                log.warning("job %s: the scheduler did not take the checkpoint of round %d "
                            "(attempt %d of %d): %s", self.job_id, round_, attempt,
                            CUSTODY_ATTEMPTS, exc or "it timed out")
                if attempt < CUSTODY_ATTEMPTS:
                    await trio.sleep(attempt)
        self.custody_failed += 1
        log.error("job %s: the checkpoint of round %d is only in %s: if this worker is lost, a "
                  "replacement resumes from an older one", self.job_id, round_, path)

    async def _report(self, current: _Round, stats: Any, waited: float) -> None:
        values = {"round": float(current.number + 1), "contributors": float(stats.contributors),
                  "partial": float(stats.partial), "abstained": float(stats.abstained),
                  "late": float(current.late), "refused": float(current.refused),
                  "expected": float(len(current.workers)), "round_seconds": waited,
                  "bytes_received": float(self.bytes_received),
                  "bytes_sent": float(self.bytes_sent),
                  "custody_failed": float(self.custody_failed)}
        report = MetricsReport(job_id=self.job_id, step=current.number + 1, values=values,
                               time=time.time())
        try:
            with trio.fail_after(RPC_TIMEOUT):
                reply = await self.net.request(self.scheduler, PROTOCOLS["metrics"],
                                               encode(report))
            decode(MetricsReceived, reply)
        except (MessageError, ConnectionError, OSError, trio.TooSlowError) as exc:
            log.warning("job %s: could not report round %d: %s", self.job_id, current.number, exc)


async def _pieces(incoming: IncomingTensorStream) -> Any:
    """The stream's pieces; ``trio.TooSlowError`` when one takes longer than IDLE_TIMEOUT."""
    chunks = aiter(incoming)
    while True:
        with trio.fail_after(IDLE_TIMEOUT):
            try:
                piece = await anext(chunks)
            except StopAsyncIteration:
                return
        yield piece


def _digest(path: Path) -> tuple[int, str]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(SEND_PIECE):
            hasher.update(piece)
            size += len(piece)
    return size, hasher.hexdigest()


async def _receive_checkpoint(backend: NetworkBackend, config: ParameterServerConfig,
                              scheduler: str, work_dir: Path) -> None:
    """Wait for the scheduler's checkpoint (the file ``checkpoint-<resume_round>``), check its
    SHA-256 and put it where :func:`build_server` resumes from."""
    name = f"checkpoint-{config.resume_round}"
    with trio.fail_after(RESUME_TIMEOUT):
        async for file in backend.incoming():
            if file.name != name or file.peer != scheduler:
                log.warning("dropping %s from %s: waiting for %s from the scheduler", file.name,
                            file.peer, name)
                os.unlink(file.path)
                continue
            _, digest = await trio.to_thread.run_sync(_digest, file.path)
            if digest != config.resume_sha256:
                os.unlink(file.path)
                raise ValueError(f"the scheduler's checkpoint has SHA-256 {digest[:16]}…, its "
                                 f"record says {str(config.resume_sha256)[:16]}…")
            os.replace(file.path, work_dir / CHECKPOINT_NAME)
            log.info("resuming from the scheduler's checkpoint of round %d", config.resume_round)
            return
    raise ValueError(f"the job ended before the scheduler's checkpoint {name} came")


class ParameterServerExecutor:
    """Runs parameter-server jobs on the worker's network (see the module doc).

    Its ``run`` has the shape of :meth:`~hypha.executors.ProcessExecutor.run`; the job manager
    hands it the job's :class:`~hypha.executors.network.NetworkBackend`, whose network and stream
    router it uses."""

    async def run(self, job: Mapping[str, Any], work_dir: Path,
                  on_status: Callable[[JobStatus], None], *,
                  backend: Any = None, task_status: Any = trio.TASK_STATUS_IGNORED,
                  ) -> JobStatus:
        job_id = str(job["id"])
        if not isinstance(backend, NetworkBackend):
            raise TypeError("the parameter-server executor runs on the network: it needs the "
                            "job's NetworkBackend")

        def status(state: Any, message: str = "", exit_code: int | None = None) -> JobStatus:
            made = JobStatus(job_id, state, exit_code, message)
            on_status(made)
            return made

        status("starting")
        try:
            config = ParameterServerConfig.from_config(job.get("config", {}))
            if config.resume_round is not None:
                await _receive_checkpoint(backend, config, str(job["scheduler"]),
                                          Path(work_dir))
            server = await trio.to_thread.run_sync(build_server, config, Path(work_dir))
            if config.resume_round is not None and server.round != config.resume_round:
                raise ValueError(f"the checkpoint is of round {server.round}, the scheduler "
                                 f"said {config.resume_round}")
        except (ValueError, TypeError, ImportError, OSError, trio.TooSlowError) as exc:
            status("failed", f"{type(exc).__name__}: {exc}", 2)
            raise
        ps = _Server(backend.net, backend, job, config, server, Path(work_dir))
        backend.router.add_receiver(str(ps.scheduler), ps, first=True)
        try:
            status("running")
            task_status.started()
            await ps.run()
        except BaseException as exc:
            if _only_cancelled(exc):
                status("stopped", "cancelled")
            else:
                status("failed", f"{type(exc).__name__}: {exc}", 1)
            raise
        finally:
            backend.router.remove_receiver(str(ps.scheduler), ps)
        return status("finished", f"{config.rounds} rounds", 0)
