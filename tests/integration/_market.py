"""In-process market participants for tests and bench/alloc.py: a hub, workers, schedulers and
data nodes."""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hypha.data.node import DataNode
from hypha.data.slices import Dataset
from hypha.executors.process import ProcessExecutor
from hypha.gateway.node import GATEWAY_GOSSIP_DEGREE
from hypha.messages import GIB, Executor, Resources
from hypha.net import Network, open_network
from hypha.scheduler.allocator import Requirements
from hypha.scheduler.node import DiLoCo, SchedulerNode
from hypha.worker.arbiter import Arbiter, Pricing
from hypha.worker.jobs import JobManager
from hypha.worker.node import WorkerNode
from tests.unit.net._pki import PKI

TRAIN = Executor(kind="process", name="train", runtime="python")
#: the parameter-server executor a DiLoCo scheduler asks for (the job's runtime)
PS = Executor(kind="parameter-server", name="diloco", runtime="python")
SMALL = Resources(cpu=1, memory=1 * GIB, storage=1 * GIB, gpu=0)
MACHINE = Resources(cpu=8, memory=32 * GIB, storage=500 * GIB, gpu=0)
#: a job that runs until stopped
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@dataclass
class Worker:
    net: Network
    node: WorkerNode
    arbiter: Arbiter
    scope: trio.CancelScope


async def start_hub(stack: AsyncExitStack, pki: PKI) -> Network:
    """A gateway's network: it forwards the advertisement topic."""
    _, files = pki.node("hub")
    return await stack.enter_async_context(
        open_network(pki.settings(files, relay_topics=("hypha/worker",),
                                  gossip_degree=GATEWAY_GOSSIP_DEGREE)))


async def start_worker(stack: AsyncExitStack, nursery: trio.Nursery, pki: PKI, hub: Network,
                       name: str, pricing: Pricing, *, resources: Resources = MACHINE,
                       command: list[str] | None = None, work_dir: Path,
                       offer_ttl: float = 5.0, batch_window: float = 0.05,
                       prefetch: bool = True, ps_command: list[str] | None = None) -> Worker:
    """A worker offering the process executor ``TRAIN`` (running ``command``), and also the
    parameter-server executor ``PS`` when ``ps_command`` is given (a process standing in for
    the built-in parameter server)."""
    _, files = pki.node(name)
    net = await stack.enter_async_context(
        open_network(pki.settings(files, bootstrap=(str(hub.addrs[0]),))))
    runners: dict[Executor, Any] = {TRAIN: ProcessExecutor(command or SLEEPER, grace_period=2)}
    if ps_command is not None:
        runners[PS] = ProcessExecutor(ps_command, grace_period=2)
    arbiter = Arbiter(resources, list(runners), pricing, worker_id=str(net.peer_id),
                      offer_ttl=offer_ttl)
    jobs = JobManager(net, runners, work_dir=work_dir / name, prefetch=prefetch)
    node = WorkerNode(net, arbiter, jobs, batch_window=batch_window)
    scope = trio.CancelScope()

    async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await node.run(task_status=task_status)

    await nursery.start(serve)
    return Worker(net, node, arbiter, scope)


async def start_scheduler(stack: AsyncExitStack, pki: PKI, hub: Network, name: str, *,
                          workers: int, bid: float, max_price: float,
                          resources: Resources = SMALL, lease_ttl: float = 30.0,
                          offer_window: float = 0.5, dispatch: bool = True,
                          dataset: str | None = None, diloco: DiLoCo | None = None,
                          metrics_log: Path | None = None,
                          job_config: dict[str, str] | None = None) -> SchedulerNode:
    _, files = pki.node(name)
    net = await stack.enter_async_context(
        open_network(pki.settings(files, bootstrap=(str(hub.addrs[0]),))))
    return SchedulerNode(net, Requirements(resources, TRAIN, bid, max_price), workers=workers,
                         lease_ttl=lease_ttl, offer_window=offer_window, dispatch=dispatch,
                         dataset=dataset, diloco=diloco, metrics_log=metrics_log,
                         job_config=job_config)


async def start_data_node(stack: AsyncExitStack, nursery: trio.Nursery, pki: PKI, hub: Network,
                          name: str, datasets: list[Path], *, max_transfers: int = 4
                          ) -> DataNode:
    """A data node serving the prepared ``datasets``; it announces them in the background
    (``node.announced``)."""
    _, files = pki.node(name)
    net = await stack.enter_async_context(
        open_network(pki.settings(files, bootstrap=(str(hub.addrs[0]),))))
    node = DataNode(net, [Dataset.open(path) for path in datasets],
                    max_transfers=max_transfers)
    await nursery.start(node.run)
    return node


async def wait_connected(*nets: Network, hub: Network) -> None:
    while not all(hub.peer_id in n.connected_peers() for n in nets):
        await trio.sleep(0.02)


async def wait_subscribed(hub: Network, nets: list[Network],
                          schedulers: list[Network] = ()) -> None:  # type: ignore[assignment]
    """Until the hub knows every worker's subscription and every node knows the hub's."""
    for n in nets:
        await hub._pubsub.wait_for_subscription(n.peer_id, "hypha/worker", timeout=30)
    for n in [*nets, *schedulers]:
        await n._pubsub.wait_for_subscription(hub.peer_id, "hypha/worker", timeout=30)
