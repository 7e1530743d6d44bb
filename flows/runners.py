"""The Dask task runner for a job's cluster config: a LocalCluster (embedded default) or dask-jobqueue SLURMCluster.

Both go through prefect-dask's ``DaskTaskRunner`` so the process phase is the same code on a laptop and on a cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from prefect_dask import DaskTaskRunner

from slurmctl.config import LocalClusterConfig, SlurmClusterConfig
from slurmctl.paths import job_log_dir, job_secrets_file
from slurmctl.secret_env import split_env
from slurmctl.slurm import FORWARDED_ENV, duration_s, env_lines, slurm_job_name
from slurmctl.walltime import END_ENV

# Dask's statistical profiler samples every worker thread's stack every 10 ms, for the dashboard's Profile page (which
# our clusters do not serve). With a worker's calls in flight on its event loop it took 8 % of the worker's core, from
# the loop that must claim its rate-limit slots on time (py-spy, benchmarks/api_bound.py: the job's ceiling rose from
# 1,590 to 1,815 requests/s without it). Set this variable (True) to have it back.
PROFILER_ENV = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"


def worker_dask_config() -> dict[str, Any]:
    """The Dask config our workers run with, beside the user's (nothing when they set ``PROFILER_ENV`` themselves).
    Dotted: a nanny sets its config on its worker key by key, and a nested ``distributed`` would replace the whole
    section there (its worker failed to start: ``KeyError: 'admin'``)."""
    return {} if PROFILER_ENV in os.environ else {"distributed.worker.profile.enabled": False}


def slurm_prologue(cfg: SlurmClusterConfig, secrets_file: Path | None = None) -> list[str]:
    """The job script's first lines: where to run, the non-secret environment inline, and (when some forwarded
    variable is secret) the line sourcing ``secrets_file``: the script holds its path, never a secret value."""
    lines = env_lines(secrets_file)
    # When this job's walltime ends, should the worker not reach squeue (``slurmctl.walltime``).
    lines.append(f"export {END_ENV}=$(( $(date +%s) + {duration_s(cfg.walltime) or 0:.0f} ))")
    # The script's shell ignores SIGTERM (Slurm sends it to every process of the job): were it to die, Slurm would
    # end the job and kill the worker at once. The worker hears it itself and leaves between batches.
    lines.append("trap '' TERM")
    if PROFILER_ENV not in os.environ:  # the job script's side of ``worker_dask_config``
        lines.append(f"export {PROFILER_ENV}=False")
    return lines + list(cfg.job_script_prologue)


def task_runner_for(cluster: LocalClusterConfig | SlurmClusterConfig, job_id: str = "job",
                    threads_factor: int = 1) -> DaskTaskRunner:
    """``threads_factor``: Dask threads per configured thread (``slurmctl.item_run.shards_per_thread``: 2 when a
    job's items are in flight together). On Slurm the extra threads book no CPU: ``cores`` (Dask's threads) grows,
    ``job_cpu`` (the CPUs sbatch books) stays what the config says."""
    if isinstance(cluster, LocalClusterConfig):
        local = {"n_workers": cluster.n_workers, "threads_per_worker": cluster.threads_per_worker * threads_factor,
                 "processes": cluster.processes, "dashboard_address": None}
        config = worker_dask_config()
        if cluster.processes and config:  # a nanny hands its worker process this config
            local["config"] = config
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local)
    secrets = job_secrets_file(job_id).absolute()
    _, secret_names = split_env(FORWARDED_ENV, os.environ)
    kwargs = {
        "queue": cluster.queue, "account": cluster.account, "cores": cluster.cores, "processes": cluster.processes,
        "memory": cluster.memory, "walltime": cluster.walltime,
        "job_extra_directives": list(cluster.job_extra_directives),
        "job_script_prologue": slurm_prologue(cluster, secrets), "python": sys.executable,
        "scheduler_options": {"dashboard_address": None}, "job_name": slurm_job_name(job_id),
        # Workers orphaned by a dead coordinator exit by themselves instead of holding Slurm allocations.
        "death_timeout": 60,
        # No nanny: Slurm's SIGTERM would reach it too, and it kills the worker's batch at once. The worker itself
        # hears SIGTERM between batches (flows/worker_plugin.py); a worker that dies is replaced by Slurm's adaptive
        # scaling, not restarted in place.
        "nanny": False,
        "secrets_file": str(secrets), "secret_names": secret_names,
    }
    if cluster.local_directory:
        kwargs["local_directory"] = cluster.local_directory
    # sbatch writes each worker job's output to its submit directory unless told otherwise; keep them with the job's
    # other logs (the directory must be on a filesystem the compute nodes share).
    kwargs["log_directory"] = cluster.log_directory or str(job_log_dir(job_id).absolute())
    if threads_factor > 1:
        kwargs["cores"], kwargs["job_cpu"] = cluster.cores * threads_factor, cluster.cores
    kwargs = {k: v for k, v in kwargs.items() if v is not None} | cluster.options
    from slurmctl.flows.slurm_cluster import SecretEnvSLURMCluster  # not at import: see that module

    return DaskTaskRunner(cluster_class=SecretEnvSLURMCluster, cluster_kwargs=kwargs,
                          adapt_kwargs={"minimum_jobs": cluster.min_jobs, "maximum_jobs": cluster.max_jobs})


def __getattr__(name: str) -> Any:
    if name == "SecretEnvSLURMCluster":  # its home is slurmctl.flows.slurm_cluster, imported when first used
        from slurmctl.flows.slurm_cluster import SecretEnvSLURMCluster

        return SecretEnvSLURMCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
