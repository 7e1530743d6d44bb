"""A busy machine on demand: processes that only compute, for as long as a block runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator


@contextlib.contextmanager
def busy_machine(per_core: int = 2) -> Iterator[None]:
    """``per_core`` busy loops per core of this machine while the block runs: every thread then waits its turn for a
    CPU, as on a loaded node (what CI's 2 cores are on a bad day)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(per_core * (os.cpu_count() or 1))]
    try:
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()
