"""``python -m hypha.certutil``: the same as ``hypha certutil``."""

from __future__ import annotations

import sys

from hypha.certutil._cli import main

if __name__ == "__main__":
    sys.exit(main())
