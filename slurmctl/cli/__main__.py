"""``python -m slurmctl.cli`` is the ``slurmctl`` command (used where the console script is not on PATH)."""

import sys

from slurmctl.cli.root import main

sys.exit(main())
