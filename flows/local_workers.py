"""The embedded default's worker processes, forked from one warm template instead of each started from nothing.

A ``LocalCluster`` spawns each worker as a fresh interpreter, which then imports Dask, Prefect, pyarrow and the shard
task (~2.7 s of CPU each; two workers on a 2-core machine hold both cores for that long, while the coordinator waits).
A coordinator that runs a local cluster instead starts one multiprocessing *forkserver* as soon as it knows the job
(while its flow partitions the input), has it import those modules once, and Dask's nannies fork every worker of
every phase (process, each retry round) from it: a worker is up in a fraction of a second with everything imported.

Only the coordinator process (``slurmctl.cli.coordinator``) opts in, when the command that started it knows the job's
cluster is local (``--fork-workers``: ``allow``, ``prestart``, then ``warm``): a forkserver's children get the environment it was started with, and a
coordinator's is fixed for its life (the Prefect API URL included), whereas a long-lived process running flows (a
test session, a notebook) may change its environment between jobs. Slurm workers are started by ``sbatch`` and are
not concerned.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

# What a worker imports before its first shard: Dask's worker, Prefect and the shard task (the blocks, pyarrow).
PRELOAD = ("distributed", "prefect", "slurmctl.tasks.process_shard")

_allowed = False
_lock = threading.Lock()
_warming: threading.Thread | None = None
_early_url: str | None = None  # the Prefect API URL the template started early (``prestart``) was given


# Set to 0 to spawn every worker afresh (Dask's default), e.g. to compare the two.
ENV = "SLURMCTL_FORK_WORKERS"


def allow() -> None:
    """This process's environment is fixed for its life and its job's cluster is local: it may fork its workers from
    a template (unless ``SLURMCTL_FORK_WORKERS=0``)."""
    global _allowed
    _allowed = os.environ.get(ENV, "1") != "0"


def prestart() -> None:
    """Start the template as this process starts (``slurmctl submit`` and ``resume`` ask for it when the job's
    cluster is local), so that its imports run beside the coordinator's own instead of after them: its workers are
    then up in well under a second when the process phase asks. Needs the Prefect API the workers will report to:
    ``PREFECT_API_URL``, else the local server when one runs already (a first job, which starts the server, warms its
    template later, in ``warm``)."""
    if not _allowed:
        return
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from slurmctl import prefect_server

        info = prefect_server.running()
        if info is None:
            return
        url = info["api_url"]
    try:
        _prestart(url)
    except Exception as exc:  # an optimisation: the workers are forked from a template started later, or spawned
        print(f"note: the workers' template did not start early ({type(exc).__name__}: {exc})", file=sys.stderr)


def _prestart(url: str) -> None:
    global _early_url
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    env = {**_template_env(), "PREFECT_API_URL": url}  # the template's environment, and so every worker's
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        forkserver.ensure_running()  # spawns it (milliseconds); its imports run in it from now on
    finally:  # this process keeps its own: pyarrow reads OMP_NUM_THREADS when imported, for its thread pool
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _early_url = url


def _template_env() -> dict[str, str]:
    """What a nanny sets in its own environment before it spawns a worker (thread counts for numeric libraries, the
    malloc trim threshold, a fixed hash seed shared by the workers): a forked worker gets the template's instead,
    so the template must start with them."""
    import dask.config
    import distributed  # noqa: F401  (merges its config defaults into dask's)

    env = {k: str(v) for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()}
    env.setdefault("PYTHONHASHSEED", "6640")
    return env


def forks(cluster: Any) -> bool:
    """Does a coordinator running ``cluster`` (a job config's) fork its workers from a template?"""
    return getattr(cluster, "kind", None) == "local" and bool(getattr(cluster, "processes", True))


def warm() -> None:
    """Make this process's local clusters fork their workers from the template, starting it in the background if
    ``prestart`` did not, when this process allows it. Idempotent; returns at once."""
    global _warming
    if not _allowed:
        return
    with _lock:
        if _warming is None:
            _warming = threading.Thread(target=_start_template, name="slurmctl-worker-template", daemon=True)
            _warming.start()


def _start_template() -> None:
    import dask
    from distributed.utils import get_mp_context

    if _early_url is not None:  # started with the process: usable if the workers' API is still that one
        if os.environ.get("PREFECT_API_URL") == _early_url:
            dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
        return
    for key, value in _template_env().items():  # the nanny would put them in this process's environment anyway
        os.environ.setdefault(key, value)
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    ctx = get_mp_context()  # sets Dask's own preload list once; ours replaces it (fewer optional packages)
    ctx.set_forkserver_preload(list(PRELOAD))
    from multiprocessing import forkserver

    forkserver.ensure_running()  # starts it now (imports included), not when the first worker is asked for

