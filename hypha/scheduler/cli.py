"""The scheduler's command line: ``init`` writes a commented config (with its [job] section),
``run`` (the default) leases workers and runs the job.

python -m hypha.scheduler init [--config hypha-scheduler.toml] [--force]
python -m hypha.scheduler [run] [--config PATH] [--job-workers 3 ...]
"""

from __future__ import annotations

from collections.abc import Sequence

from hypha.rolecli import RoleCLI
from hypha.scheduler.config import SchedulerConfig

__all__ = ["CLI", "main"]

CLI = RoleCLI(
    role="scheduler",
    schema=SchedulerConfig,
    node_module="hypha.scheduler.node",
    description="Hypha scheduler: leases workers through the allocation market and runs a job "
    "on them.",
    init_hint="fill in [tls], network.bootstrap and [job]",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hypha.scheduler``; returns the exit status."""
    return CLI.main(argv)
