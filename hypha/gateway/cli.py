"""The gateway's command line: ``init`` writes a commented config, ``run`` (the default) starts it.

python -m hypha.gateway init [--config hypha-gateway.toml] [--force]
python -m hypha.gateway [run] [--config PATH] [--tls-cert PATH ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hypha.config import (
    ConfigError,
    add_arguments,
    configure_logging,
    load,
    overrides_from_args,
    render,
    write_config,
)
from hypha.gateway.config import GatewayConfig

__all__ = ["DEFAULT_CONFIG", "main"]

PROG = "python -m hypha.gateway"
#: ``init`` writes here; ``run`` reads it when it exists and no --config is given.
DEFAULT_CONFIG = Path("hypha-gateway.toml")
_COMMANDS = ("init", "run")

log = logging.getLogger("hypha.gateway")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hypha.gateway``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*_COMMANDS, "-h", "--help"):
        args_list.insert(0, "run")  # no subcommand means run
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "init":
            return _init(args)
        return _run(args)
    except ConfigError as exc:
        print(f"hypha gateway: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hypha gateway: bootstrap address, Kademlia anchor and circuit relay for a "
        "Hypha network. Settings come from the config file, then HYPHA_<SECTION>_<KEY> "
        "environment variables, then flags (later wins).",
    )
    commands = parser.add_subparsers(dest="command", metavar="{init,run}")
    init = commands.add_parser(
        "init", help="write a commented config file", description="Write a commented config file."
    )
    init.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"where to write it (default: {DEFAULT_CONFIG})",
    )
    init.add_argument("--force", action="store_true", help="replace an existing file")
    run = commands.add_parser(
        "run", help="start the gateway (the default)", description="Start the gateway."
    )
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"TOML config file (default: {DEFAULT_CONFIG} when it exists, else none)",
    )
    add_arguments(run, GatewayConfig)
    return parser


def _init(args: argparse.Namespace) -> int:
    write_config(args.config, render(GatewayConfig), force=args.force)
    print(
        f"wrote {args.config}: fill in [tls] (cert, key, trust), then start the gateway with "
        f"`{PROG} run --config {args.config}`"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    config = load(GatewayConfig, path, overrides=overrides_from_args(args, GatewayConfig))
    configure_logging(config.log)
    log.info("configuration from %s", path if path is not None else "environment and flags only")
    import trio

    from hypha.gateway.node import run  # imported late: libp2p takes ~1 s to import

    try:
        result = trio.run(run, config)
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0
