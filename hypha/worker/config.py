"""The worker's configuration schema: [network], [tls], [log], [resources], [executor], [pricing]
and [jobs]."""


from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

from hypha.config import (
    InvalidSetting,
    LogSection,
    MetricsSection,
    NetworkSection,
    TLSSection,
    section,
    setting,
)
from hypha.messages import Executor, MessageError
from hypha.worker.arbiter import STRATEGIES, Pricing
from hypha.worker.resources import parse_size

__all__ = [
    "COMMAND_PLACEHOLDERS",
    "ExecutorSection",
    "JobsSection",
    "PricingSection",
    "ResourcesSection",
    "WorkerConfig",
    "WorkerNetworkSection",
]

#: The placeholders ``[executor] command`` may use; the process executor fills them in per job.
COMMAND_PLACEHOLDERS: Final = ("SOCKET_PATH", "WORK_DIR", "JOB_JSON")
# NOTE: placeholders are replaced as plain text, so other braces (a JSON argument) pass through;
# only what looks like a placeholder ({UPPER_CASE}) must be a known one, to catch typos.
_PLACEHOLDER: Final = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")


@dataclass(frozen=True)
class WorkerNetworkSection(NetworkSection):
    """libp2p addresses: where this worker listens and which gateways it joins through.

    A worker needs at least one bootstrap address to find schedulers; the default is empty only
    so that a fresh config loads; the worker node must refuse to start without one.
    """

    bootstrap: list[str] = setting(
        [],
        "multiaddrs of gateways to join the network through, each ending in /p2p/<peer id>; "
        "a worker needs at least one",
        metavar="MULTIADDR",
    )


@dataclass(frozen=True)
class ResourcesSection:
    """What this worker offers. Unset values are detected; a value above the detected one is
    used as given (with a warning), e.g. where a container hides the real limits."""

    cpu: float | None = setting(
        None, "CPU cores to offer (default: the cores this process may use)", example=8.0
    )
    memory: str | None = setting(
        None,
        'memory to offer, a quoted size: "16GiB", "500G", "17179869184" (default: the memory '
        "available now)",
        example="16GiB",
        metavar="SIZE",
    )
    storage: str | None = setting(
        None,
        "disk space under jobs.work_dir to offer, a quoted size such as \"100GiB\" (default: the "
        "free space there)",
        example="100GiB",
        metavar="SIZE",
    )
    gpu: int | None = setting(
        None,
        "CUDA device index of the GPU to offer (default: none, CPU only)",
        flag="--gpu",
        metavar="INDEX",
    )

    def validate(self) -> None:
        if self.cpu is not None and not (math.isfinite(self.cpu) and self.cpu > 0):
            raise InvalidSetting("cpu", f"must be a positive number of cores, got {self.cpu}")
        for key in ("memory", "storage"):
            value = getattr(self, key)
            if value is None:
                continue
            try:
                size = parse_size(value)
            except ValueError as exc:
                raise InvalidSetting(key, str(exc)) from None
            if key == "memory" and size == 0:
                raise InvalidSetting(key, f"must be more than 0 bytes, got {value!r}")
        if self.gpu is not None and self.gpu < 0:
            raise InvalidSetting("gpu", f"must be a CUDA device index (0, 1, ...), got {self.gpu}")

    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)

    def storage_bytes(self) -> int | None:
        return None if self.storage is None else parse_size(self.storage)


@dataclass(frozen=True)
class ExecutorSection:
    """The executors this worker offers: a process executor running the command for each job
    (when a command is given), and the built-in DiLoCo parameter server (when
    ``parameter_server`` is on). A worker must offer at least one."""

    name: str = setting("train", "name of the process executor, as schedulers ask for it")
    runtime: str = setting("python", "runtime of the process executor, as schedulers ask for it")
    command: list[str] = setting(
        [],
        "the process executor's command line, one argument per item; {SOCKET_PATH}, {WORK_DIR} "
        "and {JOB_JSON} are replaced per job (a worker needs a command, or parameter_server on)",
        metavar="ARG",
    )

    env: list[str] = setting(
        [], "extra environment of every job, as KEY=VALUE items (e.g. HYPHA_THROTTLE=3 makes "
        "the training executor 3x slower, for tests and benchmarks)", metavar="KEY=VALUE")
    parameter_server: bool = setting(
        False, "also offer the built-in parameter-server executor that aggregates a DiLoCo "
        "run's pseudo-gradients and applies the outer step (kind parameter-server)")
    parameter_server_name: str = setting(
        "diloco", "name of the parameter-server executor, as schedulers ask for it")

    def validate(self) -> None:
        try:
            Executor(kind="process", name=self.name, runtime=self.runtime)
        except MessageError as exc:
            raise InvalidSetting(exc.path, f"{exc.problem}") from None
        try:
            Executor(kind="parameter-server", name=self.parameter_server_name,
                     runtime=self.runtime)
        except MessageError as exc:
            raise InvalidSetting("parameter_server_name", f"{exc.problem}") from None
        for i, item in enumerate(self.env):
            key = item.split("=", 1)[0]
            if "=" not in item or not key or not key.replace("_", "a").isalnum() \
                    or key[0].isdigit():
                raise InvalidSetting(f"env[{i}]", f"expected KEY=VALUE with KEY a variable name, "
                                     f"got {item!r}")
        if self.command and not self.command[0].strip():
            raise InvalidSetting("command[0]", "the program to run is empty")
        known = ", ".join(f"{{{p}}}" for p in COMMAND_PLACEHOLDERS)
        for i, arg in enumerate(self.command):
            for name in _PLACEHOLDER.findall(arg):
                if name not in COMMAND_PLACEHOLDERS:
                    raise InvalidSetting(
                        f"command[{i}]",
                        f"unknown placeholder {{{name}}} in {arg!r}; known: {known}",
                    )

    def job_env(self) -> dict[str, str]:
        """The ``env`` items as a mapping."""
        return dict(item.split("=", 1) for item in self.env)

    def offered(self) -> list[Executor]:
        """The executors this worker offers (the process executor only with a command)."""
        offered = []
        if self.command:
            offered.append(Executor(kind="process", name=self.name, runtime=self.runtime))
        if self.parameter_server:
            offered.append(Executor(kind="parameter-server", name=self.parameter_server_name,
                                    runtime=self.runtime))
        return offered


@dataclass(frozen=True)
class PricingSection:
    """How this worker prices its offers. Prices are per hour for the whole offer (what a
    scheduler bids for the resources it asks for); see hypha.worker.arbiter.Pricing."""

    strategy: str = setting(
        "flexible",
        "flexible: offer exactly what was asked, at the bid, when the bid is at least price; "
        "whole: offer all free resources at the larger of the bid and price",
        choices=STRATEGIES,
    )
    price: float = setting(1.0, "asking price per hour for the resources of one offer")
    floor: float = setting(0.5, "no offer is ever made below this price per hour")

    def validate(self) -> None:
        if not (math.isfinite(self.price) and self.price > 0):
            raise InvalidSetting("price", f"must be a positive price per hour, got {self.price}")
        if not (math.isfinite(self.floor) and self.floor >= 0):
            raise InvalidSetting(
                "floor", f"must be 0 or a positive price per hour, got {self.floor}"
            )

    def to_pricing(self) -> Pricing:
        return Pricing(self.strategy, self.price, self.floor)  # type: ignore[arg-type]


@dataclass(frozen=True)
class JobsSection:
    """Where jobs run and how offers are timed."""

    work_dir: Path = setting(
        Path("hypha-work"), "directory under which each job gets its own work directory"
    )
    keep_work_dirs: bool = setting(
        False, "keep a job's work directory after it ends (for debugging)"
    )
    offer_ttl: float = setting(
        5.0, "seconds an offer holds its resources while the scheduler decides"
    )
    batch_window: float = setting(
        0.2,
        "seconds to collect advertisements after the first one before answering, so that the "
        "best of several schedulers' requests wins",
    )
    prefetch: bool = setting(
        True, "download a job's next data slice while it trains on the current one"
    )
    fetch_dirs: list[Path] = setting(
        [],
        "directories outside the work directory that jobs may fetch local files from (source "
        "\"path\" with an absolute path)",
        metavar="DIR",
    )

    def validate(self) -> None:
        if not (math.isfinite(self.offer_ttl) and self.offer_ttl > 0):
            raise InvalidSetting(
                "offer_ttl", f"must be a positive number of seconds, got {self.offer_ttl}"
            )
        if not (math.isfinite(self.batch_window) and self.batch_window >= 0):
            raise InvalidSetting(
                "batch_window",
                f"must be 0 (answer each at once) or a positive number of seconds, "
                f"got {self.batch_window}",
            )


@dataclass(frozen=True)
class WorkerConfig:
    """A worker offers its CPU, memory, storage and (optionally) one GPU to schedulers: it
    answers their advertisements with priced offers, holds the resources under leases they
    renew, and runs the jobs they dispatch."""

    role: ClassVar[str] = "worker"

    network: WorkerNetworkSection = section(WorkerNetworkSection)
    tls: TLSSection = section(TLSSection)
    log: LogSection = section(LogSection)
    resources: ResourcesSection = section(ResourcesSection)
    executor: ExecutorSection = section(ExecutorSection)
    pricing: PricingSection = section(PricingSection)
    jobs: JobsSection = section(JobsSection)
    metrics: MetricsSection = section(MetricsSection)
