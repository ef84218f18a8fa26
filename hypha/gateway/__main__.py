"""``python -m hypha.gateway``: the same as ``hypha gateway``; see :mod:`hypha.gateway.cli`."""

from __future__ import annotations

import sys

from hypha.gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
