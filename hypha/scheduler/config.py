"""The scheduler's configuration schema: [network], [tls], [log] and [job]."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from hypha.config import (
    InvalidSetting,
    LogSection,
    MetricsSection,
    NetworkSection,
    TLSSection,
    section,
    setting,
)
from hypha.messages import DataSliceRequest, Executor, MessageError, Resources, new_id
from hypha.worker.resources import parse_size

__all__ = ["MAX_SYNC_BATCHES", "JobSection", "SchedulerConfig"]

#: The most batches a worker may be told to run in one round (``MetricsReceived.batches``).
MAX_SYNC_BATCHES = 1 << 32


@dataclass(frozen=True)
class JobSection:
    """The job to run: how many workers, what each must offer, and what the scheduler pays."""

    workers: int = setting(1, "number of workers to lease and run the job on (training "
                           "workers: with parameter_server, one more worker is leased)")
    cpu: float = setting(1.0, "CPU cores each worker must offer")
    memory: str = setting("1GiB", "memory each worker must offer (bytes, or e.g. \"16GiB\")")
    storage: str = setting("1GiB", "free storage each worker must offer")
    gpu: int = setting(0, "GPUs each worker must offer")
    executor_kind: str = setting("process", "executor kind the job runs on",
                                 choices=("process", "parameter-server"))
    executor_name: str = setting("train", "executor name, as workers offer it")
    executor_runtime: str = setting("python", "executor runtime, as workers offer it")
    bid: float = setting(1.0, "price per hour offered for one worker (published)")
    max_price: float = setting(2.0, "the most this scheduler pays per worker-hour (private)")
    lease_ttl: float = setting(30.0, "seconds a lease lasts between renewals (renewed at 75%)")
    offer_window: float = setting(0.5, "seconds to collect offers after an advertisement")
    settings: list[str] = setting(
        [], "job configuration handed to the executor, as KEY=VALUE items", metavar="KEY=VALUE")
    dataset: str | None = setting(
        None, "dataset the job trains on, as a data node announces it; the scheduler hands its "
        "slices out to the workers (leave unset for a job without data)", example="books")
    data_seed: int = setting(0, "seed of the per-epoch shuffle of the dataset's slices")
    files: Path | None = setting(
        None, "directory whose files the scheduler serves, read-only, to the workers it leases "
        "(initial weights, a training script); the job's config names the scheduler as "
        "files_peer (leave unset to serve nothing)", example="job-files")
    parameter_server: bool = setting(
        False, "run DiLoCo: also lease one worker offering the built-in parameter-server "
        "executor (parameter-server:<ps_executor_name>:<executor_runtime>), which averages the "
        "training workers' pseudo-gradients every outer round")
    ps_executor_name: str = setting("diloco", "name of the parameter-server executor, as "
                                    "workers offer it")
    ps_cpu: float = setting(1.0, "CPU cores the parameter server's worker must offer")
    ps_memory: str = setting("1GiB", "memory the parameter server's worker must offer")
    ps_storage: str = setting("1GiB", "free storage the parameter server's worker must offer "
                              "(checkpoints)")
    rounds: int = setting(10, "outer rounds (synchronisations) of a DiLoCo run")
    sync_batches: int = setting(
        50, "H: batches each training worker runs per outer round, nominally; with perf_aware "
        "the round's H * workers batches are split by the workers' speeds")
    perf_aware: bool = setting(
        True, "performance-aware synchronisation: give fast workers more batches per round so "
        "that all reach the synchronisation at once (off: every worker runs sync_batches)")
    round_timeout: float = setting(
        60.0, "seconds the parameter server waits for the other workers' contributions after "
        "the first one is complete")
    metrics_log: Path | None = setting(
        None, "a JSON-lines file the scheduler appends every metrics report, job status change "
        "and lease event to (its directory must exist; leave unset for none)",
        example="metrics.jsonl")
    checkpoint_dir: Path | None = setting(
        None, "directory where the scheduler keeps the parameter server's checkpoint, sent to it "
        "after every round before the round's update goes out; a replacement parameter server, "
        "or this scheduler restarted, resumes the run from it (created if missing; leave unset "
        "to keep none: a lost parameter server then starts over)", example="checkpoints")

    #: job config keys the scheduler sets itself in a parameter-server run
    DILOCO_KEYS: ClassVar[tuple[str, ...]] = (
        "role", "parameter_server", "rounds", "sync_batches", "round_timeout", "workers",
        "scheduler", "dataset", "files_peer", "custody", "resume_round", "resume_sha256")

    def validate(self) -> None:
        if self.workers < 1:
            raise InvalidSetting("workers", f"must be at least 1, got {self.workers}")
        for key in ("bid", "max_price", "lease_ttl", "offer_window"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise InvalidSetting(key, f"must be a positive number, got {value}")
        if self.max_price < self.bid:
            raise InvalidSetting("max_price", f"{self.max_price} is below the bid {self.bid}: "
                                 "no offer at the bid could be accepted")
        try:
            self.requirements()
            self.executor()
        except (MessageError, ValueError) as exc:
            raise InvalidSetting("resources", str(exc)) from None
        for i, item in enumerate(self.settings):
            if "=" not in item or not item.split("=", 1)[0]:
                raise InvalidSetting(f"settings[{i}]", f"expected KEY=VALUE, got {item!r}")
        if self.dataset is not None:
            try:
                DataSliceRequest(job_id=new_id(), dataset=self.dataset)
            except MessageError as exc:
                raise InvalidSetting("dataset", exc.problem) from None
        if self.data_seed < 0:
            raise InvalidSetting("data_seed", f"must be 0 or more, got {self.data_seed}")
        if self.files is not None and not self.files.is_dir():
            raise InvalidSetting("files", f"{self.files} is not a directory")
        self._validate_diloco()
        if self.checkpoint_dir is not None and self.checkpoint_dir.exists() \
                and not self.checkpoint_dir.is_dir():
            raise InvalidSetting("checkpoint_dir", f"{self.checkpoint_dir} is not a directory")
        if self.metrics_log is not None:
            if self.metrics_log.is_dir():
                raise InvalidSetting("metrics_log", f"{self.metrics_log} is a directory; give "
                                     "the path of a file to append to")
            if not self.metrics_log.parent.is_dir():
                raise InvalidSetting("metrics_log", f"directory {self.metrics_log.parent} does "
                                     "not exist; create it first")

    def _validate_diloco(self) -> None:
        if not (math.isfinite(self.ps_cpu) and self.ps_cpu >= 0):
            raise InvalidSetting("ps_cpu", f"must be a number of cores >= 0, got {self.ps_cpu}")
        for key in ("ps_memory", "ps_storage"):
            try:
                parse_size(getattr(self, key))
            except ValueError as exc:
                raise InvalidSetting(key, str(exc)) from None
        try:
            self.ps_executor()
        except MessageError as exc:
            raise InvalidSetting("ps_executor_name", exc.problem) from None
        if self.rounds < 1:
            raise InvalidSetting("rounds", f"must be at least 1, got {self.rounds}")
        if not 1 <= self.sync_batches <= MAX_SYNC_BATCHES:
            raise InvalidSetting("sync_batches", f"must be between 1 and {MAX_SYNC_BATCHES}, "
                                 f"got {self.sync_batches}")
        if not (math.isfinite(self.round_timeout) and 0 < self.round_timeout <= 86400):
            raise InvalidSetting("round_timeout", "must be a number of seconds in (0, 86400], "
                                 f"got {self.round_timeout}")
        if not self.parameter_server:
            return
        if self.executor_kind != "process":
            raise InvalidSetting("executor_kind", "the training workers of a parameter-server "
                                 "run need a 'process' executor, got "
                                 f"{self.executor_kind!r}")
        for i, item in enumerate(self.settings):
            key = item.split("=", 1)[0]
            if key in self.DILOCO_KEYS:
                raise InvalidSetting(f"settings[{i}]", f"{key!r} is set by the scheduler in a "
                                     "parameter-server run; remove it (the scheduler sets "
                                     f"{', '.join(self.DILOCO_KEYS)})")

    def requirements(self) -> Resources:
        return Resources(cpu=self.cpu, memory=parse_size(self.memory),
                         storage=parse_size(self.storage), gpu=self.gpu)

    def executor(self) -> Executor:
        return Executor(kind=self.executor_kind, name=self.executor_name,  # type: ignore[arg-type]
                        runtime=self.executor_runtime)

    def ps_requirements(self) -> Resources:
        """What the parameter server's worker must offer."""
        return Resources(cpu=self.ps_cpu, memory=parse_size(self.ps_memory),
                         storage=parse_size(self.ps_storage), gpu=0)

    def ps_executor(self) -> Executor:
        return Executor(kind="parameter-server", name=self.ps_executor_name,
                        runtime=self.executor_runtime)

    def job_config(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.settings)


@dataclass(frozen=True)
class SchedulerConfig:
    """A scheduler leases workers through the allocation market (advertisement, priced offers,
    leases it renews), dispatches a job to them, replaces any it loses, and collects their
    status and metrics."""

    role: ClassVar[str] = "scheduler"

    network: NetworkSection = section(NetworkSection)
    tls: TLSSection = section(TLSSection)
    log: LogSection = section(LogSection)
    job: JobSection = section(JobSection)
    metrics: MetricsSection = section(MetricsSection)
