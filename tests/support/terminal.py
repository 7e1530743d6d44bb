"""Run the real ``slurmctl`` with its stderr on a terminal (a pty), as a user at a shell sees it."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

from support.jobs import ROOT, TESTS


def run_cli_on_terminal(*args: str, timeout: float = 600, cwd: Path = ROOT) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal showed on stderr) of ``slurmctl ARGS`` with stderr on a pty."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "160", "TERM": "xterm",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    master, slave = pty.openpty()
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "slurmctl.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=slave, stdin=subprocess.DEVNULL, text=True, timeout=timeout)
    finally:
        os.close(slave)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, proc.stdout, b"".join(shown).decode(errors="replace")
