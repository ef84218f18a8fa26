"""The command line every node role shares: ``init`` writes a commented config, ``run`` starts it.

    python -m hypha.<role> init [--config hypha-<role>.toml] [--force]
    python -m hypha.<role> [run] [--config PATH] [--<section>-<key> VALUE ...]

Settings come from the config file, then ``HYPHA_<SECTION>_<KEY>`` environment variables, then
flags (later wins; see :mod:`hypha.config`). ``run`` imports the role's node module only once the
config is valid (py-libp2p takes about a second to import) and runs its ``run(config)`` under
trio; a config error exits 2 with one message and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from hypha.config import (
    ConfigError,
    add_arguments,
    configure_logging,
    load,
    overrides_from_args,
    render,
    write_config,
)

__all__ = ["RaisingParser", "RoleCLI", "UsageError", "serve_node", "until_stopped"]

_COMMANDS = ("init", "run")


class RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise :class:`UsageError`, so that a tool's main()
    reports every error one way (one line, exit 2) instead of argparse exiting on its own."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, self)


class UsageError(Exception):
    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


@dataclass(frozen=True)
class RoleCLI:
    role: str  #: "gateway", "worker", ...
    schema: type  #: the role's config dataclass
    node_module: str  #: module with ``async def run(config) -> int``
    description: str
    init_hint: str = "fill in [tls] (cert, key, trust)"

    @property
    def prog(self) -> str:
        return f"python -m hypha.{self.role}"

    @property
    def default_config(self) -> Path:
        """``init`` writes here; ``run`` reads it when it exists and no --config is given."""
        return Path(f"hypha-{self.role}.toml")

    def main(self, argv: Sequence[str] | None = None) -> int:
        args_list = list(sys.argv[1:] if argv is None else argv)
        if not args_list or args_list[0] not in (*_COMMANDS, "-h", "--help"):
            args_list.insert(0, "run")  # no subcommand means run
        try:
            args = self.parser().parse_args(args_list)
        except SystemExit as exc:  # --help, or a usage error argparse already printed
            return exc.code if isinstance(exc.code, int) else 2
        try:
            if args.command == "init":
                return self._init(args)
            return self._run(args)
        except ConfigError as exc:
            print(f"hypha {self.role}: error: {exc}", file=sys.stderr)
            return 2

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=self.prog,
            description=f"{self.description} Settings come from the config file, then "
            "HYPHA_<SECTION>_<KEY> environment variables, then flags (later wins).",
        )
        commands = parser.add_subparsers(dest="command", metavar="{init,run}")
        init = commands.add_parser("init", help="write a commented config file",
                                   description="Write a commented config file.")
        init.add_argument("--config", type=Path, default=self.default_config, metavar="PATH",
                          help=f"where to write it (default: {self.default_config})")
        init.add_argument("--force", action="store_true", help="replace an existing file")
        run = commands.add_parser("run", help=f"start the {self.role} (the default)",
                                  description=f"Start the {self.role}.")
        run.add_argument("--config", type=Path, default=None, metavar="PATH",
                         help=f"TOML config file (default: {self.default_config} when it "
                         "exists, else none)")
        add_arguments(run, self.schema)
        return parser

    def _init(self, args: argparse.Namespace) -> int:
        write_config(args.config, render(self.schema), force=args.force)
        print(f"wrote {args.config}: {self.init_hint}, then start the {self.role} with "
              f"`{self.prog} run --config {args.config}`")
        return 0

    def _run(self, args: argparse.Namespace) -> int:
        path: Path | None = args.config
        if path is None and self.default_config.is_file():
            path = self.default_config
        config: Any = load(self.schema, path, overrides=overrides_from_args(args, self.schema))
        configure_logging(config.log)
        logging.getLogger(f"hypha.{self.role}").info(
            "configuration from %s", path if path is not None else "environment and flags only")
        import trio

        run = importlib.import_module(self.node_module).run
        try:
            result = trio.run(run, config)
        except KeyboardInterrupt:
            return 130
        return result if isinstance(result, int) else 0


async def until_stopped(log: logging.Logger) -> None:
    """Return on SIGINT or SIGTERM (a clean shutdown for a terminal and for systemd alike)."""
    import trio

    if threading.current_thread() is not threading.main_thread():
        await trio.sleep_forever()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            return


async def serve_node(node: Any, metrics: Any, log: logging.Logger, task_status: Any, *,
                     done: Any = None) -> None:
    """Run a role's node until SIGINT/SIGTERM (or until the ``done`` event is set).

    Starts ``node.run``, serves ``node.collect_metrics`` on ``/metrics`` when the role's
    ``[metrics]`` section gives a port, and reports ``node`` through ``task_status``.
    """
    import trio

    from hypha.metrics import serve_metrics

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        if metrics.port is not None:
            await nursery.start(partial(serve_metrics, node.collect_metrics, host=metrics.host,
                                        port=metrics.port))
        task_status.started(node)
        if done is None:
            await until_stopped(log)
        else:
            async def stop_on_signal() -> None:
                await until_stopped(log)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            await done.wait()
        nursery.cancel_scope.cancel()
