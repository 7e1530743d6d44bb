"""``slurmctl``: submit a job, watch it, check its status, resume it.

Exit codes: 0 the job completed; 1 it failed (or its coordinator died); 2 bad config or arguments (nothing was
submitted); 130 you stopped watching with Ctrl-C (the job keeps running).

The job's coordinator (the Prefect flow) runs in its own process, so closing the terminal or Ctrl-C while watching
does not stop the job; ``--wait`` just follows its progress from the job manifest, exactly as ``status`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from slurmctl.cli import alerts, capacity, collect, launch, listing
from slurmctl.cli.common import _err, local_prefect_server, prefect_api, storage_args
from slurmctl.cli.launch import coordinator_on_slurm, release, remember, spawn_coordinator, start_on_slurm
from slurmctl.cli.progress_display import TerminalProgress, phase_lines, progress_line, speed_text
from slurmctl.config import (
    JOB_ID_PATTERN,
    ConfigError,
    JobConfig,
    StorageConfig,
    job_config,
    known_storage,
    parse_config,
)
from slurmctl.procs import pid_alive
from slurmctl.safe_keys import UnsafeKey, name_problem

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DETACHED = 0, 1, 2, 130


# --- finding a job's store ---------------------------------------------------------------------------------------
def storage_for_job(job_id: str, args: argparse.Namespace) -> StorageConfig:
    """--storage wins; then the pointer submit left on this machine; then $SLURMCTL_STORAGE; then ./.slurmctl."""
    if getattr(args, "storage", None):
        return StorageConfig(uri=args.storage, endpoint_url=args.endpoint_url, region=args.region)
    return known_storage(job_id)


# --- running and watching the coordinator ---------------------------------------------------------------------
# How long `--wait` waits, once the job has ended, for its coordinator process to exit (normally 1-2 s).
COORDINATOR_EXIT_WAIT_S = 30


def watch(job_id: str, storage: StorageConfig, proc: subprocess.Popen | None, log: Path | None,
          announce: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Follow a job from its manifest until it ends; return the exit code for its final status. ``announce`` sees
    each status view (it prints the flow run's UI link once the coordinator has created the run)."""
    from slurmctl.books.manifests import TERMINAL_STATUSES, status_view
    from slurmctl.books.store import load_job, reader_for

    store = reader_for(storage)
    tty = sys.stderr.isatty()
    display = None
    if tty:  # a live rich bar; the plain lines below otherwise (logs, CI, pipes)

        display = TerminalProgress(job_id)
    last_print, view = 0.0, None
    try:
        with display or contextlib.nullcontext():
            while True:
                job = load_job(store, job_id)
                view = status_view(job.model_dump(mode="json"))
                if announce is not None:
                    announce(view)
                if view["status"] in TERMINAL_STATUSES and not continued_on_slurm(job):
                    break
                if proc is not None and proc.poll() is not None:
                    job = load_job(store, job_id)  # it may have finished between our two reads
                    view = status_view(job.model_dump(mode="json"))
                    if view["status"] not in TERMINAL_STATUSES:
                        if display is None:
                            print(file=sys.stderr)
                        else:
                            display.update(view)
                        _err(f"the coordinator exited (code {proc.returncode}) before the job finished; "
                             f"see {log}; `slurmctl resume {job_id}` continues it")
                        return EXIT_FAILED
                    break
                if display is not None:
                    display.update(view)
                elif time.monotonic() - last_print >= 10:
                    print(progress_line(view), file=sys.stderr, flush=True)
                    last_print = time.monotonic()
                if proc is None:
                    time.sleep(1.0)
                else:  # the next look comes at once when the coordinator exits (a job that just ended)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=1.0)
            if display is not None:
                display.update(view)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _err(f"stopped watching; job {job_id} keeps running. `slurmctl status {job_id}` shows where it is")
        return EXIT_DETACHED
    if display is None:
        print(progress_line(view)[:160], file=sys.stderr)
    if proc is not None:
        try:  # it exits within seconds of the job's end; the bound is for a coordinator stuck after it
            proc.wait(timeout=COORDINATOR_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            _err(f"the coordinator (pid {proc.pid}) is still running {COORDINATOR_EXIT_WAIT_S} s after job "
                 f"{job_id} ended; not waiting for it (see {log})")
    # The command ends with this answer: spare the interpreter's shutdown its full garbage collections over the
    # ~150k objects the imports left (over 1 s on a busy 2-core machine). Everything is still freed at exit.
    gc.freeze()
    if view["status"] == "completed":
        superseded = view.get("duplicate_items") or 0
        print(f"job {job_id} completed: {view['items_succeeded']} items ok, {view['items_failed']} failed, "
              f"{view['items_rejected']} rejected"
              + (f" ({superseded} repeated id(s) superseded by their last occurrence)" if superseded else "")
              + f"; output {view['output']}", file=sys.stderr)
        return EXIT_OK
    _err(f"job {job_id} {view['status']}: {view['error']}" + (f" (log: {log})" if log else ""))
    return EXIT_FAILED


# --- the local Prefect server (embedded default) ----------------------------------------------------------------
def flow_run_link(server: dict[str, Any] | None, previous_run: str | None
                  ) -> Callable[[dict[str, Any]], None] | None:
    """For ``watch``: print ``Prefect UI: <flow run page>`` once, when the job manifest names a flow run other than
    ``previous_run`` (a resumed job's manifest still names the old one until the new coordinator starts)."""
    if not server:
        return None
    from slurmctl import prefect_server

    shown = False

    def announce(view: dict[str, Any]) -> None:
        nonlocal shown
        run = view.get("flow_run_id")
        if not shown and run and run != previous_run:
            shown = True
            link = prefect_server.flow_run_url(server, run)
            # on a terminal this lands above the live progress bar (rich redirects stderr while it shows)
            print(f"Prefect UI: {link}", file=sys.stderr, flush=True)

    return announce


# --- commands -----------------------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    import datetime as dt

    try:
        cfg = job_config(args.config, job_id=args.job_id, date=args.date or dt.date.today())
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    sample, problems = sample_for(args, cfg)
    if problems:
        _err(f"{args.config}: cannot submit\n" + "\n".join(f"  {f}: {m}" for f, m in problems))
        return EXIT_USAGE
    if args.deployment:
        return submit_to_deployment(args, cfg, sample)
    from slurmctl.books.manifests import Keys

    try:
        launched = launch.start(cfg, str(Path(args.config).resolve()), sample, getattr(args, "on", None))
    except launch.SubmitRefused as exc:
        _err(f"{args.config}: {exc}")
        return EXIT_USAGE
    except launch.SubmitFailed as exc:
        if str(exc):
            _err(str(exc))
        return EXIT_FAILED
    job, store, proc, log, server = (launched.job, launched.store, launched.proc, launched.log, launched.server)
    print(cfg.job_id)
    print(f"submitted {cfg.job_id} (store {store.uri(Keys(cfg.job_id).root)}, log {log})", file=sys.stderr)
    _budget_note(cfg, job)
    if not args.wait:
        if server:
            print(f"Prefect UI: {server['ui_url']}/runs", file=sys.stderr)
        print(f"follow it with `slurmctl status {cfg.job_id}`", file=sys.stderr)
        return EXIT_OK
    return watch(cfg.job_id, cfg.storage, proc, log, announce=flow_run_link(server, None))


def continued_on_slurm(job: Any) -> bool:
    """A job stopped by its coordinator's walltime whose next coordinator is queued: not over yet."""
    if job.status != "stopped" or not job.coordinator_slurm_job:
        return False
    from slurmctl.cli.slurm_coordinator import coordinator_jobs

    return bool(coordinator_jobs(job.job_id))


def coordinator_alive(job: Any, store: Any = None) -> bool:
    """Is the job's coordinator still running? Certain on this host (its pid); elsewhere, a fresh heartbeat.

    The heartbeat (``jobs/<id>/heartbeat.json``, written in every phase by the coordinator itself) gives its real
    host and pid — the job manifest's host is where the job was submitted — and its freshness.
    """
    import socket

    from slurmctl.books.heartbeat import read_heartbeat
    from slurmctl.books.manifests import TERMINAL_STATUSES, status_view
    from slurmctl.books.store import reader_for

    if job.status in TERMINAL_STATUSES:
        return False
    beat = read_heartbeat(store if store is not None else reader_for(job.config["storage"]), job.job_id)
    host, pid = (beat["host"], beat["pid"]) if beat else (job.coordinator_host, job.coordinator_pid)
    if host == socket.gethostname() and pid:
        if not pid_alive(pid):
            return False
        if _is_coordinator(pid, job.job_id):
            return True
        # Alive but not `slurmctl.cli.coordinator JOB`: a reused pid, or a run started another way (a deployment):
        # the heartbeat tells.
    return not status_view(job.model_dump(mode="json"), None, beat)["stale"]


def _is_coordinator(pid: int, job_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # cannot tell: assume it is
    # `slurmctl.coordinator` is the module's name before 0.2: a coordinator started by the previous release counts.
    return bool({b"slurmctl.cli.coordinator", b"slurmctl.coordinator"} & set(cmdline)) and job_id.encode() in cmdline


def _take_over(job: Any, storage: StorageConfig) -> None:
    """Before a new coordinator starts: cancel Slurm workers the dead one left, mark its flow run Crashed."""
    from slurmctl.slurm import cancel_worker_jobs

    if job.cluster.get("kind") == "slurm":
        cancel_worker_jobs(job.job_id)
    if job.flow_run_id:
        try:
            mark_flow_run_crashed(job.flow_run_id, "its coordinator died; continued by `slurmctl resume`")
        except Exception as exc:  # the Prefect API may be down: the manifests are what matter
            print(f"note: could not mark flow run {job.flow_run_id} crashed ({exc})", file=sys.stderr)


def mark_flow_run_crashed(flow_run_id: str, message: str) -> None:
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    async def mark() -> None:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(flow_run_id))
            if run.state and not run.state.is_final():
                await client.set_flow_run_state(UUID(flow_run_id), Crashed(message=message), force=True)

    asyncio.run(mark())


class LimitNotChanged(RuntimeError):
    """A rate limit's backend or its signal could not be written; the message says what state things are in."""


def _backend_errors() -> tuple[type[BaseException], ...]:
    """What a store or limiter backend raises when it cannot be reached (S3, DynamoDB, disk, SQLite); not bugs."""
    import sqlite3

    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError, OSError, sqlite3.Error


def set_paused(job: Any, paused: bool) -> list[str]:
    """Pause or unpause every rate limit of a job (workers stop taking tokens within ~1 s); return their names.

    Raises ``LimitNotChanged`` when a limit or its signal cannot be written. Repeating it is safe: a limit already
    in that state is left alone and its signal published again.
    """
    from slurmctl.books.limits import backend_for, limit_key, limit_spec
    from slurmctl.config import parse_config
    from slurmctl.ratelimit.lanes import SignalNotPublished

    cfg = parse_config(job.config)
    backend = backend_for(cfg)
    verb = "paused" if paused else "unpaused"
    done: list[str] = []
    for name in cfg.rate_limits:
        try:
            backend.set_paused(limit_key(cfg, name), limit_spec(cfg, name), paused)
        except SignalNotPublished as exc:
            raise LimitNotChanged(f"limit {name} is {verb}, but its signal is not: {exc}") from exc
        except _backend_errors() as exc:
            raise LimitNotChanged(
                f"limit {name} could not be {verb} ({cfg.rate_limiter.kind} limiter: {type(exc).__name__}: {exc}); "
                f"it is unchanged" + (f" (already {verb}: {', '.join(done)})" if done else "")) from exc
        done.append(name)
    return done


def _write_control(store: Any, job_id: str, paused: bool) -> str | None:
    """Record the operator's intent in ``control.json``; return an error message if it could not be written."""
    from slurmctl.books.manifests import Keys, now

    key = Keys(job_id).control
    try:
        store.put_json(key, {"schema_version": 1, "paused": paused, "at": now()})
    except _backend_errors() as exc:
        return f"writing {store.uri(key)} failed ({type(exc).__name__}: {exc})"
    return None


def restart(args: argparse.Namespace, retry_errors: list[str] | None = None) -> int:
    """Make a job go again: unpause it, and start a coordinator unless one is still running (resume, retry,
    aggregate).

    The coordinator starts at once, on standby (as in ``submit``): its imports overlap with the checks below, so a
    resumed job's first batch runs seconds sooner. It is released only when a new coordinator is wanted."""
    storage = storage_for_job(args.job_id, args)
    standby = spawn_coordinator(args.job_id, storage, retry_errors, standby=True,
                                aggregate_only=getattr(args, "aggregate_only", False),
                                fork_workers=_forks_workers(args.job_id, storage))
    started: list[bool] = []
    try:
        return _restart(args, storage, retry_errors, standby, started)
    finally:
        if not started:
            release(standby[0], False)


def _forks_workers(job_id: str, storage: StorageConfig) -> bool:
    """Whether the job's coordinator should start its workers' template at once (a local cluster); False when the
    job cannot be read (``_restart`` says why)."""
    from slurmctl.books.store import load_job, reader_for
    from slurmctl.config import parse_config
    from slurmctl.flows.local_workers import forks

    try:
        return forks(parse_config(load_job(reader_for(storage), job_id).config).cluster)
    except Exception:
        return False


def _restart(args: argparse.Namespace, storage: StorageConfig, retry_errors: list[str] | None,
             standby: tuple[subprocess.Popen, Path], started: list[bool]) -> int:
    from slurmctl.books.manifests import Keys
    from slurmctl.books.store import JobNotFound, load_job, reader_for, update_job

    try:
        job = load_job(reader_for(storage), args.job_id)
    except JobNotFound as exc:
        _err(f"{exc}; pass --storage URI if the job lives elsewhere")
        return EXIT_USAGE
    store = reader_for(storage)
    if job.status == "completed":
        from slurmctl.books.gc import collected

        record = collected(store, args.job_id)
        if record:  # its batch parts are gone: the output it has is the one it keeps
            aggregate = getattr(args, "aggregate_only", False)
            (_err if aggregate else print)(
                f"job {args.job_id} is completed and `slurmctl gc` removed its batch parts ({record['at']}): its "
                f"output is final ({job.output}){'; it cannot be aggregated again' if aggregate else ''}")
            return EXIT_USAGE if aggregate else EXIT_OK
    raised = budget_raise(args, job, store)
    if raised is not None:
        return raised
    job = load_job(store, args.job_id)
    if (store.get_json(Keys(args.job_id).control) or {}).get("paused"):
        # The limits first, the intent last: while any limit may still be paused, control.json says paused, so
        # running resume again unpauses again.
        try:
            names = set_paused(job, False)
        except LimitNotChanged as exc:
            _err(f"could not unpause {args.job_id}: {exc}\n  run `slurmctl resume {args.job_id}` again (it is "
                 f"safe to repeat)")
            return EXIT_FAILED
        failed = _write_control(store, args.job_id, False)
        if failed:
            _err(f"{args.job_id}: its rate limits are unpaused, but {failed}, so status still says paused; run "
                 f"`slurmctl resume {args.job_id}` again")
            return EXIT_FAILED
        print(f"unpaused {args.job_id} ({', '.join(names)})", file=sys.stderr)
        if coordinator_alive(job) and not retry_errors:
            return watch(args.job_id, storage, None, None) if args.wait else EXIT_OK
    if continued_on_slurm(job):
        print(f"job {args.job_id} is being continued by its coordinator's Slurm job {job.coordinator_slurm_job}",
              file=sys.stderr)
        return watch(args.job_id, storage, None, None) if args.wait else EXIT_OK
    if coordinator_alive(job):
        from slurmctl.books.heartbeat import read_heartbeat

        beat = read_heartbeat(store, args.job_id) or {}
        _err(f"job {args.job_id} is running (coordinator pid {beat.get('pid', job.coordinator_pid)} on "
             f"{beat.get('host', job.coordinator_host)}, heartbeat {beat.get('at', job.updated_at)}); "
             f"`slurmctl status {args.job_id}` follows it")
        return EXIT_USAGE
    aggregate_only = getattr(args, "aggregate_only", False)
    if job.status == "completed" and not retry_errors and not getattr(args, "force", False) and not aggregate_only:
        print(f"job {args.job_id} already completed; output {job.output}", file=sys.stderr)
        return EXIT_OK
    try:
        server = local_prefect_server()
    except Exception as exc:  # ServerError (it says why), or an OSError of $SLURMCTL_HOME
        _err(f"job {args.job_id} not resumed: the local Prefect server did not start: {exc}\n  fix that (or set "
             f"PREFECT_API_URL to a running server) and run `slurmctl resume {args.job_id}` again")
        return EXIT_FAILED
    if job.status == "running":
        with prefect_api(server):  # its flow run is in the local server's database
            _take_over(job, storage)
    # Not terminal any more: a watcher must wait for the new coordinator rather than read the old outcome.
    update_job(reader_for(storage), args.job_id, status="pending", phase="submitted", error=None, finished_at=None)
    remember(args.job_id, storage)
    proc, log = standby
    cfg = parse_config(job.config)
    if coordinator_on_slurm(cfg, None) and not retry_errors and not aggregate_only:
        # Its coordinator runs as a Slurm job: so does the one that continues it (the standby one is not needed).
        if start_on_slurm(args.job_id, storage, cfg.cluster, store) is None:
            return EXIT_FAILED
        print(f"resuming {args.job_id} (coordinator log {log})", file=sys.stderr)
        return watch(args.job_id, storage, None, log) if args.wait else EXIT_OK
    release(proc, True)
    started.append(True)
    what = (f"retrying {','.join(retry_errors)} of" if retry_errors else "aggregating" if aggregate_only
            else "resuming")
    print(f"{what} {args.job_id} (log {log})", file=sys.stderr)
    if not args.wait:
        if server:
            print(f"Prefect UI: {server['ui_url']}/runs", file=sys.stderr)
        return EXIT_OK
    return watch(args.job_id, storage, proc, log, announce=flow_run_link(server, job.flow_run_id))


def submit_to_deployment(args: argparse.Namespace, cfg: JobConfig, sample: Any = None) -> int:
    """``submit --deployment``: admit the job here (a refused config never reaches Prefect), then create a flow run
    of the deployment for it; the deployment's worker runs it."""
    from slurmctl.books.admission import JobRefused, create_job
    from slurmctl.books.store import JobExists

    name = args.deployment if "/" in args.deployment else f"slurmctl-job/{args.deployment}"
    try:
        job = create_job(cfg, str(Path(args.config).resolve()), sample)
    except JobExists as exc:
        _err(f"{args.config}: cannot submit\n  job_id: {exc}")
        return EXIT_USAGE
    except JobRefused as exc:
        _err(f"{args.config}: cannot submit\n" + "\n".join(f"  {f}: {m}" for f, m in exc.problems))
        return EXIT_USAGE
    remember(cfg.job_id, cfg.storage)
    server = None if os.environ.get("PREFECT_API_URL") else local_prefect_server()
    try:
        with prefect_api(server):
            from prefect.deployments import run_deployment

            run = run_deployment(name, parameters={"job_id": cfg.job_id, "storage": cfg.storage.model_dump()},
                                 timeout=0, flow_run_name=cfg.job_id)
    except Exception as exc:  # no such deployment, or the API is down: the job waits, nothing ran
        from slurmctl.books.manifests import now
        from slurmctl.books.store import reader_for, update_job

        update_job(reader_for(cfg.storage), cfg.job_id, status="failed", finished_at=now(),
                   error=f"no flow run of deployment {name}: {exc}"[:2000])
        _err(f"job {cfg.job_id} is submitted but not started: could not run deployment {name!r}: {exc}\n  check "
             f"`prefect deployment ls`, then `slurmctl resume {cfg.job_id}` (or run the deployment with job_id "
             f"{cfg.job_id})")
        return EXIT_FAILED
    print(cfg.job_id)
    print(f"submitted {cfg.job_id} as flow run {run.name} ({run.id}) of deployment {name}; its work pool's worker "
          f"runs it", file=sys.stderr)
    _budget_note(cfg, job)
    if not args.wait:
        print(f"follow it with `slurmctl status {cfg.job_id}`", file=sys.stderr)
        return EXIT_OK
    return watch(cfg.job_id, cfg.storage, None, None)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Ask the job's run to stop (``cancel.json``, and its flow run Cancelling when Prefect is reachable); with no
    live coordinator, finish the cancellation here. Then wait until the manifest says so and no Slurm job is left."""
    import getpass
    import socket

    from slurmctl.books.manifests import TERMINAL_STATUSES
    from slurmctl.books.store import load_job
    from slurmctl.flows.cancel import mark_cancelled, request_cancel
    from slurmctl.slurm import worker_jobs

    found = _job_or_exit(args)
    if found is None:
        return EXIT_USAGE
    job, store = found
    if continued_on_slurm(job):  # stopped at its coordinator's walltime, the next coordinator queued: not that
        from slurmctl.books.store import update_job
        from slurmctl.cli.slurm_coordinator import cancel_coordinator_jobs

        ids = cancel_coordinator_jobs(args.job_id)
        update_job(store, args.job_id, status="cancelled", error=(
            f"cancelled by slurmctl cancel (its next coordinator, Slurm job {', '.join(ids)}, was cancelled); "
            f"`slurmctl resume {args.job_id}` continues it")[:2000])
        print(f"cancelled {args.job_id} (its queued coordinator {', '.join(ids)} too)", file=sys.stderr)
        return EXIT_OK
    if job.status in TERMINAL_STATUSES:
        print(f"job {args.job_id} is not running (status {job.status}); nothing to cancel", file=sys.stderr)
        return EXIT_OK
    request_cancel(store, args.job_id, by=f"slurmctl cancel ({getpass.getuser()}@{socket.gethostname()})")
    note = _cancel_flow_run(job.flow_run_id)
    if not coordinator_alive(job, store):
        if job.coordinator_slurm_job:  # a coordinator job that has not started yet must not start
            from slurmctl.cli.slurm_coordinator import cancel_coordinator_jobs

            cancel_coordinator_jobs(args.job_id)
        ids = mark_cancelled(store, args.job_id, "cancelled by slurmctl cancel (no coordinator was running)",
                             job.cluster.get("kind"))
        print(f"cancelled {args.job_id} (its coordinator was not running; Slurm jobs cancelled: "
              f"{', '.join(ids) or 'none'}){note}", file=sys.stderr)
        return EXIT_OK
    print(f"cancelling {args.job_id}: the coordinator stops after the batches in flight{note}", file=sys.stderr)
    if args.no_wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    left: list[str] = []
    while time.monotonic() < deadline:
        job = load_job(store, args.job_id)
        left = worker_jobs(args.job_id) if job.cluster.get("kind") == "slurm" else []
        if job.status in TERMINAL_STATUSES and not left:
            break
        time.sleep(0.5)
    else:
        _err(f"{args.job_id} did not stop within {args.timeout:g} s (status {job.status}, Slurm jobs left: "
             f"{', '.join(left) or 'none'}); the request stands — `slurmctl status {args.job_id}` follows it")
        return EXIT_FAILED
    c = job.counts
    print(f"{args.job_id} {job.status}: {c.batches_done}/{c.batches_total} batches committed and kept, 0 Slurm jobs "
          f"left; `slurmctl resume {args.job_id}` continues it", file=sys.stderr)
    return EXIT_OK


def _cancel_flow_run(flow_run_id: str | None) -> str:
    """Move the job's flow run to Cancelling, as the Prefect UI's Cancel does (a deployment's worker then stops its
    process); a note for the user when Prefect cannot be reached (the manifests' request still works)."""
    if not flow_run_id:
        return ""
    from slurmctl import prefect_server

    server = None if os.environ.get("PREFECT_API_URL") else prefect_server.running()
    if server is None and not os.environ.get("PREFECT_API_URL"):
        return " (no Prefect server running: the flow run's state is left as it is)"
    try:
        with prefect_api(server):
            _set_cancelling(flow_run_id)
    except Exception as exc:
        return f" (the flow run's state in Prefect was not changed: {type(exc).__name__}: {exc})"
    return ""


def _set_cancelling(flow_run_id: str) -> None:
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    async def mark() -> None:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(flow_run_id))
            if run.state and not run.state.is_final():
                await client.set_flow_run_state(UUID(flow_run_id), Cancelling(message="slurmctl cancel"))

    asyncio.run(mark())


# --- the budget -------------------------------------------------------------------------------------------------
def sample_for(args: argparse.Namespace, cfg: JobConfig) -> tuple[Any, list[tuple[str, str]]]:
    """``submit --sample N``: run the handler on the input's first N items to measure calls and time per item for
    the budget's projection (``slurmctl.books.budget.measure_sample``). It calls the real API, so it runs only when
    asked, and says so first. Returns the sample (None without ``--sample``) and the problems found."""
    if not getattr(args, "sample", None):
        return None, []
    if args.sample < 1:
        return None, [("--sample", "must be at least 1 item")]
    if not cfg.budget.limits:
        print(f"note: --sample {args.sample} skipped: the config sets no budget limit (budget.max_api_calls, "
              f"max_core_hours or max_usd) to project against", file=sys.stderr)
        return None, []
    from slurmctl.books.budget import measure_sample
    from slurmctl.books.store import reader_for

    print(f"--sample {args.sample}: calling the handler {cfg.handler} on the first {args.sample} items of "
          f"{cfg.input.describe()} to measure the API calls and time per item. THIS CALLS THE REAL API; nothing is written",
          file=sys.stderr, flush=True)
    try:
        sample = measure_sample(cfg, reader_for(cfg.storage), args.sample)
    except Exception as exc:  # an unimportable handler, an unreadable input: the same words as admission's
        return None, [("--sample", f"{type(exc).__name__}: {exc}")]
    if not sample.items:
        return None, [("--sample", f"no good item among the first records of {cfg.input.describe()}")]
    errors = f", {sum(sample.errors.values())} failed ({dict(sample.errors)})" if sample.errors else ""
    print(f"sample: {sample.items} items, {sample.calls} handler calls ({sample.calls_per_item:.3g} per item), "
          f"{sample.seconds_per_item:.3g} s per item{errors}", file=sys.stderr)
    return sample, []


def _budget_note(cfg: JobConfig, job: Any) -> None:
    from slurmctl.books.budget import projection_note

    note = projection_note(cfg, job.budget_projection if job is not None else None)
    if note:
        print(note, file=sys.stderr)


def budget_raise(args: argparse.Namespace, job: Any, store: Any) -> int | None:
    """Before a job goes again: a job paused at its budget needs ``--raise-budget`` (exit 2 without), which is
    written into its manifest's config (the source of truth the next coordinator reads). Returns an exit code to
    stop with, or None to go on."""
    from slurmctl.books.budget import BUDGET_LIMITS, parse_raises, raise_budget, who
    from slurmctl.books.store import update_job

    pairs = getattr(args, "raise_budget", None) or []
    if not pairs:
        if job.status == "paused":
            _err(f"job {args.job_id} is paused: {job.error or 'at its budget'}\n  it stays paused until its budget is "
                 f"raised: `slurmctl resume {args.job_id} --raise-budget KEY=VALUE` (KEY one of "
                 f"{', '.join(BUDGET_LIMITS)}; VALUE none removes that limit)")
            return EXIT_USAGE
        return None
    try:
        changes = parse_raises(pairs)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if coordinator_alive(job, store):
        _err(f"job {args.job_id} is running: its budget is raised while it is stopped (it pauses itself at a limit; "
             f"`slurmctl cancel {args.job_id}` stops it sooner), so the running coordinator never overwrites it")
        return EXIT_USAGE
    try:
        config = raise_budget(job, changes, who())
    except ValueError as exc:
        _err(f"{args.job_id}: {exc}")
        return EXIT_USAGE
    update_job(store, args.job_id, config=config, budget_changes=job.budget_changes)
    old = job.config.get("budget") or {}
    print(f"{args.job_id}: budget " + ", ".join(f"{k} {'none' if old.get(k) is None else old[k]} -> "
                                                 f"{'none' if v is None else v}" for k, v in changes.items()),
          file=sys.stderr)
    return None


def cmd_iam_policy(args: argparse.Namespace) -> int:
    """Print the job's least-privilege IAM policy (``slurmctl.iam``)."""
    import datetime as dt

    from slurmctl.iam import policy_for

    try:
        cfg = job_config(args.config, date=args.date or dt.date.today())
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    policy = policy_for(cfg, account=args.account, region=args.region, create_table=args.create_table)
    print(json.dumps(policy, indent=2))
    if not policy["Statement"]:
        print("note: this job uses no AWS service (local store, local limiter, local input)", file=sys.stderr)
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    return restart(args)


def _job_or_exit(args: argparse.Namespace) -> tuple[Any, Any] | None:
    from slurmctl.books.store import JobNotFound, load_job, reader_for

    store = reader_for(storage_for_job(args.job_id, args))
    try:
        return load_job(store, args.job_id), store
    except JobNotFound as exc:
        _err(f"{exc}; pass --storage URI if the job lives elsewhere")
        return None


def cmd_pause(args: argparse.Namespace) -> int:
    found = _job_or_exit(args)
    if found is None:
        return EXIT_USAGE
    job, store = found
    if not job.config.get("rate_limits"):
        _err(f"job {args.job_id} declares no rate_limits: pause stops token issuance, so there is nothing to pause")
        return EXIT_USAGE
    # The intent first, the limits next: if a limit then fails, status says paused and `resume` unpauses it.
    failed = _write_control(store, args.job_id, True)
    if failed:
        _err(f"could not pause {args.job_id}: {failed}; nothing was changed. Run `slurmctl pause {args.job_id}` "
             f"again")
        return EXIT_FAILED
    try:
        names = set_paused(job, True)
    except LimitNotChanged as exc:
        _err(f"pause of {args.job_id} is incomplete: {exc}\n  run `slurmctl pause {args.job_id}` again (it is safe "
             f"to repeat), or `slurmctl resume {args.job_id}` to call it off")
        return EXIT_FAILED
    print(f"paused {args.job_id}: workers take no more tokens of {', '.join(names)} (in-flight requests finish; "
          f"batches wait). `slurmctl resume {args.job_id}` continues", file=sys.stderr)
    return EXIT_OK


def cmd_rate(args: argparse.Namespace) -> int:
    from slurmctl.books.limits import backend_for, limit_key, limit_spec
    from slurmctl.config import parse_config
    from slurmctl.ratelimit.lanes import SignalNotPublished

    found = _job_or_exit(args)
    if found is None:
        return EXIT_USAGE
    cfg = parse_config(found[0].config)
    if args.limit not in cfg.rate_limits:
        _err(f"--limit: job {args.job_id} has no rate limit {args.limit!r} "
             f"(it has: {', '.join(cfg.rate_limits) or 'none'})")
        return EXIT_USAGE
    try:
        state = backend_for(cfg).set_rate(limit_key(cfg, args.limit), limit_spec(cfg, args.limit), args.per_second)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except SignalNotPublished as exc:
        _err(f"limit {args.limit} of {args.job_id} is changed, but its signal is not: {exc}\n  run the same "
             f"`slurmctl rate` again (it is safe to repeat)")
        return EXIT_FAILED
    except _backend_errors() as exc:
        _err(f"could not change limit {args.limit} of {args.job_id} ({cfg.rate_limiter.kind} limiter: "
             f"{type(exc).__name__}: {exc}); it is unchanged. Run the same `slurmctl rate` again")
        return EXIT_FAILED
    print(f"{args.job_id}: limit {args.limit} now {state.target:g}/s (workers see the change at their next signal "
          f"check and switch after a grace of about 1.5 s)", file=sys.stderr)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    classes = sorted({c.strip() for c in args.errors.split(",") if c.strip()})
    if not classes:
        _err("--errors: give one or more error classes, e.g. --errors=network,throttle")
        return EXIT_USAGE
    return restart(args, classes)


def cmd_aggregate(args: argparse.Namespace) -> int:
    args.aggregate_only = True
    return restart(args)


def cmd_analyze_errors(args: argparse.Namespace) -> int:
    from slurmctl.books.failures import analyze, committed_tasks, failure_state

    found = _job_or_exit(args)
    if found is None:
        return EXIT_USAGE
    store = found[1]
    report = analyze(args.job_id, failure_state(store, committed_tasks(store, args.job_id)), top=args.top)
    if args.json:
        print(json.dumps(report, default=str))
        return EXIT_OK
    print(f"job {args.job_id}: {report['items_failed']} items failed, {report['items_deferred']} deferred")
    if not report["classes"]:
        return EXIT_OK
    print("\nby class:")
    for cls, n in report["classes"].items():
        print(f"  {cls:<12} {n}")
    print("\ntop messages:")
    for m in report["top_messages"]:
        print(f"  {m['count']:>6}  [{m['error_class']}] {m['message'][:100]}  e.g. ids {m['example_ids']}")
    print("\nhot batches: " + ", ".join(f"{b} ({n})" for b, n in report["batches"].items()))
    print("hot hosts:   " + ", ".join(f"{h} ({n})" for h, n in report["hosts"].items()))
    transient = [c for c in report["classes"] if c in ("network", "timeout", "throttle", "server")]
    if transient:
        print(f"\nretry them with: slurmctl retry {args.job_id} --errors={','.join(transient)} --wait")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from slurmctl.books.status import job_status

    found = _job_or_exit(args)
    if found is None:
        return EXIT_USAGE
    job, store = found
    view = job_status(store, job, scan=args.scan, batches=args.batches)
    if args.json:
        print(json.dumps(view))
        return EXIT_OK
    width = max(len(k) for k in view)
    for k, v in view.items():
        if v is not None and k not in ("items_per_s", "eta_s", "phases", "slowest_batches", "budget"):
            print(f"{k:<{width}}  {v}")
    if view.get("budget"):
        from slurmctl.books.budget import fmt

        print(f"{'budget':<{width}}  " + "; ".join(
            f"{key} {fmt(key, b['used'])}/{fmt(key, b['max'])} ({100 * b['share']:.0f} %)"
            for key, b in view["budget"].items()))
    print(f"{'speed':<{width}}  {speed_text(view)}")
    print("phases:\n" + "\n".join(phase_lines(view)))
    if view.get("slowest_batches"):
        print("slowest batches:     seconds  items  calls  p50 ms  p95 ms  waited s  cpu s  host (slurm job)")
        for b in view["slowest_batches"]:
            print(f"  {b['batch_id']:<16} {b['duration_s']:>8.1f} {b['items'] or 0:>6} {b['api_calls'] or 0:>6} "
                  f"{b['p50_ms'] or 0:>7.0f} {b['p95_ms'] or 0:>7.0f} {b['tokens_waited_s'] or 0:>9.1f} "
                  f"{b['cpu_s'] or 0:>6.1f}  {b['host']}" + (f" ({b['slurm_job_id']})" if b["slurm_job_id"] else ""))
    if view["stale"]:
        print(f"\nno heartbeat for a while: the coordinator may have died; `slurmctl resume {args.job_id}`")
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    from slurmctl import prefect_server

    if args.action == "start":
        if prefect_server.running() is None:
            print("starting the local Prefect server ...", file=sys.stderr, flush=True)
        try:
            info = prefect_server.start(port=args.port)
        except prefect_server.ServerError as exc:
            _err(str(exc))
            return EXIT_FAILED
        print(info["api_url"])
        print(f"Prefect server {'started' if info['started'] else 'already running'} (pid {info['pid']}): UI "
              f"{info['ui_url']}, API {info['api_url']}, log {info['log']}", file=sys.stderr)
        return EXIT_OK
    if args.action == "stop":
        stopped = prefect_server.stop()
        print(f"stopped the local Prefect server (pid {stopped['pid']}, {stopped['ui_url']})" if stopped
              else "no local Prefect server is running", file=sys.stderr)
        return EXIT_OK
    view = prefect_server.status()
    if args.json:
        print(json.dumps(view))
    else:
        width = max(len(k) for k in view)
        for k, v in view.items():
            if v is not None:
                print(f"{k:<{width}}  {v}")
    return EXIT_OK if view["healthy"] else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurmctl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="validate a job config and start the job")
    p.add_argument("config", help="path to the job's YAML config")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends; exit 0 if it completed")
    p.add_argument("--on", choices=["local", "slurm"], default=None,
                   help="where the coordinator runs: here, or as a Slurm job of its own that the next one continues "
                        "when its walltime comes (default: cluster.coordinator.on)")
    p.add_argument("--job-id", help="override the config's job_id")
    p.add_argument("--date", help="the date put in place of {date} in the config (YYYY-MM-DD; default today)")
    p.add_argument("--deployment", metavar="NAME",
                   help="start the job as a run of this Prefect deployment (e.g. slurmctl-job/example-echo; a name "
                        "alone means slurmctl-job/NAME): it runs on that deployment's workers, like a run started "
                        "from the UI")
    p.add_argument("--sample", type=int, metavar="N",
                   help="before admitting the job, run its handler on the input's first N items to measure API calls "
                        "and time per item for the budget's projection (THIS CALLS THE REAL API; nothing is written)")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser(
        "iam-policy", help="print the least-privilege IAM policy a job needs (S3 prefix, DynamoDB items)",
        description="The IAM policy document for one job's coordinator and workers: its objects in the store's "
                    "prefix, its S3 input, its rate-limit items in the DynamoDB table (by partition key), the KMS "
                    "key of an encrypted store.")
    p.add_argument("config", help="path to the job's YAML config")
    p.add_argument("--account", default="*", help="AWS account id of the DynamoDB table (default *)")
    p.add_argument("--region", help="region of the DynamoDB table (default: the config's, else *)")
    p.add_argument("--create-table", action="store_true",
                   help="also allow creating the DynamoDB table (admission creates a missing one)")
    p.add_argument("--date", help="the date for {date} in the config (default today)")
    p.set_defaults(func=cmd_iam_policy)
    p = sub.add_parser(
        "cancel", help="stop a running job: its Dask cluster and Slurm jobs; committed batches are kept",
        description="Cancel a job's current run, as cancelling its flow run in the Prefect UI does: the coordinator "
                    "stops between batches, the Dask cluster is closed, every Slurm job of the job is cancelled, and "
                    "the job manifest says cancelled. `slurmctl resume JOB` continues it later.")
    p.add_argument("job_id")
    p.add_argument("--no-wait", action="store_true", help="ask, and return without waiting for the job to stop")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for it to stop (default 120)")
    storage_args(p)
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("status", help="a job's status, from its manifests")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--scan", action="store_true", help="recount from the task manifests instead of the job's counters")
    p.add_argument("--batches", type=int, metavar="N", help="also the N slowest committed batches, from their "
                   "metrics (reads every task manifest)")
    storage_args(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("resume", help="make a paused, stopped or failed job go again; committed batches are not "
                                      "re-run",
                       description="Make a job go again: unpause its rate limits, or start a coordinator for a job "
                                   "that stopped (failed, cancelled, stopped by a signal, its coordinator dead, "
                                   "paused at its budget). Committed batches are not run again. Example: slurmctl "
                                   "resume geocode-2025-04-12 "
                                   "--raise-budget max_api_calls=200000 --wait")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--force", action="store_true", help="run even if the job completed (re-aggregates)")
    p.add_argument("--raise-budget", action="append", metavar="KEY=VALUE",
                   help="new budget limit (max_api_calls, max_core_hours, max_usd; none removes it), recorded in the "
                        "job manifest; repeatable. A job paused at its budget needs it")
    storage_args(p)
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("retry", help="a retry round over the items that failed with the given error classes")
    p.add_argument("job_id")
    p.add_argument("--errors", required=True, help="comma-separated classes, e.g. network,throttle,server")
    p.add_argument("--wait", action="store_true")
    storage_args(p)
    p.set_defaults(func=cmd_retry)
    p = sub.add_parser(
        "aggregate", help="merge the committed batch outputs into the job's dataset again (e.g. after a retry)",
        description="Run the aggregation alone: every planned batch must be committed (else it names the missing "
                    "ones; `slurmctl resume` runs them). Finished merges of an interrupted aggregation are kept.")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="follow it until it ends; exit 0 if the job completed")
    storage_args(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("pause", help="stop workers taking rate-limit tokens (in-flight requests finish)")
    p.add_argument("job_id")
    storage_args(p)
    p.set_defaults(func=cmd_pause)
    p = sub.add_parser("rate", help="change a rate limit while the job runs")
    p.add_argument("job_id")
    p.add_argument("--limit", required=True, help="the limit's name in the job config's rate_limits")
    p.add_argument("--per-second", type=float, required=True)
    storage_args(p)
    p.set_defaults(func=cmd_rate)
    p = sub.add_parser("analyze-errors", help="failed items by class, top messages, hot batches and hosts")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--top", type=int, default=10)
    storage_args(p)
    p.set_defaults(func=cmd_analyze_errors)
    p = sub.add_parser(
        "server", help="the local Prefect server (UI and API) jobs use when PREFECT_API_URL is not set",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The local Prefect server of the embedded default: started on first use by `submit`/`resume`, "
                    "kept running for the next job.\nData in $SLURMCTL_HOME/prefect, log in "
                    "$SLURMCTL_HOME/logs/prefect-server.log. An explicit PREFECT_API_URL wins over it.",
        epilog="examples:\n  slurmctl server start              # port 4200, or a free one if 4200 is taken\n"
               "  export PREFECT_API_URL=$(slurmctl server start --port 4300)\n"
               "  slurmctl server status --json       # exit 0 if it answers, 1 if not\n"
               "  slurmctl server stop")
    server_sub = p.add_subparsers(dest="action", required=True)
    for name, what in (("start", "start it unless it runs; print its API URL"),
                       ("stop", "stop it (its database stays for the next start; a job still running loses its "
                                "Prefect API)"),
                       ("status", "is it running and answering; its URLs, pid, log (exit 1 if it does not answer)")):
        full = what.replace(" it", " the local Prefect server", 1)
        s = server_sub.add_parser(name, help=what, description=full[0].upper() + full[1:] + ".")
        if name == "start":
            s.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 4200 if free, else any free port)")
        if name == "status":
            s.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_server)
    alerts.add_parser(sub)
    capacity.add_parser(sub)
    listing.add_parser(sub)
    collect.add_parser(sub)
    for name, command in sub.choices.items():
        if command.epilog is None:
            command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
            command.formatter_class = _ExamplesFormatter
    return parser


class _ExamplesFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that an ``examples:`` epilog keeps its lines (one command per line)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


# Each command's --help ends with these (commands that build their own epilog, e.g. `server`, keep it).
EXAMPLES: dict[str, list[str]] = {
    "submit": ["slurmctl submit examples/echo/config.yaml --wait",
               "slurmctl submit backfill.yaml --date 2025-04-12     # {date} in the config becomes 2025-04-12",
               "slurmctl submit job.yaml --deployment job           # as a run of slurmctl-job/job on its workers",
               "slurmctl submit job.yaml --sample 20                # measure calls/item on 20 real items (budget)"],
    "iam-policy": ["slurmctl iam-policy jobs/geocode.yaml --account 123456789012 > policy.json",
                   "slurmctl iam-policy backfill.yaml --date 2025-04-12 --create-table"],
    "cancel": ["slurmctl cancel backfill-2025-04-12", "slurmctl cancel backfill-2025-04-12 --no-wait"],
    "status": ["slurmctl status backfill-2025-04-12",
               "slurmctl status backfill-2025-04-12 --json | jq '{status, items_done, items_per_s, eta_s}'",
               "slurmctl status backfill-2025-04-12 --batches 10     # and its 10 slowest batches",
               "slurmctl status old-job --storage s3://team-bucket/runs --region eu-west-1"],
    "resume": ["slurmctl resume backfill-2025-04-12 --wait",
               "slurmctl resume backfill-2025-04-12 --force         # re-aggregate a completed job",
               "slurmctl resume backfill-2025-04-12 --raise-budget max_api_calls=250000,max_usd=400"],
    "retry": ["slurmctl retry backfill-2025-04-12 --errors network,throttle --wait"],
    "aggregate": ["slurmctl aggregate backfill-2025-04-12 --wait"],
    "pause": ["slurmctl pause backfill-2025-04-12                   # then: slurmctl resume backfill-2025-04-12"],
    "rate": ["slurmctl rate backfill-2025-04-12 --limit geo --per-second 5"],
    "analyze-errors": ["slurmctl analyze-errors backfill-2025-04-12",
                       "slurmctl analyze-errors backfill-2025-04-12 --json --top 3"],
}


def job_id_problem(job_id: str | None) -> str | None:
    """Why a job id given on the command line cannot be one (it names files and store keys), or None."""
    if job_id is None or re.fullmatch(JOB_ID_PATTERN, job_id):
        return None
    why = name_problem(job_id) or f"must match {JOB_ID_PATTERN} (lower-case letters, digits and '-')"
    return f"{job_id[:200]!r} is not a job id: it {why}; `slurmctl submit` prints the id of each job it starts"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad arguments
    bad_id = job_id_problem(getattr(args, "job_id", None))
    if bad_id:
        _err(bad_id)
        return EXIT_USAGE
    try:
        return args.func(args)
    except UnsafeKey as exc:  # a key that would leave the job's prefix: refused before any read or write
        _err(str(exc))
        return EXIT_USAGE
    except Exception as exc:
        # Imported here, not before the command: it brings in Prefect (~2 s), which `submit` loads while its
        # coordinator starts, and `server status` never needs.
        from slurmctl.books.store import JobTooNew

        if isinstance(exc, JobTooNew):  # a job another release wrote: say which to use, no traceback
            _err(str(exc))
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
