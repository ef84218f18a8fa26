"""The worker's command line: ``init`` writes a commented config, ``run`` (the default) starts it.

python -m hypha.worker init [--config hypha-worker.toml] [--force]
python -m hypha.worker [run] [--config PATH] [--gpu 0] [--tls-cert PATH ...]
"""

from __future__ import annotations

from collections.abc import Sequence

from hypha.rolecli import RoleCLI
from hypha.worker.config import WorkerConfig

__all__ = ["CLI", "main"]

CLI = RoleCLI(
    role="worker",
    schema=WorkerConfig,
    node_module="hypha.worker.node",
    description="Hypha worker: offers this machine's CPU, memory, storage and GPU to schedulers "
    "and runs the jobs they lease it for.",
    init_hint="fill in [tls], network.bootstrap and executor.command",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hypha.worker``; returns the exit status."""
    return CLI.main(argv)
