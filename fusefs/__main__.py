"""``python -m fusefs``: the ``fusefs`` command."""

import sys

from fusefs.cli import main

sys.exit(main())
