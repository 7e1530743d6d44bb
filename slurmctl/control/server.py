"""The Prefect API a job talks to: ``PREFECT_API_URL``, else the embedded default's local server (started on first
use and kept running for the next job)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator


def local_prefect_server() -> dict[str, Any] | None:
    """On the embedded default (no ``PREFECT_API_URL``), make sure the local Prefect server runs before a
    coordinator starts, so a job never waits for it unseen; return its record. None when ``PREFECT_API_URL`` names
    the server to use. The coordinator finds the same server itself (``prefect_server.ensure``)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    from slurmctl import prefect_server

    info = prefect_server.running()
    if info is None:
        print("starting the local Prefect server (takes 10-20 s) ...", file=sys.stderr, flush=True)
        info = prefect_server.start()
    return info


@contextlib.contextmanager
def prefect_api(server: dict[str, Any] | None) -> Iterator[None]:
    """Prefect clients in this process talk to ``server`` (the local one), else to ``PREFECT_API_URL`` as the
    environment says it now: Prefect reads its settings once, so a process that imported it before the variable was
    set (a notebook, a test) would otherwise start a temporary server of its own."""
    url = server["api_url"] if server else os.environ.get("PREFECT_API_URL")
    if not url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
