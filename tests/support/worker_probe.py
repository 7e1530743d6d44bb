"""Run in a worker process (by reference, so it must be importable there): what that process holds."""

from __future__ import annotations

import gc
import sys


def state() -> dict[str, object]:
    """How many objects are frozen out of the garbage collector, and whether pandas is imported already."""
    return {"frozen": gc.get_freeze_count(), "pandas": "pandas" in sys.modules}
