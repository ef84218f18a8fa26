"""The worker's job manager: one isolated work directory and one executor run per job.

A dispatched job gets ``hypha-<job id>`` (0700) under the configured work directory, runs
through the executor it asked for, and every state change (starting, running, finished, failed,
stopped) goes back to the scheduler that dispatched it (``/hypha/job-status/1``). Jobs are stopped
when their lease expires, when the scheduler asks, or when the worker shuts down; the work
directory is removed afterwards unless ``keep_work_dirs``.

Each job's bridge talks to the network through its own
:class:`~hypha.executors.network.NetworkBackend` (data slices from the job's scheduler and the
data nodes, files to and from peers); the manager installs the worker's one
:class:`~hypha.executors.network.StreamRouter`, which hands every incoming tensor stream to the
job it is for. A job's final state (finished, failed, stopped) is reported only after its
backend has told the scheduler which slices the job used, so that the scheduler, which gives a
job's remaining slices back when it ends, never takes back a slice that was trained on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio
from libp2p.peer.id import ID

from hypha.executors.network import NetworkBackend, StreamRouter
from hypha.executors.process import JobStatus as ExecutorStatus
from hypha.executors.workspace import JobWorkspace, WorkspaceError
from hypha.messages import PROTOCOLS, Executor, JobSpec, JobStatus, StatusReceived, decode, encode
from hypha.net import Network, RequestRejected

__all__ = ["JobExecutor", "JobManager"]

log = logging.getLogger("hypha.worker.jobs")

#: Seconds a status report may take.
STATUS_TIMEOUT = 10.0
#: Status reports queued before the oldest are dropped (the final state is always kept).
STATUS_QUEUE = 256


class JobExecutor(Protocol):
    """What runs a job: :class:`~hypha.executors.ProcessExecutor` (any script, beside its job
    bridge) or :class:`~hypha.executors.parameter_server.ParameterServerExecutor`. ``run``
    reports every state change through ``on_status`` and returns the final one."""

    async def run(self, job: Mapping[str, Any], work_dir: Path,
                  on_status: Callable[[ExecutorStatus], None], *,
                  backend: Any = None, task_status: Any = ...) -> ExecutorStatus: ...


@dataclass
class _Job:
    spec: JobSpec
    lease_id: str
    scheduler: ID
    workspace: JobWorkspace
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class JobManager:
    """Runs jobs through executors and reports their status to their schedulers."""

    def __init__(self, net: Network, executors: Mapping[Executor, JobExecutor], *,
                 work_dir: Path, keep_work_dirs: bool = False, prefetch: bool = True,
                 fetch_dirs: Iterable[Path] = ()) -> None:
        self.net = net
        self.executors = dict(executors)
        self.work_dir = Path(work_dir)
        self.keep_work_dirs = keep_work_dirs
        self.prefetch = prefetch
        self.fetch_dirs = tuple(fetch_dirs)
        self.router = StreamRouter()
        #: what the jobs' backends did, summed over jobs: "slices fetched", "slices
        #: prefetched", "prefetch used", "files sent", "files received"
        self.data_counts: Counter[str] = Counter()
        self._jobs: dict[str, _Job] = {}
        self._nursery: trio.Nursery | None = None
        self._send, self._receive = trio.open_memory_channel[tuple[ID, JobStatus]](STATUS_QUEUE)

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.router.install(self.net)
        nursery.start_soon(self._report_statuses)

    # -- dispatch / stop ---------------------------------------------------------------------------
    async def dispatch(self, spec: JobSpec, *, lease_id: str, scheduler: ID) -> None:
        if self._nursery is None:
            raise RuntimeError("JobManager.start() was not called")
        if spec.id in self._jobs:
            raise RequestRejected(f"job {spec.id} is already running here")
        executor = self.executors.get(spec.executor)
        if executor is None:
            raise RequestRejected(f"executor {spec.executor.kind}:{spec.executor.name} is not "
                                  "available on this worker")
        workspace = JobWorkspace(self.work_dir, spec.id, keep=self.keep_work_dirs)
        try:
            work_dir = workspace.create()
        except (WorkspaceError, ValueError) as exc:
            raise RequestRejected(f"cannot create the job's work directory: {exc}") from None
        job = _Job(spec, lease_id, scheduler, workspace)
        self._jobs[spec.id] = job
        try:
            self._nursery.start_soon(self._run, job, executor, work_dir)
        except RuntimeError:  # the nursery is closing: this worker is shutting down
            self._jobs.pop(spec.id, None)
            workspace.cleanup()
            raise RequestRejected("this worker is shutting down") from None
        log.info("job %s dispatched by %s under lease %s: %s in %s", spec.id, scheduler,
                 lease_id, spec.executor.name, work_dir)

    def running(self) -> list[str]:
        return list(self._jobs)

    def owned_by(self, job_id: str, peer: ID) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and job.scheduler == peer

    def jobs_under(self, lease_id: str) -> list[str]:
        return [j.spec.id for j in self._jobs.values() if j.lease_id == lease_id]

    async def stop(self, job_id: str, reason: str) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        log.info("stopping job %s: %s", job_id, reason)
        job.scope.cancel()
        await job.done.wait()

    async def stop_lease(self, lease_id: str, reason: str) -> None:
        for job_id in self.jobs_under(lease_id):
            await self.stop(job_id, reason)

    # -- running -------------------------------------------------------------------------------------
    async def _run(self, job: _Job, executor: JobExecutor, work_dir: Path) -> None:
        spec: dict[str, Any] = {
            "id": job.spec.id,
            "executor": {"kind": job.spec.executor.kind, "name": job.spec.executor.name,
                         "runtime": job.spec.executor.runtime},
            "config": dict(job.spec.config),
            "lease_id": job.lease_id,
            "scheduler": str(job.scheduler),
            "worker": str(self.net.peer_id),
        }

        final: list[ExecutorStatus] = []

        def on_status(status: ExecutorStatus) -> None:
            if status.state in ("finished", "failed", "stopped"):
                final.append(status)  # reported once the backend has settled the slices
            else:
                self._queue(job, status)

        assert self._nursery is not None
        try:
            with job.scope:
                backend = NetworkBackend(self.net, self.router, job_id=job.spec.id,
                                         scheduler=job.scheduler, work_dir=work_dir,
                                         allowed_dirs=self.fetch_dirs, prefetch=self.prefetch,
                                         counts=self.data_counts)
                await self._nursery.start(backend.run)
                try:
                    result = await executor.run(spec, work_dir, on_status, backend=backend)
                    if result.state == "finished":
                        await backend.finish()
                finally:
                    await backend.aclose()
        except Exception as exc:
            log.error("job %s failed: %s", job.spec.id, exc)
            if not final:  # failed before the executor could report it
                final.append(ExecutorStatus(job.spec.id, "failed",
                                            message=f"{type(exc).__name__}: {exc}"))
        finally:
            for status in final:
                self._queue(job, status)
            self._jobs.pop(job.spec.id, None)
            try:
                job.workspace.cleanup()
            except OSError as exc:
                log.error("job %s: could not remove %s: %s", job.spec.id, work_dir, exc)
            job.done.set()

    def _queue(self, job: _Job, status: ExecutorStatus) -> None:
        message = status.message
        if status.stderr_tail:
            message = (message + "\n" + "\n".join(status.stderr_tail)).strip()
        report = JobStatus(job_id=job.spec.id, lease_id=job.lease_id, state=status.state,
                           message=message[-4096:], exit_code=_clamp(status.exit_code),
                           time=time.time())
        log.info("job %s: %s%s", job.spec.id, status.state,
                 f" ({status.message})" if status.message else "")
        try:
            self._send.send_nowait((job.scheduler, report))
        except trio.WouldBlock:
            log.warning("status queue full: dropped %s report of job %s", status.state,
                        job.spec.id)

    async def _report_statuses(self) -> None:
        async for scheduler, report in self._receive:
            try:
                with trio.fail_after(STATUS_TIMEOUT):
                    reply = await self.net.request(scheduler, PROTOCOLS["job-status"],
                                                   encode(report))
                decode(StatusReceived, reply)
            except Exception as exc:  # a scheduler that is gone: its lease will expire
                log.warning("could not report %s of job %s to %s: %s", report.state,
                            report.job_id, scheduler, exc)


def _clamp(code: int | None) -> int | None:
    if code is None:
        return None
    return max(-255, min(255, code))
