"""The coordinator process: runs the job flow for one job. Started by ``slurmctl submit`` / ``resume``."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
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
# A local server started on first use: a fresh database's migrations on a busy machine (see slurmctl.prefect_server).
SERVER_STARTUP_TIMEOUT_S = 120
# What every job's flow imports on its way, lazily (~830 modules, ~0.5 s on its critical path): the store blocks
# (prefect-aws), pandas (pyarrow imports it the first time it converts a Python list), FastAPI's encoders (Prefect
# serialises the flow's parameters with them) and graphviz (Prefect's flow call). The coordinator imports them before
# it has its job: a spare has them done, a coordinator started on standby does them beside `submit`'s checks.
JOB_IMPORTS = ("slurmctl.blocks.manifest_store", "pandas", "pyarrow.pandas_compat", "fastapi.encoders",
               "prefect.utilities.visualization")


def import_for_jobs() -> None:
    """Import ``JOB_IMPORTS`` (what a coordinator does before its job comes)."""
    import importlib

    for module in JOB_IMPORTS:
        importlib.import_module(module)
    gc.freeze()


def flush_prefect(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    """Send the log records and events Prefect's background workers still hold, and stop those workers.

    Prefect batches run logs (``APILogWorker``, every ~2 s) and task-run state events (``EventsWorker``) in
    background services that are otherwise drained only at interpreter exit, where an API that has gone away (a
    server stopped meanwhile) leaves them retrying (about 75 s of "Error logging to API") and loses the task run
    states they carried. What is still unsent after ``timeout`` seconds (an unreachable API) is given up, so
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
    task runs would never reach the flow's database. So the coordinator uses the local persistent server
    (``slurmctl.prefect_server``: started on first use, usually already running because ``slurmctl submit`` made
    sure of it) and exports its URL, which worker processes inherit. The server outlives the job, so the next job
    does not pay its start-up and the UI keeps this one's runs; Prefect's log and event workers are still flushed
    before the coordinator exits. An explicit ``PREFECT_API_URL`` wins; on a real cluster set it to a server the
    compute nodes can reach.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    updates = _engine_settings()
    if os.environ.get("PREFECT_API_URL"):
        with temporary_settings(updates=updates):
            try:
                yield
            finally:
                _flush_or_warn()
        return
    from slurmctl import prefect_server

    url = prefect_server.ensure(timeout=SERVER_STARTUP_TIMEOUT_S)
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={**updates, PREFECT_API_URL: url}):
            try:
                yield
            finally:
                _flush_or_warn()
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _engine_settings() -> dict[Any, Any]:
    """Prefect settings for the job flow in this process.

    Flow-run heartbeats off, unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set: Prefect's sync flow engine joins
    its heartbeat thread when a (sub)flow ends, and that thread sleeps in 1 s steps, so every subflow (partition,
    process, each retry round, aggregate) ended up to 1 s late — about 3 s of a one-record job. The heartbeat is
    an event Prefect emits every 180 s for automations that detect dead runs; a job's liveness is its own heartbeat
    (``heartbeat.json``), and ``slurmctl resume`` marks a dead coordinator's flow run Crashed.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    return {} if os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") else {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def _flush_or_warn() -> None:
    if not flush_prefect():
        print(f"note: Prefect's API did not take the last logs and events within {FLUSH_TIMEOUT_S:g} s; gave them up "
              "(the job's manifests are complete)", file=sys.stderr)


# The last line a coordinator writes to its log ($SLURMCTL_HOME/logs/<job_id>.log), with the time it exits in the
# manifests' format: how long it lived after the job's last state write (``updated_at``) reads off its own clock.
EXIT_LINE = "slurmctl coordinator exit: job {job_id} pid {pid} at {at}"


def _log_exit(job_id: str) -> None:
    at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    print(EXIT_LINE.format(job_id=job_id, pid=os.getpid(), at=at), flush=True)


def _take_job(args: argparse.Namespace, given_env: dict[str, str]) -> bool:
    """As a spare: wait for a job (``slurmctl.control.spare``), then become its coordinator: its arguments, its log
    as our stdout and stderr. False: none came while we were idle; exit."""
    from slurmctl.control import spare
    from slurmctl.flows import stop

    if stop.release_held():  # told to stop while it imported: it holds no job, it just goes
        return False
    request = spare.serve(spare.fingerprint(given_env, os.getcwd(), args.fork_workers))
    if request is None:
        return False
    stop.hold()  # a coordinator from here on: a signal stops the job once its flow has started
    args.job_id, args.storage_json = request["job_id"], request["storage_json"]
    args.retry_errors, args.aggregate_only = request["retry_errors"], request["aggregate_only"]
    sys.stdout.flush()
    sys.stderr.flush()
    with open(request["log"], "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    print(f"coordinator of job {args.job_id}: spare pid {os.getpid()}, imports done before the job came",
          flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    from slurmctl.flows import stop  # standard library only: a signal during the imports below is kept, not fatal

    stop.hold()
    given_env = dict(os.environ)  # as we were started: a spare for the next job gets the same (slurmctl.control.spare)
    parser = argparse.ArgumentParser(prog="python -m slurmctl.cli.coordinator")
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--storage-json")
    parser.add_argument("--retry-errors", default="", help="comma-separated error classes for a retry round")
    parser.add_argument("--aggregate-only", action="store_true", help="run the aggregation alone")
    parser.add_argument("--standby", action="store_true",
                        help="import everything, then run only once stdin says `go` (EOF: exit, nothing done)")
    parser.add_argument("--slurm-job", action="store_true",
                        help="this coordinator is a Slurm job (slurmctl.control.slurm_coordinator): it continues the job "
                             "where the last one left it, and queues the next one when its walltime comes")
    parser.add_argument("--fork-workers", action="store_true",
                        help="the job's cluster is local: start the template its workers fork from now "
                             "(slurmctl.flows.local_workers), beside this process's own imports")
    parser.add_argument("--spare", action="store_true",
                        help="no job yet: import everything, then wait for one (slurmctl.control.spare)")
    args = parser.parse_args(argv)
    if not args.spare and (not args.job_id or not args.storage_json):
        parser.error("a job id and --storage-json are required (or --spare)")
    if args.fork_workers:
        from slurmctl.flows import local_workers

        local_workers.allow()
        local_workers.prestart()
    # Registered before anything else (Prefect's and Dask's exit hooks, registered later, run before it): the exit
    # line comes after every exit-time drain of logs and events.
    atexit.register(lambda: args.job_id and _log_exit(args.job_id))
    ensure_import_path()
    from slurmctl.flows.job import run_job, start_cluster_early

    import_for_jobs()

    # `slurmctl submit` starts us before it has created the job, so that our imports (~2.5 s: Prefect, Dask,
    # pyarrow) overlap with its own checks; it says go once the job manifest exists, or closes stdin if the job
    # was refused (or it died).
    if args.standby and sys.stdin.readline().strip() != "go":
        return 0
    if args.spare and not _take_job(args, given_env):
        return 0

    if args.slurm_job:
        from slurmctl.control import slurm_coordinator

        code = slurm_coordinator.prepare(args.job_id, json.loads(args.storage_json))
        if code is not None:
            return code
        atexit.register(slurm_coordinator.after_run, args.job_id, json.loads(args.storage_json))
    stop.exit_on_second = True  # a second SIGTERM/SIGINT/SIGHUP ends this process at once (flows/stop.py)
    try:
        with prefect_api_for_workers(), stop.on_signals():  # ours before Prefect's (its handler passes them on)
            if args.fork_workers:  # the Prefect API URL is final now: a template not started early starts here
                local_workers.warm()
                if not args.aggregate_only:  # the job's cluster starts beside the flow's start-up
                    start_cluster_early(args.job_id, json.loads(args.storage_json))
            run_job(job_id=args.job_id, storage=json.loads(args.storage_json),
                    retry_errors=[c for c in args.retry_errors.split(",") if c] or None,
                    aggregate_only=args.aggregate_only)
    except Exception as exc:  # the job manifest already records the failure; the log has the traceback
        from prefect.exceptions import CancelledRun

        if isinstance(exc, CancelledRun):  # the manifest says cancelled or paused; resume continues it
            from slurmctl.flows.budget import paused_reason

            paused, request = paused_reason(args.job_id), stop.requested()
            if paused:
                print(f"job {args.job_id} paused: {paused}", file=sys.stderr)
            elif request:
                print(f"job {args.job_id} {request.reason}; `slurmctl resume {args.job_id}` continues it",
                      file=sys.stderr)
            else:
                print(f"job {args.job_id} cancelled: {exc}", file=sys.stderr)
            return 0
        print(f"job {args.job_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.disarm()
        if not args.slurm_job:  # the next job started from where we were started needs no imports
            from slurmctl.control import spare

            spare.start_spare(given_env, args.fork_workers)
        # The job is over: exit now. The interpreter's shutdown would otherwise run full garbage collections over
        # the ~350k objects Prefect, Dask and pyarrow leave (2-3 s on a busy 2-core machine); frozen objects are
        # skipped by those collections and still released when the process ends. atexit hooks run as usual.
        gc.freeze()
    return 0


if __name__ == "__main__":  # guard required: Dask's process-based clusters spawn this module again
    sys.exit(main())
