"""Making a job go again: ``resume``, ``retry`` (a round over failed items of some error classes) and
``aggregate`` (the merge alone). Each unpauses the job if it was paused, raises its budget if asked, and starts a
coordinator unless one is still running; the caller decides whether to watch it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slurmctl.config import StorageConfig, parse_config
from slurmctl.control.errors import BudgetRefused, ControlFailed, JobRunning, NothingToDo
from slurmctl.control.launch import (
    coordinator_on_slurm,
    hand_to_spare,
    release,
    remember,
    spare_for,
    spawn_coordinator,
    start_on_slurm,
)
from slurmctl.control.liveness import coordinator_alive, take_over
from slurmctl.control.server import local_prefect_server, prefect_api
from slurmctl.control.slurm_coordinator import continued_on_slurm
from slurmctl.paths import coordinator_log


@dataclass
class Restarted:
    """What a restart did. ``follow``: there is a run to watch (``proc`` when its coordinator runs here, ``log``
    where it writes); False when there was nothing to start (a completed job)."""

    job_id: str
    storage: StorageConfig
    message: str
    follow: bool = True
    proc: Any = None  # a Popen, or a spare coordinator that took the job (slurmctl.control.spare.Adopted)
    log: Path | None = None
    server: dict[str, Any] | None = None  # the local Prefect server, when no PREFECT_API_URL names one
    previous_run: str | None = None  # the flow run the job had before: the new one is not it


def restart(job_id: str, storage: StorageConfig, *, retry_errors: list[str] | None = None,
            aggregate_only: bool = False, force: bool = False,
            raise_budget: list[str] | None = None) -> Restarted:
    """Make a job go again: unpause it, and start a coordinator unless one is still running.

    ``retry_errors``: a retry round over the failed items of these classes. ``aggregate_only``: run the merge alone.
    ``force``: run a completed job again (it re-aggregates). ``raise_budget``: ``KEY=VALUE`` new budget limits,
    written into the job manifest first (a job paused at its budget needs them). Raises ``JobNotFound``,
    ``JobRunning``, ``BudgetRefused``, ``NothingToDo`` (refused: nothing changed) or ``ControlFailed``.

    The coordinator starts at once, on standby (as in ``submit``): its imports overlap with the checks below, so a
    resumed job's first batch runs seconds sooner. It is released only when a new coordinator is wanted."""
    from slurmctl.books.store import load_job, reader_for
    from slurmctl.flows.local_workers import forks

    store = reader_for(storage)
    job = load_job(store, job_id)  # read once: a job that cannot be read starts no coordinator
    fork = forks(parse_config(job.config).cluster)
    fp = spare_for(fork)  # a spare coordinator, past its imports, takes the job if it goes again
    standby = None if fp else spawn_coordinator(job_id, storage, retry_errors, standby=True,
                                                aggregate_only=aggregate_only, fork_workers=fork)
    started: list[bool] = []
    try:
        return _restart(job, store, storage, retry_errors, aggregate_only, force, raise_budget or [], standby,
                        started, (fp, fork))
    finally:
        if not started and standby is not None:
            release(standby[0], False)


def error_classes(errors: str | list[str]) -> list[str]:
    """The error classes a retry round takes, from ``"network, throttle"`` or a list: stripped, each once, sorted."""
    return sorted({c.strip() for c in (errors.split(",") if isinstance(errors, str) else errors) if c.strip()})


def _restart(job: Any, store: Any, storage: StorageConfig, retry_errors: list[str] | None, aggregate_only: bool,
             force: bool, raise_budget: list[str], standby: tuple[subprocess.Popen, Path] | None,
             started: list[bool], spare: tuple[str | None, bool]) -> Restarted:
    from slurmctl.books.manifests import Keys
    from slurmctl.books.store import update_job
    from slurmctl.control.limits import unpause

    job_id = job.job_id
    if job.status == "completed":
        from slurmctl.books.gc import collected

        record = collected(store, job_id)
        if record:  # its batch parts are gone: the output it has is the one it keeps
            final = (f"job {job_id} is completed and `slurmctl gc` removed its batch parts ({record['at']}): its "
                     f"output is final ({job.output})")
            if aggregate_only:
                raise NothingToDo(f"{final}; it cannot be aggregated again")
            return Restarted(job_id, storage, final, follow=False)
    job = budget_raise(job, store, raise_budget)
    if (store.get_json(Keys(job_id).control) or {}).get("paused"):
        names = unpause(job, store)
        print(f"unpaused {job_id} ({', '.join(names)})", file=sys.stderr)
        if coordinator_alive(job) and not retry_errors:
            return Restarted(job_id, storage, "")  # its coordinator goes on
    if continued_on_slurm(job):
        return Restarted(job_id, storage, f"job {job_id} is being continued by its coordinator's Slurm job "
                                          f"{job.coordinator_slurm_job}")
    if coordinator_alive(job):
        from slurmctl.books.heartbeat import read_heartbeat

        beat = read_heartbeat(store, job_id) or {}
        raise JobRunning(f"job {job_id} is running (coordinator pid {beat.get('pid', job.coordinator_pid)} on "
                         f"{beat.get('host', job.coordinator_host)}, heartbeat {beat.get('at', job.updated_at)}); "
                         f"`slurmctl status {job_id}` follows it")
    if job.status == "completed" and not retry_errors and not force and not aggregate_only:
        return Restarted(job_id, storage, f"job {job_id} already completed; output {job.output}", follow=False)
    try:
        server = local_prefect_server()
    except Exception as exc:  # ServerError (it says why), or an OSError of $SLURMCTL_HOME
        raise ControlFailed(f"job {job_id} not resumed: the local Prefect server did not start: {exc}\n  fix that "
                            f"(or set PREFECT_API_URL to a running server) and run `slurmctl resume {job_id}` again"
                            ) from None
    if job.status == "running":
        with prefect_api(server):  # its flow run is in the local server's database
            take_over(job, storage)
    # Not terminal any more: a watcher must wait for the new coordinator rather than read the old outcome.
    update_job(store, job_id, status="pending", phase="submitted", error=None, finished_at=None)
    remember(job_id, storage)
    proc, log = standby or (None, coordinator_log(job_id))
    cfg = parse_config(job.config)
    if coordinator_on_slurm(cfg, None) and not retry_errors and not aggregate_only:
        # Its coordinator runs as a Slurm job: so does the one that continues it (the standby one is not needed).
        start_on_slurm(job_id, storage, cfg.cluster, store)
        return Restarted(job_id, storage, f"resuming {job_id} (coordinator log {log})", log=log)
    if standby is None:
        proc, log = hand_to_spare(spare[0], job_id, storage, retry_errors, aggregate_only, spare[1])
    else:
        release(proc, True)
    started.append(True)
    what = (f"retrying {','.join(retry_errors)} of" if retry_errors else "aggregating" if aggregate_only
            else "resuming")
    return Restarted(job_id, storage, f"{what} {job_id} (log {log})", proc=proc, log=log, server=server,
                     previous_run=job.flow_run_id)


def budget_raise(job: Any, store: Any, pairs: list[str]) -> Any:
    """Before a job goes again: a job paused at its budget needs raises (``BudgetRefused`` without), which are
    written into its manifest's config (the source of truth the next coordinator reads). Returns the job manifest
    as it now is."""
    from slurmctl.books.budget import BUDGET_LIMITS, parse_raises, raise_budget, who
    from slurmctl.books.store import update_job

    job_id = job.job_id
    if not pairs:
        if job.status == "paused":
            raise BudgetRefused(
                f"job {job_id} is paused: {job.error or 'at its budget'}\n  it stays paused until its budget is "
                f"raised: `slurmctl resume {job_id} --raise-budget KEY=VALUE` (KEY one of "
                f"{', '.join(BUDGET_LIMITS)}; VALUE none removes that limit)")
        return job
    try:
        changes = parse_raises(pairs)
    except ValueError as exc:
        raise BudgetRefused(str(exc)) from None
    if coordinator_alive(job, store):
        raise JobRunning(f"job {job_id} is running: its budget is raised while it is stopped (it pauses itself at a "
                         f"limit; `slurmctl cancel {job_id}` stops it sooner), so the running coordinator never "
                         f"overwrites it")
    try:
        config = raise_budget(job, changes, who())
    except ValueError as exc:
        raise BudgetRefused(f"{job_id}: {exc}") from None
    raised = update_job(store, job_id, config=config, budget_changes=job.budget_changes)
    old = job.config.get("budget") or {}
    print(f"{job_id}: budget " + ", ".join(f"{k} {'none' if old.get(k) is None else old[k]} -> "
                                          f"{'none' if v is None else v}" for k, v in changes.items()),
          file=sys.stderr)
    return raised
