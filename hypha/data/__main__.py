"""``python -m hypha.data``: the data node's command line; see :mod:`hypha.data.cli`."""

from __future__ import annotations

import sys

from hypha.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
