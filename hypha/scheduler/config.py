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

__all__ = ["JobSection", "SchedulerConfig"]


@dataclass(frozen=True)
class JobSection:
    """The job to run: how many workers, what each must offer, and what the scheduler pays."""

    workers: int = setting(1, "number of workers to lease and run the job on")
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

    def requirements(self) -> Resources:
        return Resources(cpu=self.cpu, memory=parse_size(self.memory),
                         storage=parse_size(self.storage), gpu=self.gpu)

    def executor(self) -> Executor:
        return Executor(kind=self.executor_kind, name=self.executor_name,  # type: ignore[arg-type]
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
