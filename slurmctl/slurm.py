"""A job's Slurm worker jobs, found by name: how resume, cancel and a cancellation hook reach them.

Every worker job of one slurmctl job is submitted under the same name (``slurm_job_name``), so any process on a
submit host (the coordinator, a deployment's worker running the cancellation hook, ``slurmctl cancel`` after the
coordinator died) can list or cancel them with one ``squeue``/``scancel`` call, without the Dask cluster object.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from slurmctl.secret_env import source_lines, split_env

# Environment a Slurm job of ours (a worker, a coordinator) needs to find the project, the Prefect API and AWS
# endpoints. sbatch exports the submitting environment by default, but sites often set --export=NONE, so we state what
# matters. The secret ones (``slurmctl.secret_env.is_secret``: AWS keys and session token, PREFECT_API_KEY) never go
# into a job script: it sources them from a 0600 file next to it.
FORWARDED_ENV = ("PYTHONPATH", "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_KEY", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                 "SLURMCTL_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")


def slurm_job_name(job_id: str) -> str:
    """The Slurm job name of every worker job of one slurmctl job."""
    return f"slurmctl-{job_id}"[:64]


def have_slurm() -> bool:
    return bool(shutil.which("squeue") and shutil.which("scancel"))


def duration_s(text: str) -> float | None:
    """Slurm's ``[D-]HH:MM:SS``, ``MM:SS`` or ``MM`` (``squeue %L``, ``--time``) in seconds; None for
    ``UNLIMITED``, ``NOT_SET``, ``INVALID`` or anything else it cannot read."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        return None
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if c is not None:
        h, mi, s = a, b, c
    elif b is not None:
        h, mi, s = (a, b, 0) if days is not None else (0, a, b)
    else:
        h, mi, s = (a, 0, 0) if days is not None else (0, a, 0)
    return float(((days or 0) * 24 + h) * 3600 + mi * 60 + s)


def squeue(*args: str, timeout: float = 30) -> str:
    """The output of one ``squeue -h ARGS`` call. Raises OSError or SubprocessError when squeue is missing, fails
    or times out (a busy slurmctld): callers decide what an unknown queue means for them."""
    done = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, "squeue", done.stdout, done.stderr)
    return done.stdout


def jobs_named(name: str, fields: str = "%i", running: bool = False) -> list[list[str]]:
    """One row (``fields`` split on blanks) per Slurm job of that name still in the queue (only the running ones
    with ``running``); [] without Slurm or when squeue fails."""
    if not have_slurm():
        return []
    try:
        out = squeue("--name", name, *(["-t", "RUNNING"] if running else []), "-o", fields, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split() for line in out.splitlines() if line.strip()]


def time_left_s(slurm_job_id: str) -> float | None:
    """Seconds before that Slurm job's time limit (squeue's ``%L``: right even after an admin changed the limit);
    None when unlimited, unknown or squeue fails."""
    try:
        out = squeue("-j", slurm_job_id, "-o", "%L", timeout=20).strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return duration_s(out) if out else None


DEFAULT_KILL_WAIT_S = 30.0  # Slurm's own default for KillWait


@functools.lru_cache(maxsize=1)
def kill_wait_s() -> float:
    """The site's ``KillWait``: seconds between Slurm's SIGTERM and its SIGKILL (walltime, scancel, preemption
    without a longer ``GraceTime``). Read once per process from ``scontrol show config``; Slurm's default (30 s)
    when scontrol cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_KILL_WAIT_S
    m = re.search(r"^KillWait\s*=\s*(\d+)", out, re.MULTILINE)
    return float(m.group(1)) if m else DEFAULT_KILL_WAIT_S


def env_lines(secrets_file: Path | None) -> list[str]:
    """A job script's lines that put one of our Slurm jobs where it was submitted from: the working directory, a
    PYTHONPATH starting with it, the non-secret ``FORWARDED_ENV`` inline, and (when some forwarded variable is
    secret) the line sourcing ``secrets_file``: a script holds its path, never a secret value."""
    cwd = os.getcwd()
    pythonpath = os.pathsep.join(dict.fromkeys([cwd, *filter(None, os.environ.get("PYTHONPATH", "").split(
        os.pathsep))]))
    lines = [f"cd {shlex.quote(cwd)}", f"export PYTHONPATH={shlex.quote(pythonpath)}"]
    inline, secret = split_env([k for k in FORWARDED_ENV if k != "PYTHONPATH"], os.environ)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in inline.items()]
    if secret and secrets_file is not None:
        lines += source_lines(secrets_file)
    return lines


def worker_jobs(job_id: str) -> list[str]:
    """Ids of the job's Slurm worker jobs still in the queue (any state), from one ``squeue`` call; [] without
    Slurm."""
    return [row[0] for row in jobs_named(slurm_job_name(job_id))]


def cancel_worker_jobs(job_id: str) -> list[str]:
    """``scancel`` every worker job of the job (one call, by name); return the ids that were queued before."""
    queued = worker_jobs(job_id)
    if queued:
        subprocess.run(["scancel", "--name", slurm_job_name(job_id)], capture_output=True, timeout=60)
    return queued
