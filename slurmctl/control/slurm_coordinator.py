"""The coordinator as a Slurm job: ``slurmctl submit --on slurm`` (or ``cluster.coordinator.on: slurm``).

Many sites kill long processes on login nodes, so the coordinator can run as a small Slurm job of its own. Its script
(``$SLURMCTL_HOME/coordinators/<job>.sbatch``, written at submit) asks for ``--signal=B:TERM@<signal_before_s>``
and ``--requeue``, and ``exec``s ``python -m slurmctl.cli.coordinator JOB --slurm-job``, so the coordinator itself
is the batch shell that receives Slurm's signals:

* ``signal_before_s`` before its walltime, Slurm sends it SIGTERM: it stops as any coordinator does on a signal
  (``flows/stop.py``: the batches running commit, the cluster closes, the job says ``stopped``) and, since its time
  is nearly up, queues the same script again (``sbatch --dependency=afterany:<itself>``): the next coordinator
  continues the job from its commits, without anyone typing ``resume``.
* Requeued by Slurm (preemption, a node failure): the script starts again and continues the job the same way.
* ``scancel`` of the coordinator job (time left): it stops, and stays ``stopped`` until ``slurmctl resume``.

Each start in a Slurm job (``prepare``) checks the books first: a job already ended is left alone, a live
coordinator elsewhere is not doubled, one killed hard is taken over (its worker jobs cancelled, its flow run marked
Crashed), and after ``max_restarts`` continuations the job fails with the reason instead of looping.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from slurmctl.paths import coordinator_log, home
from slurmctl.secret_env import remove_env_file, split_env, write_env_file
from slurmctl.slurm import FORWARDED_ENV, env_lines, jobs_named, time_left_s

# A coordinator stopped by SIGTERM with at most this much more than ``signal_before_s`` left was stopped for its
# walltime (Slurm may send the signal up to a minute early): it queues its successor.
EARLY_SIGNAL_S = 90


def coordinator_job_name(job_id: str) -> str:
    """The Slurm job name of a job's coordinator: never a worker job's name (``slurmctl-<job_id>``; job ids hold no
    underscore), so cancelling the workers by name never reaches it."""
    return f"slurmctl-coordinator_{job_id}"


def script_path(job_id: str) -> Path:
    return home() / "coordinators" / f"{job_id}.sbatch"


def secrets_path(job_id: str) -> Path:
    return home() / "secrets" / f"{job_id}.coordinator.env"


def coordinator_script(job_id: str, storage_json: str, coordinator: Any, queue: str | None,
                       account: str | None) -> str:
    """The sbatch script of a job's coordinator (every continuation runs the same one)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={coordinator_job_name(job_id)}",
             f"#SBATCH --time={coordinator.walltime}", f"#SBATCH --signal=B:TERM@{coordinator.signal_before_s}",
             "#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={coordinator_log(job_id)}",
             f"#SBATCH --cpus-per-task={coordinator.cores}", f"#SBATCH --mem={_mem(coordinator.memory)}"]
    if coordinator.queue or queue:
        lines.append(f"#SBATCH --partition={coordinator.queue or queue}")
    if coordinator.account or account:
        lines.append(f"#SBATCH --account={coordinator.account or account}")
    _, secret = split_env(FORWARDED_ENV, os.environ)
    if secret:
        write_env_file(secrets_path(job_id), {k: os.environ[k] for k in secret})
    lines += env_lines(secrets_path(job_id) if secret else None)
    lines.append(f"exec {shlex.quote(sys.executable)} -m slurmctl.cli.coordinator {job_id} --slurm-job "
                 f"--storage-json {shlex.quote(storage_json)}")
    return "\n".join(lines) + "\n"


def _mem(memory: str) -> str:
    """``4GB`` -> ``4G``: sbatch's units, rounded up the way dask-jobqueue writes a worker job's ``--mem``."""
    from dask.utils import parse_bytes
    from dask_jobqueue.slurm import slurm_format_bytes_ceil

    return slurm_format_bytes_ceil(parse_bytes(memory))


def submit(job_id: str, storage_json: str, cluster: Any, after: str | None = None) -> str:
    """sbatch the job's coordinator (the script is written on first use and reused); returns its Slurm job id.
    ``after``: start once that Slurm job has ended (a coordinator queueing its successor)."""
    path = script_path(job_id)
    if after is None or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        coordinator_log(job_id).parent.mkdir(parents=True, exist_ok=True)
        path.write_text(coordinator_script(job_id, storage_json, cluster.coordinator, cluster.queue,
                                           cluster.account))
    cmd = ["sbatch", "--parsable", *([f"--dependency=afterany:{after}"] if after else []), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch of the coordinator failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def coordinator_jobs(job_id: str) -> list[str]:
    """Ids of the job's coordinator Slurm jobs in the queue (pending, running, requeued)."""
    return [row[0] for row in jobs_named(coordinator_job_name(job_id))]


def continued_on_slurm(job: Any) -> bool:
    """A job stopped by its coordinator's walltime whose next coordinator is queued: not over yet."""
    if job.status != "stopped" or not job.coordinator_slurm_job:
        return False
    return bool(coordinator_jobs(job.job_id))


def cancel_coordinator_jobs(job_id: str, but: str | None = None) -> list[str]:
    ids = [i for i in coordinator_jobs(job_id) if i != but]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
    return ids


def prepare(job_id: str, storage: dict[str, Any]) -> int | None:
    """Before a coordinator in a Slurm job runs the job flow: None to go on, or the exit code to end with."""
    from slurmctl.books.heartbeat import read_heartbeat
    from slurmctl.books.store import load_job, store_for, update_job
    from slurmctl.config import StorageConfig, parse_config
    from slurmctl.control.liveness import coordinator_alive, take_over

    store = store_for(storage)
    job = load_job(store, job_id)
    me = os.environ.get("SLURM_JOB_ID", "?")
    if job.status in ("completed", "failed", "cancelled", "paused"):
        print(f"job {job_id} is {job.status}: nothing for this coordinator (Slurm job {me}) to do", file=sys.stderr)
        return 0
    beat = read_heartbeat(store, job_id) or {}
    # A requeue of this very Slurm job: its earlier run is dead, whatever its heartbeat's age says.
    if job.status == "running" and beat.get("slurm_job_id") != me and coordinator_alive(job, store):
        print(f"job {job_id} has a live coordinator (pid {beat.get('pid')} on {beat.get('host')}): this one (Slurm "
              f"job {me}) leaves it alone", file=sys.stderr)
        return 0
    coordinator = parse_config(job.config).cluster.coordinator
    again = job.status in ("stopped", "running")  # a continuation: after a stop, a requeue or a hard kill
    if again:
        if job.coordinator_restarts >= coordinator.max_restarts:
            update_job(store, job_id, status="failed", error=(
                f"its coordinator was continued {job.coordinator_restarts} times (cluster.coordinator.max_restarts)"
                f"; `slurmctl resume {job_id}` continues it")[:2000])
            print(f"job {job_id}: max_restarts ({coordinator.max_restarts}) reached; not continuing",
                  file=sys.stderr)
            return 1
        if job.status == "running":  # its coordinator was killed without a word (SIGKILL, node lost)
            take_over(job, StorageConfig.model_validate(storage))
    update_job(store, job_id, status="pending", phase="submitted", error=None, finished_at=None,
               coordinator_restarts=job.coordinator_restarts + (1 if again else 0), coordinator_slurm_job=me)
    print(f"coordinator of {job_id} in Slurm job {me}" + (" (continuing it)" if again else ""), file=sys.stderr)
    return None


def continue_after_stop(job_id: str, storage: dict[str, Any], signal_before_s: float) -> str | None:
    """After the job flow stopped on a signal in a Slurm job: if the walltime is what is coming (little time left),
    queue the next coordinator and say so in the job manifest; return its Slurm job id (None: not continued)."""
    from slurmctl.books.store import load_job, store_for, update_job
    from slurmctl.config import parse_config

    me = os.environ.get("SLURM_JOB_ID")
    store = store_for(storage)
    job = load_job(store, job_id)
    if me is None or job.status != "stopped":
        return None
    left = time_left_s(me)
    if left is None or left > signal_before_s + EARLY_SIGNAL_S:
        return None  # scancel, or a preemption Slurm requeues us for: not our walltime
    successor = submit(job_id, json.dumps(storage), parse_config(job.config).cluster, after=me)
    update_job(store, job_id, error=f"its coordinator stopped before its walltime; Slurm job {successor} continues "
                                    f"it (`slurmctl status {job_id}` follows it)")
    return successor


def job_over(job_id: str) -> None:
    """The job ended for good: the coordinator's secrets file goes."""
    remove_env_file(secrets_path(job_id))


def after_run(job_id: str, storage: dict[str, Any]) -> None:
    """At the exit of a coordinator in a Slurm job: after a stop near its walltime, queue the next one; once the job
    has ended for good, remove the coordinator's secrets file. Never raises (the process is exiting)."""
    try:
        from slurmctl.books.store import load_job, store_for
        from slurmctl.config import parse_config

        job = load_job(store_for(storage), job_id)
        if job.status == "stopped":
            before = parse_config(job.config).cluster.coordinator.signal_before_s
            successor = continue_after_stop(job_id, storage, before)
            if successor:
                print(f"job {job_id}: this coordinator's walltime is near; Slurm job {successor} continues the job",
                      file=sys.stderr)
        elif job.status in ("completed", "failed", "cancelled"):
            job_over(job_id)
    except Exception as exc:  # the books are consistent; `slurmctl resume` continues a job left stopped
        print(f"coordinator of {job_id}: could not queue the next coordinator: {type(exc).__name__}: {exc}; "
              f"`slurmctl resume {job_id}` continues the job", file=sys.stderr)
