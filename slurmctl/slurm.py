"""A job's Slurm worker jobs, found by name: how resume, cancel and a cancellation hook reach them.

Every worker job of one slurmctl job is submitted under the same name (``slurm_job_name``), so any process on a
submit host (the coordinator, a deployment's worker running the cancellation hook, ``slurmctl cancel`` after the
coordinator died) can list or cancel them with one ``squeue``/``scancel`` call, without the Dask cluster object.
"""

from __future__ import annotations

import shutil
import subprocess

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


def worker_jobs(job_id: str) -> list[str]:
    """Ids of the job's Slurm worker jobs still in the queue (any state), from one ``squeue`` call; [] without
    Slurm."""
    if not have_slurm():
        return []
    out = subprocess.run(["squeue", "-h", "--name", slurm_job_name(job_id), "-o", "%i"], capture_output=True,
                         text=True, timeout=60)
    return out.stdout.split() if out.returncode == 0 else []


def cancel_worker_jobs(job_id: str) -> list[str]:
    """``scancel`` every worker job of the job (one call, by name); return the ids that were queued before."""
    queued = worker_jobs(job_id)
    if queued:
        subprocess.run(["scancel", "--name", slurm_job_name(job_id)], capture_output=True, timeout=60)
    return queued
