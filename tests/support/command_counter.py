"""Count how often a command runs: a shim of the same name, first on PATH, logs each call and runs the real one.

For tests that promise a number of calls (``slurmctl capacity`` runs one ``sinfo`` and one ``squeue``, whatever the
queue holds), against the real commands.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


class CommandCounter:
    """``calls("sinfo")``: how many times ``sinfo`` ran since the shims were put on PATH."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def calls(self, name: str) -> int:
        log = self.directory / f"{name}.calls"
        return len(log.read_text().splitlines()) if log.exists() else 0


def count_commands(monkeypatch: pytest.MonkeyPatch, directory: Path, *names: str) -> CommandCounter:
    """Put a counting shim for each command in ``names`` first on PATH (of this process and its children)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        real = shutil.which(name)
        assert real, f"{name} is not on PATH"
        shim = directory / name
        shim.write_text(f'#!/bin/sh\necho "$*" >> "{directory / (name + ".calls")}"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")
    return CommandCounter(directory)
