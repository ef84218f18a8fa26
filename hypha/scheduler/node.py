"""The scheduler node: lease workers through the market, dispatch the job, keep the leases.

1. **Allocate**: publish a :class:`~hypha.messages.WorkerRequest` on ``hypha/worker``, collect
   the offers workers send over ``/hypha/worker-offer/1`` until the offer window closes, choose
   (:func:`~hypha.scheduler.allocator.choose`: distinct workers, at most ``max_price``, best
   capacity per unit of price) and accept by renewing each chosen offer's lease. An offer must
   come from the worker it names and answer an advertisement still open; anything else is
   refused. Too few offers: advertise again, with backoff.
2. **Dispatch** the job to every leased worker (``/hypha/dispatch-job/1``).
3. **Keep** each lease: renew it at 75% of its life. A renewal that fails (the worker died, or
   let the lease go) marks the worker lost; a replacement is allocated (never a lost worker) and
   the job dispatched there. Hypha's original lists this as future work.
4. **Watch**: job status and metrics reports arrive over RPC, only from the worker running the
   job. The run ends when every job has finished (exit 0) or one has failed (exit 1).
5. **Data** (when the job has a ``dataset``): before leasing anyone, find a data node that
   announces it (``find_providers`` on ``/hypha/dataset/<name>``, again with backoff until one
   does) and read the dataset's record for its number of slices. Then hand out slices with a
   :class:`~hypha.data.SliceTracker` (AVAILABLE → ASSIGNED → USED, a new epoch when all are
   used): ``/hypha/data-slice/1`` assigns the next slice to the job's worker and names the data
   node to fetch it from, ``/hypha/data-slice-done/1`` marks one used. Only the worker running
   a job of this scheduler may ask, for that job. A lost worker's slices, and those a job still
   holds when it ends (the one it prefetched, or all of them when it failed), go back to
   AVAILABLE, first in line. The job's config carries ``dataset`` and ``scheduler`` (this peer)
   so that the script knows what to fetch.
6. **Files** (when the job has ``files``): serve that directory read-only over
   ``/hypha/file-fetch/1`` (:class:`~hypha.files.FileServer`) to the workers this scheduler
   holds a lease on, and nobody else. The job's config carries ``files_peer`` (this peer) so
   that the script knows whom to ask (``POST /resources/fetch`` with ``source: "peer"``).
7. **DiLoCo** (a :class:`DiLoCo` run): first lease one worker offering the built-in
   parameter-server executor and dispatch the parameter-server job to it (config: the job's
   settings plus ``role="parameter-server"``, ``rounds``, ``round_timeout``, ``workers`` and
   ``scheduler``); then lease the ``workers`` training workers, never on the parameter server's
   peer, and dispatch the training job (``role="train"``, ``parameter_server``, ``rounds``,
   ``sync_batches``, plus ``dataset``/``scheduler``/``files_peer`` as above). Every metrics
   report of a training job (values ``round``, ``round_step``, ``batch_seconds``) goes to the
   :class:`~hypha.scheduler.sync.SyncPlanner`, and the answer tells the job how many batches to
   run in its round and where the parameter server is, so a replaced parameter server is found
   again. ``/hypha/round-plan/1`` tells the parameter-server job (only it) which training
   workers run now and how long to wait for them. A lost parameter server is replaced like any
   other worker. The run ends when every training job and the parameter-server job have ended.
8. **Event log** (``metrics_log``): one JSON object per line for every metrics report, job
   status change, lease and lost worker (:class:`EventLog`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import trio
from libp2p.peer.id import ID
from prometheus_client.core import Metric

import hypha
from hypha.data.node import NO_SLICE_AVAILABLE, DatasetInfo, dataset_key
from hypha.data.tracker import NoSliceAvailable, SliceTracker, TrackerError
from hypha.files import FileServer
from hypha.messages import (
    PROTOCOLS,
    WORKER_TOPIC,
    DataSliceAssignment,
    DataSliceDone,
    DataSliceRecorded,
    DataSliceRequest,
    DispatchJob,
    Health,
    HealthCheck,
    JobAccepted,
    JobSpec,
    JobStatus,
    JobStopped,
    LeaseRenewed,
    MessageError,
    MetricsReceived,
    MetricsReport,
    OfferReceived,
    RenewLease,
    RoundPlan,
    RoundPlanRequest,
    StatusReceived,
    StopJob,
    WorkerOffer,
    WorkerRequest,
    decode,
    encode,
    new_id,
)
from hypha.metrics import gauge, network_metrics
from hypha.net import (
    IncomingTensorStream,
    MTLSTransport,
    Network,
    RequestRejected,
    open_network,
    settings_from_sections,
)
from hypha.rolecli import serve_node
from hypha.scheduler.allocator import Requirements, choose
from hypha.scheduler.config import MAX_SYNC_BATCHES, SchedulerConfig
from hypha.scheduler.custody import CheckpointCustody
from hypha.scheduler.sync import SyncPlanner

__all__ = ["PARAMETER_SERVER", "PLAIN_JOB", "TRAIN", "DiLoCo", "EventLog", "Held",
           "SchedulerNode", "run"]

log = logging.getLogger("hypha.scheduler")

#: Seconds an RPC to a worker may take.
RPC_TIMEOUT = 10.0
#: Seconds the trainers of a DiLoCo run get to finish after the parameter server's last round
#: before the scheduler stops them.
WIND_DOWN = 30.0
#: Renew a lease when this fraction of its life has passed.
RENEW_AT = 0.75
#: Seconds between advertisements while too few workers answer (doubling, capped).
RETRY = (1.0, 30.0)
#: Seconds between searches for the dataset's data node while none announces it (doubling,
#: capped).
DATA_RETRY = (0.5, 30.0)
#: Seconds one DHT search may take.
DHT_TIMEOUT = 30.0
#: Seconds between refreshes of the dataset's providers once one is known.
PROVIDER_REFRESH = 60.0
#: The most a metrics report's ``round`` or ``round_step`` may be.
MAX_COUNT: Final = 1 << 32

#: Roles of a leased worker: the one job of a plain run, or a DiLoCo run's two kinds.
PLAIN_JOB: Final = "job"
TRAIN: Final = "train"
PARAMETER_SERVER: Final = "parameter-server"
_ENDED: Final = ("finished", "failed")


@dataclass(frozen=True)
class DiLoCo:
    """A DiLoCo run (Douillard et al., arXiv:2311.08105): one worker runs the built-in
    parameter server (leased with ``parameter_server``), the others train; ``rounds`` outer
    rounds of nominally ``sync_batches`` batches per worker, split by speed when
    ``perf_aware``; the parameter server waits ``round_timeout`` seconds after the first
    complete contribution of a round."""

    parameter_server: Requirements
    rounds: int = 10
    sync_batches: int = 50
    perf_aware: bool = True
    round_timeout: float = 60.0
    #: where the scheduler keeps the parameter server's checkpoint (None: it keeps none, and a
    #: lost parameter server's replacement starts over); see :mod:`hypha.scheduler.custody`
    checkpoint_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.parameter_server.executor.kind != "parameter-server":
            raise ValueError("DiLoCo: the parameter server's executor must be of kind "
                             f"'parameter-server', got {self.parameter_server.executor.kind!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"DiLoCo: rounds must be an integer >= 1, got {self.rounds!r}")
        if isinstance(self.sync_batches, bool) or not isinstance(self.sync_batches, int) \
                or not 1 <= self.sync_batches <= MAX_SYNC_BATCHES:
            raise ValueError(f"DiLoCo: sync_batches must be an integer in [1, "
                             f"{MAX_SYNC_BATCHES}], got {self.sync_batches!r}")
        if not isinstance(self.perf_aware, bool):
            raise ValueError(f"DiLoCo: perf_aware must be True or False, got "
                             f"{self.perf_aware!r}")
        if not (isinstance(self.round_timeout, int | float) and math.isfinite(self.round_timeout)
                and 0 < self.round_timeout <= 86400):
            raise ValueError(f"DiLoCo: round_timeout must be seconds in (0, 86400], got "
                             f"{self.round_timeout!r}")


class EventLog:
    """Appends one JSON object per line to ``path`` (nothing when ``path`` is None)::

        {"time": 1764000000.1, "event": "metrics", "job": "…", "worker": "12D3…",
         "role": "train", "step": 120, "values": {"loss": 2.31, "round": 2, ...}}
        {"time": …, "event": "status", "job", "worker", "role", "state", "message"}
        {"time": …, "event": "lease", "job": null, "worker", "role", "lease", "price"}
        {"time": …, "event": "lost", "job", "worker", "role", "lease", "reason"}

    ``time`` is the scheduler's Unix time. A failure to write is logged once and never raised;
    the next event tries again (reopening the file).
    """

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._file: IO[str] | None = None
        self._warned = False

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        try:
            line = json.dumps({"time": self._clock(), "event": event, **fields},
                              separators=(",", ":"), allow_nan=False)
            if self._file is None:
                # NOTE: blocking writes in the trio thread: one short line to a local,
                # line-buffered file costs less than handing it to a worker thread.
                self._file = open(self.path, "a", buffering=1, encoding="utf-8")
            self._file.write(line + "\n")
        except (OSError, ValueError, TypeError) as exc:
            if not self._warned:
                log.error("cannot append to the metrics log %s: %s (further failures are not "
                          "logged)", self.path, exc)
                self._warned = True
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


@dataclass
class Held:
    """A lease this scheduler holds on a worker, and the job it runs there."""

    worker: ID
    offer: WorkerOffer
    expires: float  #: unix time, as the worker reported it
    job_id: str | None = None
    state: str = "leased"
    role: str = PLAIN_JOB  #: PLAIN_JOB, TRAIN or PARAMETER_SERVER
    spec: JobSpec | None = None  #: the job dispatched under this lease


@dataclass
class _Collecting:
    request: WorkerRequest
    offers: list[WorkerOffer] = field(default_factory=list)


class SchedulerNode:
    """The scheduler's logic on top of a running :class:`~hypha.net.Network`."""

    def __init__(self, net: Network, requirements: Requirements, *, workers: int,
                 lease_ttl: float = 30.0, offer_window: float = 0.5,
                 job_config: dict[str, str] | None = None, dispatch: bool = True,
                 dataset: str | None = None, data_seed: int = 0,
                 files: Path | None = None, diloco: DiLoCo | None = None,
                 metrics_log: Path | None = None) -> None:
        self.net = net
        self.requirements = requirements
        self.workers = workers
        self.lease_ttl = lease_ttl
        self.offer_window = offer_window
        self.job_config = dict(job_config or {})
        self.dispatch_jobs = dispatch
        self.held: dict[str, Held] = {}  # lease id → held
        self.lost: set[str] = set()  # workers that let a lease fail
        self.statuses: dict[str, JobStatus] = {}  # job id → latest
        self.metrics: dict[str, MetricsReport] = {}  # job id → latest
        self.messages: Counter[str] = Counter()  # per kind, sent and received
        self.finished = trio.Event()
        self.failed = False
        self.all_leased = trio.Event()
        self.dataset = dataset
        self.data_seed = data_seed
        #: the dataset's slices, once a data node announcing it was found
        self.tracker: SliceTracker | None = None
        #: data nodes that announce the dataset (assignments name them in turn)
        self.providers: list[ID] = []
        self.dataset_found = trio.Event()
        #: serves the job's files to the leased workers (``files`` given)
        self.files = None if files is None else FileServer(net, files, allow=self.holds_lease_on)
        self._finding = False
        self._next_provider = 0
        self._collecting: dict[str, _Collecting] = {}
        self._nursery: trio.Nursery | None = None
        #: the DiLoCo run, if this is one, and the planner of its synchronisations
        self.diloco = diloco
        self.planner = (None if diloco is None
                        else SyncPlanner(diloco.sync_batches, diloco.perf_aware))
        self.events = EventLog(metrics_log)
        #: job id → (role, final state) of every job that ended
        self.ended: dict[str, tuple[str, str]] = {}
        #: the parameter server has run every round (a DiLoCo run)
        self.training_over = False
        self._wound_down: set[str] = set()  # training jobs stopped because the run was over
        self._ps: Held | None = None  # the parameter server, once its job is dispatched
        self._ps_ready = trio.Event()  # set while ``_ps`` is known
        #: the parameter server's checkpoints (a DiLoCo run with a checkpoint_dir)
        self.custody = None if diloco is None or diloco.checkpoint_dir is None else \
            CheckpointCustody(net, diloco.checkpoint_dir, self._runs_ps_job)

    # -- lifecycle -------------------------------------------------------------------------------
    def serve(self) -> None:
        self.net.serve(PROTOCOLS["worker-offer"], self._on_offer)
        self.net.serve(PROTOCOLS["job-status"], self._on_status)
        self.net.serve(PROTOCOLS["metrics"], self._on_metrics)
        self.net.serve(PROTOCOLS["health"], self._on_health)
        self.net.serve(PROTOCOLS["data-slice"], self._on_data_slice)
        self.net.serve(PROTOCOLS["data-slice-done"], self._on_data_slice_done)
        self.net.serve(PROTOCOLS["round-plan"], self._on_round_plan)
        if self.custody is not None:
            self.net.on_tensor_stream(self._on_tensor_stream)

    async def _on_tensor_stream(self, incoming: IncomingTensorStream) -> None:
        if self.custody is not None and self.custody.takes(incoming.name):
            await self.custody.accept(incoming)
            return
        log.warning("refused tensor stream %r from %s: a scheduler takes only checkpoints",
                    incoming.name, incoming.peer)
        await incoming.refuse(f"this scheduler takes no tensor stream named {incoming.name!r}")

    def _runs_ps_job(self, peer: ID, job_id: str) -> bool:
        ps = self._ps
        return ps is not None and ps.worker == peer and ps.job_id == job_id \
            and ps.state not in _ENDED

    @property
    def parameter_server(self) -> ID | None:
        """The worker running the parameter-server job, once it is dispatched."""
        return None if self._ps is None else self._ps.worker

    def _total(self) -> int:
        return self.workers + (0 if self.diloco is None else 1)

    def _requirements(self, role: str) -> Requirements:
        if role == PARAMETER_SERVER:
            assert self.diloco is not None
            return self.diloco.parameter_server
        return self.requirements

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Find the dataset (if any), lease ``workers`` workers (in a DiLoCo run, the parameter
        server first), dispatch, and keep everything running until cancelled."""
        self.serve()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.files is not None:
                    await nursery.start(self.files.run)
                task_status.started()
                if self.dataset is not None:
                    # NOTE: before leasing: a worker paid for while no data node serves the
                    # data would only wait.
                    await self.find_dataset()
                    nursery.start_soon(self._refresh_providers)
                if self.diloco is None:
                    await self._fill(self.workers, PLAIN_JOB)
                else:
                    # NOTE: the parameter server first: the trainers' config names it.
                    await self._fill(1, PARAMETER_SERVER)
                    await self._await_ps()
                    await self._fill(self.workers, TRAIN)
        finally:
            self.events.close()

    async def _fill(self, wanted: int, role: str) -> None:
        """Allocate until ``wanted`` more workers are leased for ``role``, advertising again
        with backoff."""
        delay, cap = RETRY
        while wanted > 0:
            if role == TRAIN and self.training_over:
                return  # the parameter server has run every round: nobody to train for
            got = await self.allocate(wanted, role)
            wanted -= len(got)
            for held in got:
                assert self._nursery is not None
                self._nursery.start_soon(self._keep, held)
            if len(self.held) >= self._total():
                self.all_leased.set()
            if wanted > 0:
                log.info("%d more worker(s) wanted; advertising again in %.1f s", wanted, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, cap)

    # -- allocation --------------------------------------------------------------------------------
    async def allocate(self, wanted: int, role: str | None = None) -> list[Held]:
        """One round of the market: advertise, collect offers, choose, accept. Returns leases
        for ``role`` (default: the training job's)."""
        if role is None:
            role = PLAIN_JOB if self.diloco is None else TRAIN
        if role not in (PLAIN_JOB, TRAIN, PARAMETER_SERVER) \
                or (role == PLAIN_JOB) != (self.diloco is None):
            raise ValueError(f"role {role!r} is not one of this run's: "
                             f"{PLAIN_JOB if self.diloco is None else (TRAIN, PARAMETER_SERVER)}")
        requirements = self._requirements(role)
        request = WorkerRequest(
            id=new_id(), scheduler=str(self.net.peer_id),
            resources=requirements.resources, executor=requirements.executor,
            bid=requirements.bid, deadline=time.time() + self.offer_window,
            lease_ttl=min(3600.0, self.offer_window + 10.0),
            addrs=[str(a) for a in [*self.net.addrs, *self.net.relay_addrs]][:8],
        )
        self._collecting[request.id] = _Collecting(request)
        try:
            await self.net.publish(WORKER_TOPIC, encode(request))
            self.messages["advertisement sent"] += 1
            await trio.sleep(self.offer_window)
        finally:
            offers = self._collecting.pop(request.id).offers
        busy = {str(h.worker) for h in self.held.values()}
        chosen = choose(offers, requirements, wanted, exclude=self.lost | busy)
        log.info("advertisement %s (%s): %d offer(s), %d chosen", request.id, role, len(offers),
                 len(chosen))
        accepted: list[Held] = []

        async def accept(offer: WorkerOffer) -> None:
            held = await self._accept(offer, role)
            if held is not None:
                accepted.append(held)

        async with trio.open_nursery() as nursery:
            for offer in chosen:
                nursery.start_soon(accept, offer)
        return accepted

    async def _accept(self, offer: WorkerOffer, role: str) -> Held | None:
        worker = ID.from_base58(offer.worker)
        try:
            renewed = await self._renew(worker, offer.lease_id)
        except Exception as exc:  # a worker gone since its offer: take the next round
            log.warning("could not accept offer %s of %s: %s", offer.lease_id, worker, exc)
            return None
        held = Held(worker, offer, renewed.expires, role=role)
        self.held[offer.lease_id] = held
        log.info("leased %s from %s at %.4g/h (lease %s, %s)", offer.resources, worker,
                 offer.price, offer.lease_id, role)
        self.events.write("lease", job=None, worker=str(worker), role=role,
                          lease=offer.lease_id, price=offer.price)
        return held

    async def _renew(self, worker: ID, lease_id: str) -> LeaseRenewed:
        with trio.fail_after(RPC_TIMEOUT):
            reply = await self.net.request(worker, PROTOCOLS["renew-lease"],
                                           encode(RenewLease(lease_id=lease_id,
                                                             ttl=self.lease_ttl)))
        self.messages["renewal"] += 1
        return decode(LeaseRenewed, reply)

    # -- leases and jobs -----------------------------------------------------------------------------
    async def _keep(self, held: Held) -> None:
        """Dispatch the job under ``held``, then renew its lease until the job ends."""
        if held.role == TRAIN and self.training_over:
            log.info("not dispatching to %s: the run's rounds are over", held.worker)
            self.held.pop(held.offer.lease_id, None)  # its lease runs out unrenewed
            return
        if self.dispatch_jobs:
            try:
                await self._dispatch(held)
            except Exception as exc:
                log.error("dispatch to %s failed: %s; replacing it", held.worker, exc)
                await self._lose(held, str(exc))
                return
        elif held.role == PARAMETER_SERVER:
            self._set_ps(held)
        while held.state not in ("finished", "failed"):
            await trio.sleep(self.lease_ttl * RENEW_AT)
            if held.state in ("finished", "failed"):
                break
            try:
                renewed = await self._renew(held.worker, held.offer.lease_id)
            except Exception as exc:
                await self._lose(held, f"lease renewal failed: {exc}")
                return
            held.expires = renewed.expires
        self.held.pop(held.offer.lease_id, None)
        # NOTE: the job's end released its slices already; this catches a slice request that
        # was answered after the final status (it crossed it on the way).
        self._release(held.worker, held.job_id, f"job {held.job_id} is over")

    async def _dispatch(self, held: Held) -> None:
        me = str(self.net.peer_id)
        config: dict[str, str | int | float | bool] = dict(self.job_config)
        if held.role == PARAMETER_SERVER:
            assert self.diloco is not None
            config.update(role=PARAMETER_SERVER, rounds=self.diloco.rounds,
                          round_timeout=self.diloco.round_timeout, workers=self.workers,
                          scheduler=me)
            if self.custody is not None:
                config.update(custody=True)
                stored = self.custody.stored
                if stored is not None:
                    config.update(resume_round=stored.round, resume_sha256=stored.sha256)
        else:
            if held.role == TRAIN:
                assert self.diloco is not None
                ps = await self._await_ps(held)
                config.update(role=TRAIN, parameter_server=str(ps.worker),
                              rounds=self.diloco.rounds, sync_batches=self.diloco.sync_batches)
            if self.dataset is not None:
                config.update(dataset=self.dataset, scheduler=me)
        if self.files is not None:
            config.update(files_peer=me)
        job = JobSpec(id=new_id(), executor=self._requirements(held.role).executor,
                      config=config, resources=[])
        # NOTE: the job id is recorded (and a trainer joins the planner) before the worker
        # answers: the job starts at once and its first status report, metrics report or slice
        # request may arrive before the JobAccepted reply.
        held.job_id, held.spec = job.id, job
        if held.role == TRAIN and self.planner is not None:
            self.planner.join(str(held.worker))
        try:
            with trio.fail_after(RPC_TIMEOUT):
                reply = await self.net.request(held.worker, PROTOCOLS["dispatch-job"],
                                               encode(DispatchJob(lease_id=held.offer.lease_id,
                                                                  job=job)))
            decode(JobAccepted, reply)
        except BaseException:
            held.job_id, held.spec = None, None
            self._leave_planner(held)
            raise
        self.messages["dispatch"] += 1
        if held.state == "leased":  # a fast job may have reported its end already
            held.state = "dispatched"
        if held.role == PARAMETER_SERVER:
            self._set_ps(held)
            if self.custody is not None and "resume_round" in config:
                assert self._nursery is not None
                self._nursery.start_soon(self.custody.push, held.worker, job.id)
        log.info("%s job %s dispatched to %s", held.role, job.id, held.worker)

    def _set_ps(self, held: Held) -> None:
        self._ps = held
        self._ps_ready.set()
        log.info("the parameter server is %s", held.worker)

    async def _await_ps(self, held: Held | None = None) -> Held:
        """The parameter server, once one is dispatched; meanwhile ``held``'s lease is renewed
        (a trainer leased while the parameter server is being replaced waits for it)."""
        while self._ps is None:
            with trio.move_on_after(self.lease_ttl * RENEW_AT if held is not None else math.inf):
                await self._ps_ready.wait()
            if self._ps is None and held is not None:
                held.expires = (await self._renew(held.worker, held.offer.lease_id)).expires
        return self._ps

    def _leave_planner(self, held: Held) -> None:
        if held.role == TRAIN and self.planner is not None and str(held.worker) in self.planner:
            self.planner.leave(str(held.worker))

    async def _lose(self, held: Held, reason: str) -> None:
        log.warning("lost %s worker %s (%s); finding a replacement", held.role, held.worker,
                    reason)
        self.held.pop(held.offer.lease_id, None)
        self._release(held.worker, None, "the worker was lost")
        self.lost.add(str(held.worker))
        self.events.write("lost", job=held.job_id, worker=str(held.worker), role=held.role,
                          lease=held.offer.lease_id, reason=reason)
        self._leave_planner(held)
        if self._ps is held:
            # NOTE: the trainers learn the replacement from the answers to their metrics.
            self._ps = None
            if self._ps_ready.is_set():
                self._ps_ready = trio.Event()
        self.all_leased = trio.Event()
        await self._fill(1, held.role)

    def collect_metrics(self) -> list[Metric]:
        """Prometheus metrics: leases, job states, the market's messages, the jobs' own metrics."""
        states = Counter(h.state for h in self.held.values())
        reported: dict[tuple[str, ...], float] = {}
        for job_id, report in self.metrics.items():
            for name, value in report.values.items():
                reported[(job_id, name)] = value
        return [
            gauge("hypha_peers_connected", "peers with an open connection",
                  len(self.net.connected_peers())),
            gauge("hypha_scheduler_workers", "workers leased, by state",
                  labels={(k,): v for k, v in states.items()}, label_names=("state",)),
            gauge("hypha_scheduler_workers_lost", "workers that let a lease fail",
                  len(self.lost)),
            gauge("hypha_scheduler_messages", "market messages sent and received, by kind",
                  labels={(k,): v for k, v in self.messages.items()}, label_names=("kind",)),
            gauge("hypha_job_metric", "the latest value of each metric a job reported",
                  labels=reported, label_names=("job", "name")),
            gauge("hypha_scheduler_sync_batches", "batches each training worker was told to run "
                  "in its current outer round", labels=self._sync_targets(),
                  label_names=("worker", "round")),
            *network_metrics(self.net),
        ]

    def _sync_targets(self) -> dict[tuple[str, ...], float]:
        if self.planner is None:
            return {}
        targets: dict[tuple[str, ...], float] = {}
        for worker in self.planner.participants():
            instruction = self.planner.instruction(worker)
            if instruction is not None:
                targets[(worker, str(instruction[0]))] = instruction[1]
        return targets

    # -- handlers --------------------------------------------------------------------------------
    async def _on_offer(self, peer: ID, data: bytes) -> bytes:
        offer = _decode(WorkerOffer, data)
        self.messages["offer received"] += 1
        if offer.worker != str(peer):
            raise RequestRejected(f"offer names worker {offer.worker} but came from {peer}")
        collecting = self._collecting.get(offer.request_id)
        if collecting is None:
            raise RequestRejected(f"advertisement {offer.request_id} is closed")
        if not math.isfinite(offer.price):
            raise RequestRejected("offer price is not finite")
        collecting.offers.append(offer)
        return encode(OfferReceived(request_id=offer.request_id))

    def holds_lease_on(self, peer: ID) -> bool:
        """Whether this scheduler holds a lease on ``peer`` now (who may fetch its files)."""
        return any(h.worker == peer for h in self.held.values())

    def _held_by(self, peer: ID, lease_id: str, job_id: str) -> Held:
        held = self.held.get(lease_id)
        if held is None or held.worker != peer or held.job_id != job_id:
            raise RequestRejected(f"job {job_id} under lease {lease_id} is not yours")
        return held

    async def _on_status(self, peer: ID, data: bytes) -> bytes:
        status = _decode(JobStatus, data)
        held = self._held_by(peer, status.lease_id, status.job_id)
        previous = self.statuses.get(status.job_id)
        self.statuses[status.job_id] = status
        self.messages["status received"] += 1
        log.info("%s job %s on %s: %s%s", held.role, status.job_id, peer, status.state,
                 f" ({status.message})" if status.message else "")
        if previous is None or previous.state != status.state:
            self.events.write("status", job=status.job_id, worker=str(peer), role=held.role,
                              state=status.state, message=status.message)
        if status.state in ("finished", "failed", "stopped"):
            held.state = "finished" if status.state == "finished" else "failed"
            self._release(peer, status.job_id, f"job {status.job_id} {status.state}")
            if status.job_id not in self.ended:
                self.ended[status.job_id] = (held.role, status.state)
                self._leave_planner(held)
            self.failed |= status.state != "finished" and status.job_id not in self._wound_down
            if held.role == PARAMETER_SERVER and status.state == "finished" \
                    and not self.training_over:
                self.training_over = True
                assert self._nursery is not None
                self._nursery.start_soon(self._wind_down)
            if self.failed or self._all_finished():
                self.finished.set()
        return encode(StatusReceived(job_id=status.job_id))

    def _all_finished(self) -> bool:
        """Every job of the run finished: ``workers`` jobs (training jobs, in a DiLoCo run, and
        then the parameter-server job too)."""
        # NOTE: counted by job as it ends, not from the held leases: those are dropped a while
        # after their job ends, and a late last job would otherwise never complete the run.
        finished = Counter(role for role, state in self.ended.values() if state == "finished")
        if self.diloco is None:
            return finished[PLAIN_JOB] >= self.workers
        # NOTE: once the parameter server has run every round, the run is over when no training
        # job still runs (each stops after the last update; a late joiner is stopped)
        return self.training_over and not self._running_trainers()

    def _running_trainers(self) -> list[Held]:
        return [h for h in self.held.values()
                if h.role == TRAIN and h.job_id is not None and h.job_id not in self.ended]

    async def _wind_down(self) -> None:
        """The parameter server finished: give the trainers WIND_DOWN seconds to apply the last
        update and exit, then stop those still running (a trainer that joined too late for any
        round waits for a model that will not come); their stop is not a failure."""
        await trio.sleep(WIND_DOWN)
        for held in self._running_trainers():
            assert held.job_id is not None
            self._wound_down.add(held.job_id)
            log.info("stopping train job %s on %s: the run is over", held.job_id, held.worker)
            try:
                with trio.fail_after(RPC_TIMEOUT):
                    reply = await self.net.request(held.worker, PROTOCOLS["stop-job"], encode(
                        StopJob(job_id=held.job_id, reason="the run is over: the parameter "
                                "server has run every round")))
                decode(JobStopped, reply)
            except Exception as exc:  # gone already: its lease runs out
                log.warning("could not stop job %s on %s: %s", held.job_id, held.worker, exc)
                self.ended.setdefault(held.job_id, (TRAIN, "stopped"))
        if self._all_finished():
            self.finished.set()

    async def _on_metrics(self, peer: ID, data: bytes) -> bytes:
        report = _decode(MetricsReport, data)
        held = next((h for h in self.held.values()
                     if h.worker == peer and h.job_id == report.job_id), None)
        if held is None:
            raise RequestRejected(f"job {report.job_id} is not yours")
        self.metrics[report.job_id] = report
        self.events.write("metrics", job=report.job_id, worker=str(peer), role=held.role,
                          step=report.step, values=dict(report.values))
        instruction = self._plan(str(peer), report.values) if held.role == TRAIN else None
        if instruction is None or self._ps is None:
            return encode(MetricsReceived(job_id=report.job_id))
        round_, batches = instruction
        return encode(MetricsReceived(job_id=report.job_id, round=round_,
                                      batches=min(batches, MAX_SYNC_BATCHES),
                                      parameter_server=str(self._ps.worker)))

    def _plan(self, worker: str, values: Mapping[str, float]) -> tuple[int, int] | None:
        """Feed a training job's position and speed to the planner; its instruction (None:
        none yet, or the job no longer takes part)."""
        if self.planner is None or worker not in self.planner:
            return None
        given = [key for key in ("round", "round_step") if key in values]
        if not given:  # a report of other metrics: the instruction stands
            return self.planner.instruction(worker)
        if len(given) == 1:
            raise RequestRejected(f"report values 'round' and 'round_step' come together; got "
                                  f"only {given[0]!r}")
        counts = []
        for key in ("round", "round_step"):
            value = values[key]
            if not (0 <= value <= MAX_COUNT and value == int(value)):
                raise RequestRejected(f"report value {key!r} must be a whole number in [0, "
                                      f"{MAX_COUNT}], got {value}")
            counts.append(int(value))
        try:
            return self.planner.report(worker, counts[0], counts[1],
                                       values.get("batch_seconds"))
        except ValueError as exc:
            raise RequestRejected(str(exc)) from None

    async def _on_round_plan(self, peer: ID, data: bytes) -> bytes:
        request = _decode(RoundPlanRequest, data)
        if self.diloco is None:
            raise RequestRejected("this scheduler runs no parameter server")
        if not any(h.role == PARAMETER_SERVER and h.worker == peer
                   and h.job_id == request.job_id and h.state not in _ENDED
                   for h in self.held.values()):
            raise RequestRejected(f"job {request.job_id} is not this scheduler's running "
                                  "parameter-server job; only the worker running it may ask "
                                  "for round plans")
        self.messages["round plan"] += 1
        running = sorted(str(h.worker) for h in self.held.values()
                         if h.role == TRAIN and h.job_id is not None and h.state not in _ENDED
                         and (s := self.statuses.get(h.job_id)) is not None
                         and s.state == "running")
        return encode(RoundPlan(round=request.round, workers=running,
                                timeout=self.diloco.round_timeout))

    async def _on_health(self, peer: ID, data: bytes) -> bytes:
        _decode(HealthCheck, data)
        return encode(Health(status="ok", role="scheduler", version=hypha.__version__,
                             uptime=time.monotonic()))

    # -- data slices -------------------------------------------------------------------------------
    async def find_dataset(self) -> SliceTracker:
        """Look for data nodes announcing the dataset until one does; build the tracker.
        (A second caller waits for the first one's search.)"""
        assert self.dataset is not None
        if self._finding:
            await self.dataset_found.wait()
        self._finding = True
        delay, cap = DATA_RETRY
        while self.tracker is None:
            try:
                providers, info = await self._lookup(self.dataset)
            except (ConnectionError, ValueError, trio.TooSlowError) as exc:
                providers, info = [], None
                log.warning("looking up dataset %s failed: %s", self.dataset, exc)
            if providers and info is not None:
                self.providers = providers
                self.tracker = SliceTracker(self.dataset, info.num_slices, seed=self.data_seed)
                self.dataset_found.set()
                log.info("dataset %s: %d slices (%s), served by %s", self.dataset,
                         info.num_slices, info.kind, ", ".join(map(str, providers)))
                break
            log.info("no data node announces dataset %s yet; looking again in %.1f s",
                     self.dataset, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, cap)
        return self.tracker

    async def _lookup(self, name: str) -> tuple[list[ID], DatasetInfo | None]:
        key = dataset_key(name)
        with trio.fail_after(DHT_TIMEOUT):
            found = await self.net.find_providers(key)
            providers = list(dict.fromkeys(p.peer_id for p in found
                                           if p.peer_id != self.net.peer_id))
            record = await self.net.get(key) if providers else None
        return providers, None if record is None else DatasetInfo.from_bytes(record, name=name)

    async def _refresh_providers(self) -> None:
        assert self.dataset is not None
        while True:
            await trio.sleep(PROVIDER_REFRESH)
            try:
                providers, _ = await self._lookup(self.dataset)
            except (ConnectionError, ValueError, trio.TooSlowError) as exc:
                log.warning("refreshing the data nodes of %s failed: %s", self.dataset, exc)
                continue
            if providers and providers != self.providers:
                log.info("dataset %s is now served by %s", self.dataset,
                         ", ".join(map(str, providers)))
                self.providers = providers

    def _tracker_for(self, peer: ID, job_id: str, dataset: str) -> SliceTracker:
        """The tracker of ``dataset``, once ``peer`` is shown to run job ``job_id`` for us."""
        if not any(h.worker == peer and h.job_id == job_id
                   and h.state not in ("finished", "failed") for h in self.held.values()):
            raise RequestRejected(f"job {job_id} is not yours (or no longer runs)")
        if self.dataset is None:
            raise RequestRejected("this scheduler's job uses no dataset")
        if dataset != self.dataset:
            raise RequestRejected(f"this scheduler's job uses dataset {self.dataset!r}, not "
                                  f"{dataset!r}")
        if self.tracker is None:
            raise RequestRejected(f"{NO_SLICE_AVAILABLE}: no data node serving {dataset!r} "
                                  "has been found yet")
        return self.tracker

    async def _on_data_slice(self, peer: ID, data: bytes) -> bytes:
        request = _decode(DataSliceRequest, data)
        tracker = self._tracker_for(peer, request.job_id, request.dataset)
        try:
            index, epoch = tracker.assign(str(peer), job=request.job_id)
        except NoSliceAvailable as exc:
            raise RequestRejected(f"{NO_SLICE_AVAILABLE}: {exc}") from None
        except TrackerError as exc:
            raise RequestRejected(str(exc)) from None
        provider = self.providers[self._next_provider % len(self.providers)]
        self._next_provider += 1
        self.messages["slice assigned"] += 1
        log.info("slice %d of %s (epoch %d) to job %s on %s, from %s", index, request.dataset,
                 epoch, request.job_id, peer, provider)
        return encode(DataSliceAssignment(dataset=request.dataset, slice=index, epoch=epoch,
                                          provider=str(provider)))

    async def _on_data_slice_done(self, peer: ID, data: bytes) -> bytes:
        report = _decode(DataSliceDone, data)
        tracker = self._tracker_for(peer, report.job_id, report.dataset)
        try:
            tracker.done(str(peer), report.slice, report.epoch)
        except TrackerError as exc:
            raise RequestRejected(str(exc)) from None
        self.messages["slice used"] += 1
        return encode(DataSliceRecorded(dataset=report.dataset, slice=report.slice))

    def _release(self, worker: ID, job_id: str | None, why: str) -> None:
        """Give ``worker``'s slices (only ``job_id``'s, if given) back to AVAILABLE."""
        if self.tracker is None:
            return
        freed = self.tracker.release_worker(str(worker), job=job_id)
        if freed:
            log.info("%s: slice(s) %s of %s are available again", why,
                     ", ".join(map(str, freed)), self.tracker.dataset)


def _decode(kind: Any, data: bytes) -> Any:
    try:
        return decode(kind, data)
    except MessageError as exc:
        raise RequestRejected(str(exc)) from None


async def run(config: SchedulerConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
    """``python -m hypha.scheduler run``: lease workers, run the job, exit when it ends."""
    job = config.job
    try:
        if not config.network.bootstrap:
            raise ValueError("network.bootstrap is empty: a scheduler needs the address of at "
                             "least one gateway (…/p2p/<peer id>) to reach workers")
        requirements = Requirements(job.requirements(), job.executor(), job.bid, job.max_price)
        diloco = None if not job.parameter_server else DiLoCo(
            Requirements(job.ps_requirements(), job.ps_executor(), job.bid, job.max_price),
            rounds=job.rounds, sync_batches=job.sync_batches, perf_aware=job.perf_aware,
            round_timeout=job.round_timeout, checkpoint_dir=job.checkpoint_dir)
        settings = settings_from_sections(config.network, config.tls, reload_on_sighup=True)
        MTLSTransport(settings.tls)
    except ValueError as exc:
        log.error("cannot start the scheduler: %s", exc)
        return 2
    async with open_network(settings) as net:
        node = SchedulerNode(net, requirements, workers=job.workers, lease_ttl=job.lease_ttl,
                             offer_window=job.offer_window, job_config=job.job_config(),
                             dataset=job.dataset, data_seed=job.data_seed, files=job.files,
                             diloco=diloco, metrics_log=job.metrics_log)
        await serve_node(node, config.metrics, log, task_status, done=node.finished)
    log.info("scheduler stopped: %s", "a job failed" if node.failed else "all jobs finished")
    return 1 if node.failed else 0
