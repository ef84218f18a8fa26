"""The ``hypha`` command: ``hypha COMMAND [ARGS...]`` runs ``COMMAND``'s ``main(ARGS)``.

Each command is a module with ``main(argv: list[str] | None) -> int``, imported only when it runs
(so ``hypha certutil`` does not load what the training roles need). A new role is one line in
:data:`COMMANDS`: ``"gateway": ("hypha.gateway.__main__", "run a gateway")`` makes
``hypha gateway ...`` run ``hypha.gateway.__main__.main([...])``, the same as
``python -m hypha.gateway ...``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

__all__ = ["COMMANDS", "main"]

#: command name → (module with a main(argv) function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "certutil": ("hypha.certutil.__main__", "create CAs, node certificates and CRLs"),
    "gateway": ("hypha.gateway.__main__", "run a gateway: bootstrap address, DHT anchor, relay"),
    "worker": ("hypha.worker.__main__", "run a worker: offer resources, keep leases, run jobs"),
    "scheduler": ("hypha.scheduler.__main__", "run a scheduler: lease workers, dispatch a job"),
    "data": ("hypha.data.__main__", "run a data node: prepare datasets, serve slices to workers"),
    "up": ("hypha.up", "start a whole local network on 127.0.0.1 and train a GPT over it"),
}


class _Entry(Protocol):
    def __call__(self, argv: list[str] | None) -> int: ...


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hypha`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        from hypha import __version__

        print(f"hypha {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(_usage(), file=sys.stderr)
        print(
            f"hypha: error: unknown command {name!r} (choose from: {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = cast(_Entry, module.main)
    return int(entry(rest))


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {n:<{width}}  {help_}" for n, (_, help_) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: hypha COMMAND [ARGS...]",
            "",
            "commands:",
            *lines,
            "",
            "Run `hypha COMMAND --help` for a command's options.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
