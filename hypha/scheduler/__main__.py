"""``python -m hypha.scheduler``: the same as ``hypha scheduler``; see :mod:`hypha.scheduler.cli`."""

from __future__ import annotations

import sys

from hypha.scheduler.cli import main

if __name__ == "__main__":
    sys.exit(main())
