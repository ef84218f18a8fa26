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
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    LeaseRenewed,
    MessageError,
    MetricsReceived,
    MetricsReport,
    OfferReceived,
    RenewLease,
    StatusReceived,
    WorkerOffer,
    WorkerRequest,
    decode,
    encode,
    new_id,
)
from hypha.metrics import gauge
from hypha.net import (
    MTLSTransport,
    Network,
    RequestRejected,
    open_network,
    settings_from_sections,
)
from hypha.rolecli import serve_node
from hypha.scheduler.allocator import Requirements, choose
from hypha.scheduler.config import SchedulerConfig

__all__ = ["Held", "SchedulerNode", "run"]

log = logging.getLogger("hypha.scheduler")

#: Seconds an RPC to a worker may take.
RPC_TIMEOUT = 10.0
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


@dataclass
class Held:
    """A lease this scheduler holds on a worker, and the job it runs there."""

    worker: ID
    offer: WorkerOffer
    expires: float  #: unix time, as the worker reported it
    job_id: str | None = None
    state: str = "leased"


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
                 files: Path | None = None) -> None:
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

    # -- lifecycle -------------------------------------------------------------------------------
    def serve(self) -> None:
        self.net.serve(PROTOCOLS["worker-offer"], self._on_offer)
        self.net.serve(PROTOCOLS["job-status"], self._on_status)
        self.net.serve(PROTOCOLS["metrics"], self._on_metrics)
        self.net.serve(PROTOCOLS["health"], self._on_health)
        self.net.serve(PROTOCOLS["data-slice"], self._on_data_slice)
        self.net.serve(PROTOCOLS["data-slice-done"], self._on_data_slice_done)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Find the dataset (if any), lease ``workers`` workers, dispatch, and keep everything
        running until cancelled."""
        self.serve()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.files is not None:
                await nursery.start(self.files.run)
            task_status.started()
            if self.dataset is not None:
                # NOTE: before leasing: a worker paid for while no data node serves the data
                # would only wait.
                await self.find_dataset()
                nursery.start_soon(self._refresh_providers)
            await self._fill(self.workers)

    async def _fill(self, wanted: int) -> None:
        """Allocate until ``wanted`` more workers are leased, advertising again with backoff."""
        delay, cap = RETRY
        while wanted > 0:
            got = await self.allocate(wanted)
            wanted -= len(got)
            for held in got:
                assert self._nursery is not None
                self._nursery.start_soon(self._keep, held)
            if len([h for h in self.held.values()]) >= self.workers:
                self.all_leased.set()
            if wanted > 0:
                log.info("%d more worker(s) wanted; advertising again in %.1f s", wanted, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, cap)

    # -- allocation --------------------------------------------------------------------------------
    async def allocate(self, wanted: int) -> list[Held]:
        """One round of the market: advertise, collect offers, choose, accept. Returns leases."""
        request = WorkerRequest(
            id=new_id(), scheduler=str(self.net.peer_id),
            resources=self.requirements.resources, executor=self.requirements.executor,
            bid=self.requirements.bid, deadline=time.time() + self.offer_window,
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
        chosen = choose(offers, self.requirements, wanted, exclude=self.lost | busy)
        log.info("advertisement %s: %d offer(s), %d chosen", request.id, len(offers), len(chosen))
        accepted: list[Held] = []

        async def accept(offer: WorkerOffer) -> None:
            held = await self._accept(offer)
            if held is not None:
                accepted.append(held)

        async with trio.open_nursery() as nursery:
            for offer in chosen:
                nursery.start_soon(accept, offer)
        return accepted

    async def _accept(self, offer: WorkerOffer) -> Held | None:
        worker = ID.from_base58(offer.worker)
        try:
            renewed = await self._renew(worker, offer.lease_id)
        except Exception as exc:  # a worker gone since its offer: take the next round
            log.warning("could not accept offer %s of %s: %s", offer.lease_id, worker, exc)
            return None
        held = Held(worker, offer, renewed.expires)
        self.held[offer.lease_id] = held
        log.info("leased %s from %s at %.4g/h (lease %s)", offer.resources, worker, offer.price,
                 offer.lease_id)
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
        if self.dispatch_jobs:
            try:
                await self._dispatch(held)
            except Exception as exc:
                log.error("dispatch to %s failed: %s; replacing it", held.worker, exc)
                await self._lose(held, str(exc))
                return
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
        config = dict(self.job_config)
        if self.dataset is not None:
            config.update(dataset=self.dataset, scheduler=str(self.net.peer_id))
        if self.files is not None:
            config.update(files_peer=str(self.net.peer_id))
        job = JobSpec(id=new_id(), executor=self.requirements.executor, config=config,
                      resources=[])
        # NOTE: the job id is recorded before the worker answers: the job starts at once and
        # its first status report or slice request may arrive before the JobAccepted reply.
        held.job_id = job.id
        try:
            with trio.fail_after(RPC_TIMEOUT):
                reply = await self.net.request(held.worker, PROTOCOLS["dispatch-job"],
                                               encode(DispatchJob(lease_id=held.offer.lease_id,
                                                                  job=job)))
            decode(JobAccepted, reply)
        except BaseException:
            held.job_id = None
            raise
        self.messages["dispatch"] += 1
        if held.state == "leased":  # a fast job may have reported its end already
            held.state = "dispatched"
        log.info("job %s dispatched to %s", job.id, held.worker)

    async def _lose(self, held: Held, reason: str) -> None:
        log.warning("lost worker %s (%s); finding a replacement", held.worker, reason)
        self.held.pop(held.offer.lease_id, None)
        self._release(held.worker, None, "the worker was lost")
        self.lost.add(str(held.worker))
        self.all_leased = trio.Event()
        await self._fill(1)

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
        ]

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
        self.statuses[status.job_id] = status
        self.messages["status received"] += 1
        log.info("job %s on %s: %s%s", status.job_id, peer, status.state,
                 f" ({status.message})" if status.message else "")
        if status.state in ("finished", "failed", "stopped"):
            held.state = "finished" if status.state == "finished" else "failed"
            self._release(peer, status.job_id, f"job {status.job_id} {status.state}")
            self.failed |= status.state != "finished"
            done = [h for h in self.held.values() if h.state in ("finished", "failed")]
            if len(done) >= self.workers or self.failed:
                self.finished.set()
        return encode(StatusReceived(job_id=status.job_id))

    async def _on_metrics(self, peer: ID, data: bytes) -> bytes:
        report = _decode(MetricsReport, data)
        if not any(h.worker == peer and h.job_id == report.job_id for h in self.held.values()):
            raise RequestRejected(f"job {report.job_id} is not yours")
        self.metrics[report.job_id] = report
        return encode(MetricsReceived(job_id=report.job_id))

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
        settings = settings_from_sections(config.network, config.tls, reload_on_sighup=True)
        MTLSTransport(settings.tls)
    except ValueError as exc:
        log.error("cannot start the scheduler: %s", exc)
        return 2
    async with open_network(settings) as net:
        node = SchedulerNode(net, requirements, workers=job.workers, lease_ttl=job.lease_ttl,
                             offer_window=job.offer_window, job_config=job.job_config(),
                             dataset=job.dataset, data_seed=job.data_seed, files=job.files)
        await serve_node(node, config.metrics, log, task_status, done=node.finished)
    log.info("scheduler stopped: %s", "a job failed" if node.failed else "all jobs finished")
    return 1 if node.failed else 0
