"""The worker node: answers advertisements, keeps leases, runs jobs.

- **Arbiter loop**: task advertisements arrive on the ``hypha/worker`` Gossipsub topic. Each is
  decoded (a malformed one is logged and dropped) and checked against its signed publisher: a
  request whose ``scheduler`` is not the peer that published it is dropped, so nobody can book a
  worker on another scheduler's behalf. Requests are batched over a short window and handed to the
  :class:`~hypha.worker.arbiter.Arbiter`, whose offers go to each scheduler over RPC. An offer
  that cannot be delivered releases its hold at once.
- **Leases**: a scheduler accepts an offer by renewing its lease (``/hypha/renew-lease/1``), and
  keeps it by renewing again; only the scheduler an offer went to may renew it, dispatch under it
  or stop its jobs. One task sleeps until the next expiry: an expired lease frees its resources
  and stops the jobs running under it.
- **Jobs**: ``/hypha/dispatch-job/1`` starts a job under an accepted lease through the
  :class:`~hypha.worker.jobs.JobManager`, which reports every state change back to the scheduler
  and gives each job's bridge a network backend: data slices (prefetched one ahead), files to
  and from peers. The manager's stream router is the worker's one tensor-stream handler.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Any

import trio
from libp2p.peer.id import ID
from prometheus_client.core import Metric

import hypha
from hypha.executors.parameter_server import ParameterServerExecutor
from hypha.executors.process import ProcessExecutor
from hypha.leases import LeaseError
from hypha.messages import (
    PROTOCOLS,
    WORKER_TOPIC,
    DispatchJob,
    Executor,
    Health,
    HealthCheck,
    JobAccepted,
    JobStopped,
    LeaseRenewed,
    MessageError,
    OfferReceived,
    RenewLease,
    StopJob,
    WorkerOffer,
    WorkerRequest,
    decode,
    encode,
)
from hypha.metrics import counter, gauge, network_metrics
from hypha.net import (
    MTLSTransport,
    Network,
    RequestRejected,
    open_network,
    settings_from_sections,
)
from hypha.rolecli import serve_node
from hypha.worker.arbiter import Arbiter, batches
from hypha.worker.config import WorkerConfig
from hypha.worker.jobs import JobExecutor, JobManager
from hypha.worker.resources import apply_overrides, detect

__all__ = ["WorkerNode", "run"]

log = logging.getLogger("hypha.worker")

#: Seconds an offer RPC may take before the hold is released.
OFFER_TIMEOUT = 5.0
#: Requests queued for the arbiter before new ones are dropped (a flood must not grow memory).
QUEUE = 1024


class WorkerNode:
    """The worker's logic on top of a running :class:`~hypha.net.Network`."""

    def __init__(self, net: Network, arbiter: Arbiter, jobs: JobManager, *,
                 batch_window: float = 0.2, version: str = "0") -> None:
        self.net = net
        self.arbiter = arbiter
        self.jobs = jobs
        self.batch_window = batch_window
        self.version = version
        self._started = time.monotonic()
        self._lease_changed = trio.Event()
        self.offers_sent = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.net.serve(PROTOCOLS["renew-lease"], self._on_renew)
        self.net.serve(PROTOCOLS["dispatch-job"], self._on_dispatch)
        self.net.serve(PROTOCOLS["stop-job"], self._on_stop)
        self.net.serve(PROTOCOLS["health"], self._on_health)
        subscription = await self.net.subscribe(WORKER_TOPIC)
        send, receive = trio.open_memory_channel[WorkerRequest](QUEUE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, subscription, send)
            nursery.start_soon(self._answer, receive)
            nursery.start_soon(self._expire_leases)
            await self.jobs.start(nursery)
            log.info("worker %s offering %s with %s", self.net.peer_id, self.arbiter.total,
                     ", ".join(f"{e.kind}:{e.name}" for e in self.arbiter.executors))
            task_status.started()

    def collect_metrics(self) -> list[Metric]:
        """Prometheus metrics, read from the live ledgers at scrape time."""
        leases = self.arbiter.leases()
        free = self.arbiter.free()
        return [
            gauge("hypha_peers_connected", "peers with an open connection",
                  len(self.net.connected_peers())),
            gauge("hypha_worker_leases", "accepted leases held", len(leases)),
            counter("hypha_worker_offers", "offers delivered to schedulers", self.offers_sent),
            gauge("hypha_worker_jobs", "jobs running", len(self.jobs.running())),
            gauge("hypha_worker_free", "resources not held by a lease or an offer",
                  labels={("cpu",): free.cpu, ("memory",): free.memory,
                          ("storage",): free.storage, ("gpu",): free.gpu},
                  label_names=("resource",)),
            counter("hypha_worker_job_events", "what the jobs' bridges and backends did, by "
                    "kind (slices fetched, files sent, metrics reported, bridge 4xx/5xx ...)",
                    labels={(k,): v for k, v in self.jobs.data_counts.items()},
                    label_names=("kind",)),
            *network_metrics(self.net),
        ]

    # -- advertisements --------------------------------------------------------------------------
    async def _listen(self, subscription: Any, send: trio.MemorySendChannel[WorkerRequest]
                      ) -> None:
        async for message in subscription:
            try:
                request = decode(WorkerRequest, message.data)
            except MessageError as exc:
                log.warning("dropped a malformed advertisement from %s: %s", message.sender, exc)
                continue
            if request.scheduler != str(message.sender):
                log.warning("dropped advertisement %s: it names scheduler %s but was published "
                            "by %s", request.id, request.scheduler, message.sender)
                continue
            self.net.learn_addrs(message.sender, request.addrs)
            try:
                send.send_nowait(request)
            except trio.WouldBlock:
                log.warning("arbiter queue full (%d): dropped advertisement %s", QUEUE,
                            request.id)

    async def _answer(self, receive: trio.MemoryReceiveChannel[WorkerRequest]) -> None:
        async with trio.open_nursery() as nursery, \
                aclosing(batches(receive, self.batch_window)) as stream:
            async for batch in stream:
                offers = self.arbiter.decide(batch, time.time())
                if offers:
                    self._lease_changed.set()
                for offer in offers:
                    nursery.start_soon(self._send_offer, offer)

    async def _send_offer(self, offer: WorkerOffer) -> None:
        lease = self.arbiter.get(offer.lease_id)
        scheduler = ID.from_base58(lease.value.scheduler) if lease else None
        if scheduler is None:
            return
        try:
            with trio.fail_after(OFFER_TIMEOUT):
                reply = await self.net.request(scheduler, PROTOCOLS["worker-offer"],
                                               encode(offer))
            decode(OfferReceived, reply)
            self.offers_sent += 1
            log.info("offered %s at %.4g/h for request %s to %s (hold %s)", offer.resources,
                     offer.price, offer.request_id, scheduler, offer.lease_id)
        except (trio.TooSlowError, ConnectionError, MessageError, Exception) as exc:
            log.warning("offer for request %s to %s not delivered (%s); hold released",
                        offer.request_id, scheduler, exc)
            try:
                self.arbiter.release(offer.lease_id)
            except LeaseError:
                pass

    # -- leases ----------------------------------------------------------------------------------
    async def _on_renew(self, peer: ID, data: bytes) -> bytes:
        request = _decode(RenewLease, data)
        try:
            lease = self.arbiter.renew(request.lease_id, request.ttl, scheduler=str(peer))
        except LeaseError as exc:
            raise RequestRejected(str(exc)) from None
        self._lease_changed.set()
        remaining = lease.remaining(trio.current_time())
        return encode(LeaseRenewed(lease_id=request.lease_id, expires=time.time() + remaining))

    async def _expire_leases(self) -> None:
        while True:
            deadline = self.arbiter.next_expiry()
            self._lease_changed = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + 60):
                await self._lease_changed.wait()
            for lease in self.arbiter.expire():
                if lease.value.accepted:
                    log.warning("lease %s of scheduler %s expired: freeing %s and stopping its "
                                "jobs", lease.key, lease.value.scheduler, lease.value.resources)
                    await self.jobs.stop_lease(lease.key, "lease expired")
                else:
                    log.debug("offer hold %s expired unaccepted", lease.key)

    # -- jobs --------------------------------------------------------------------------------------
    async def _on_dispatch(self, peer: ID, data: bytes) -> bytes:
        request = _decode(DispatchJob, data)
        lease = self.arbiter.get(request.lease_id)
        if lease is None or lease.value.scheduler != str(peer) or not lease.value.accepted:
            raise RequestRejected(f"no accepted lease {request.lease_id} of yours on this worker")
        if request.job.executor not in self.arbiter.executors:
            raise RequestRejected(f"this worker does not offer executor {request.job.executor}")
        await self.jobs.dispatch(request.job, lease_id=request.lease_id, scheduler=peer)
        return encode(JobAccepted(job_id=request.job.id))

    async def _on_stop(self, peer: ID, data: bytes) -> bytes:
        request = _decode(StopJob, data)
        if not self.jobs.owned_by(request.job_id, peer):
            raise RequestRejected(f"no job {request.job_id} of yours on this worker")
        await self.jobs.stop(request.job_id, request.reason)
        return encode(JobStopped(job_id=request.job_id))

    async def _on_health(self, peer: ID, data: bytes) -> bytes:
        _decode(HealthCheck, data)
        return encode(Health(status="ok", role="worker", version=self.version,
                             uptime=time.monotonic() - self._started))


def _decode(kind: Any, data: bytes) -> Any:
    try:
        return decode(kind, data)
    except MessageError as exc:
        raise RequestRejected(str(exc)) from None


async def run(config: WorkerConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
    """``python -m hypha.worker run``: join the network and serve until SIGINT/SIGTERM."""
    executors = config.executor.offered()
    try:
        if not config.network.bootstrap:
            raise ValueError("network.bootstrap is empty: a worker needs the address of at "
                             "least one gateway (…/p2p/<peer id>) to find schedulers")
        if not executors:
            raise ValueError("executor.command is empty and executor.parameter_server is off: "
                             "this worker would offer no executor")
        for directory in config.jobs.fetch_dirs:
            if not directory.is_dir():
                raise ValueError(f"jobs.fetch_dirs: {directory} is not a directory")
        resources = apply_overrides(detect(config.jobs.work_dir, config.resources.gpu),
                                    config.resources)
        settings = settings_from_sections(config.network, config.tls, reload_on_sighup=True)
        MTLSTransport(settings.tls)
    except ValueError as exc:
        log.error("cannot start the worker: %s", exc)
        return 2
    # a job sees the one GPU this worker offers (--gpu N), or none: it must not use what was
    # not leased
    env = {**config.executor.job_env(), "CUDA_VISIBLE_DEVICES":
           "" if config.resources.gpu is None else str(config.resources.gpu)}
    runners: dict[Executor, JobExecutor] = {}
    for executor in executors:
        runners[executor] = ParameterServerExecutor() if executor.kind == "parameter-server" \
            else ProcessExecutor(config.executor.command, env)
    async with open_network(settings) as net:
        arbiter = Arbiter(resources, executors, config.pricing.to_pricing(),
                          worker_id=str(net.peer_id), offer_ttl=config.jobs.offer_ttl)
        jobs = JobManager(net, runners, work_dir=config.jobs.work_dir,
                          keep_work_dirs=config.jobs.keep_work_dirs,
                          prefetch=config.jobs.prefetch, fetch_dirs=config.jobs.fetch_dirs)
        node = WorkerNode(net, arbiter, jobs, batch_window=config.jobs.batch_window,
                          version=hypha.__version__)
        await serve_node(node, config.metrics, log, task_status)
    log.info("worker stopped")
    return 0

