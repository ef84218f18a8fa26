"""``python -m hypha.gateway``: see :mod:`hypha.gateway.cli`."""

import sys

from hypha.gateway.cli import main

sys.exit(main())
