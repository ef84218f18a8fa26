"""``python -m hypha.worker``: the same as ``hypha worker``; see :mod:`hypha.worker.cli`."""

from __future__ import annotations

import sys

from hypha.worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
