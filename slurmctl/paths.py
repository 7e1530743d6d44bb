"""Where slurmctl keeps files on this machine: ``$SLURMCTL_HOME`` (default ``~/.slurmctl``).

It holds local pointers (job -> store) and logs, never job state (that lives in the manifests). The CLI, the
coordinator and the task runner all find the same directories through these functions.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Local pointers (job -> store) and logs; never job state (that is in the manifests)."""
    return Path(os.environ.get("SLURMCTL_HOME", Path.home() / ".slurmctl"))


def coordinator_log(job_id: str) -> Path:
    """The coordinator's log of one job (stdout and stderr of the flow's process)."""
    return home() / "logs" / f"{job_id}.log"


def job_log_dir(job_id: str) -> Path:
    """The job's log directory next to its coordinator log: Slurm worker job logs go here by default."""
    return home() / "logs" / job_id


def job_secrets_file(job_id: str) -> Path:
    """The job's secret environment for its Slurm workers (0600; ``slurmctl.secret_env``): there only while its
    cluster runs."""
    return home() / "secrets" / f"{job_id}.env"
