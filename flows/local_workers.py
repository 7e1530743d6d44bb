"""The embedded default's worker processes, forked from one warm template instead of each started from nothing.

A ``LocalCluster`` spawns each worker as a fresh interpreter, which then imports Dask, Prefect, pyarrow and the shard
task (~2.7 s of CPU each; two workers on a 2-core machine hold both cores for that long, while the coordinator waits).
A coordinator that runs a local cluster instead starts one multiprocessing *forkserver* as soon as it knows the job
(while its flow partitions the input), has it import those modules once, and Dask's nannies fork every worker of
every phase (process, each retry round) from it: a worker is up in a fraction of a second with everything imported.

Only the coordinator process (``slurmctl.cli.coordinator``) opts in (``allow``): a forkserver's children get the
environment it was started with, and a coordinator's is fixed for its life (the Prefect API URL included, set before
the flow runs), whereas a long-lived process running flows (a test session, a notebook) may change its environment
between jobs. Slurm workers are started by ``sbatch`` and are not concerned.
"""

from __future__ import annotations

import os
import threading
from typing import Any

# What a worker imports before its first shard: Dask's worker, Prefect and the shard task (the blocks, pyarrow).
PRELOAD = ("distributed", "prefect", "slurmctl.tasks.process_shard")

_allowed = False
_lock = threading.Lock()
_warming: threading.Thread | None = None


# Set to 0 to spawn every worker afresh (Dask's default), e.g. to compare the two.
ENV = "SLURMCTL_FORK_WORKERS"


def allow() -> None:
    """This process's environment is fixed from now on: its local clusters may fork workers from a template (unless
    ``SLURMCTL_FORK_WORKERS=0``)."""
    global _allowed
    _allowed = os.environ.get(ENV, "1") != "0"


def warm(cluster: Any) -> None:
    """Start the template for ``cluster`` (a ``LocalClusterConfig``) in the background, if this process allows it and
    the cluster runs its workers as processes. Idempotent; returns at once."""
    global _warming
    if not _allowed or getattr(cluster, "kind", None) != "local" or not getattr(cluster, "processes", True):
        return
    with _lock:
        if _warming is None:
            _warming = threading.Thread(target=_start_template, name="slurmctl-worker-template", daemon=True)
            _warming.start()


def _start_template() -> None:
    import dask
    from distributed.utils import get_mp_context

    # What a nanny sets in its own environment before it spawns a worker (thread counts for numeric libraries, the
    # malloc trim threshold, a fixed hash seed shared by the workers): a forked worker gets the template's instead,
    # so the template must start with them. The nanny would put them in this process's environment anyway.
    env = {k: str(v) for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()}
    env.setdefault("PYTHONHASHSEED", "6640")
    for key, value in env.items():
        os.environ.setdefault(key, value)
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    ctx = get_mp_context()  # sets Dask's own preload list once; ours replaces it (fewer optional packages)
    ctx.set_forkserver_preload(list(PRELOAD))
    from multiprocessing import forkserver

    forkserver.ensure_running()  # starts it now (imports included), not when the first worker is asked for

