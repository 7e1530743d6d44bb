"""The coordinator process: runs the job flow for one job. Started by ``slurmctl submit`` / ``resume``."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from typing import Any, Iterator

from slurmctl.handler import ensure_import_path

# How long the coordinator waits for Prefect to send the logs and events it still holds once the flow has ended.
# With the API up that takes well under a second; the bound only matters when the API is unreachable, where Prefect's
# client would otherwise retry each batch with exponential backoff for about 75 s before the process could exit.
FLUSH_TIMEOUT_S = 5.0
SERVER_STARTUP_TIMEOUT_S = 120


def flush_prefect(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    """Send the log records and events Prefect's background workers still hold, and stop those workers.

    Prefect batches run logs (``APILogWorker``, every ~2 s) and task-run state events (``EventsWorker``) in
    background services that are otherwise drained only at interpreter exit. A coordinator that stops its temporary
    API server first leaves them retrying a dead server (about 75 s of "Error logging to API"), and loses the task
    run states they carried. What is still unsent after ``timeout`` seconds (an unreachable API) is given up, so
    that the exit-time drain does not wait for it either. Returns False if something was given up.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    deadline = time.monotonic() + timeout
    # Draining forgets a service's task: keep them to cancel what does not finish (prefect is pinned; these are
    # _QueueServiceBase's attributes in 3.8).
    services: dict[int, Any] = {}
    for cls in (APILogWorker, EventsWorker):
        with cls._instance_cache_lock:
            services.update((id(s), s) for s in cls._instances.values())
    running = [(s._loop, s._task, s._done_event) for s in services.values() if s._task is not None]
    drained = True
    for service in (APILogWorker, EventsWorker):
        _, pending = service.drain_all(timeout=max(deadline - time.monotonic(), 0.1), at_exit=False)
        drained = drained and not pending
    if not drained:
        for loop, task, done in running:
            if loop is not None and done is not None and not done.is_set():
                loop.call_soon_threadsafe(task.cancel)
    return drained


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[None]:
    """Make sure Dask workers report to the same Prefect API as the flow, and that the flow's logs and events reach
    it before the coordinator exits.

    With no ``PREFECT_API_URL`` Prefect would start a private ephemeral server in *each* worker process, and their
    task runs would never reach the flow's database. So the coordinator starts the ephemeral server itself and
    exports its URL, which worker processes inherit; it flushes Prefect's log and event workers before it stops that
    server. On a real cluster set ``PREFECT_API_URL`` to a server the compute nodes can reach.
    """
    if os.environ.get("PREFECT_API_URL"):
        try:
            yield
        finally:
            _flush_or_warn()
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    server = SubprocessASGIServer()
    # Prefect's default (20 s) is too short for a fresh database's migrations on a busy machine.
    server.start(timeout=max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), SERVER_STARTUP_TIMEOUT_S))
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                _flush_or_warn()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _flush_or_warn() -> None:
    if not flush_prefect():
        print(f"note: Prefect's API did not take the last logs and events within {FLUSH_TIMEOUT_S:g} s; gave them up "
              "(the job's manifests are complete)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurmctl.cli.coordinator")
    parser.add_argument("job_id")
    parser.add_argument("--storage-json", required=True)
    parser.add_argument("--retry-errors", default="", help="comma-separated error classes for a retry round")
    args = parser.parse_args(argv)
    ensure_import_path()
    from slurmctl.flows.job import run_job

    try:
        with prefect_api_for_workers():
            run_job(args.job_id, json.loads(args.storage_json),
                    retry_errors=[c for c in args.retry_errors.split(",") if c] or None)
    except Exception as exc:  # the job manifest already records the failure; the log has the traceback
        print(f"job {args.job_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        # The job is over: exit now. The interpreter's shutdown would otherwise run full garbage collections over
        # the ~350k objects Prefect, Dask and pyarrow leave (2-3 s on a busy 2-core machine); frozen objects are
        # skipped by those collections and still released when the process ends. atexit hooks run as usual.
        gc.freeze()
    return 0


if __name__ == "__main__":  # guard required: Dask's process-based clusters spawn this module again
    sys.exit(main())
