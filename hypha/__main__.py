"""``python -m hypha COMMAND ...``: the same as the ``hypha`` command (see :mod:`hypha.cli`);
``python -m hypha up`` starts a whole local network and trains over it."""

import sys

from hypha.cli import main

sys.exit(main())
