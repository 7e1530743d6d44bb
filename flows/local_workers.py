"""The embedded default's worker processes, forked from one warm template instead of each started from nothing.

A ``LocalCluster`` spawns each worker as a fresh interpreter, which then imports Dask, Prefect, pyarrow and the shard
task (~2.7 s of CPU each; two workers on a 2-core machine hold both cores for that long, while the coordinator waits).
A coordinator that runs a local cluster instead starts one multiprocessing *forkserver* as soon as it knows the job
(while its flow partitions the input), has it import those modules once, and Dask's nannies fork every worker of
every phase (process, each retry round) from it: a worker is up in a fraction of a second with everything imported.

The coordinator also starts the job's ``LocalCluster`` itself, as soon as its flow is about to run
(``start_cluster``), instead of letting the process phase's task runner start it after the flow's start-up and the
partition; the process phase and the retry rounds then connect to it (``reuse``), and it is closed once the last of
them is over (``close_cluster``). A one-record job takes ~0.5 s less of its ~4.7 s that way.

Only the coordinator process (``slurmctl.cli.coordinator``) opts in, when the command that started it knows the job's
cluster is local (``--fork-workers``: ``allow``, ``prestart``, then ``warm``): a forkserver's children get the
environment it was started with, and a coordinator's is fixed for its life (the Prefect API URL included), whereas
a long-lived process running flows (a test session, a notebook) may change its environment between jobs. Slurm
workers are started by ``sbatch`` and are not concerned.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from slurmctl.procs import pid_alive

# What a worker imports before its first shard: Dask's worker, Prefect, the shard task (pyarrow) and the store
# blocks its arguments carry (prefect-aws: ~0.3 s of block schema registration when the first shard is unpickled),
# and pandas: pyarrow imports it the first time it converts a Python list (``pa.array``), ~0.25 s into the first
# batch. The aggregation's merges run in processes forked from the template too (``slurmctl.procpool``). Last,
# ``frozen_imports`` leaves all that out of the workers' garbage collections.
PRELOAD = ("distributed", "prefect", "slurmctl.tasks.process_shard", "slurmctl.blocks.manifest_store", "pandas",
           "slurmctl.tasks.merge", "slurmctl.flows.frozen_imports")

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


def forking(cluster: Any) -> bool:
    """Does this process fork ``cluster``'s workers (a job config's) from the template (a coordinator of a job on
    the embedded default)? Then the aggregation's merges run in processes forked from it too (``slurmctl.procpool``)."""
    return _allowed and forks(cluster)


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


class EarlyCluster:
    """The job's ``LocalCluster``, started in a thread of its own by the coordinator (``start_cluster``), with the
    settings its task runner would have given it (``cluster_kwargs``) and the scheduler's (worker ttl, allowed
    failures) passed explicitly: Dask's config is process-wide and set by the flow later, around the phases."""

    def __init__(self, cluster_kwargs: dict[str, Any], scheduler_kwargs: dict[str, Any]) -> None:
        self.cluster_kwargs = cluster_kwargs
        self._scheduler_kwargs = scheduler_kwargs
        self._cluster: Any = None
        self._starting = threading.Thread(target=self._start, name="slurmctl-early-cluster", daemon=True)
        self._starting.start()
        self._closing: threading.Thread | None = None

    def _start(self) -> None:
        from distributed import LocalCluster

        if _warming is not None:  # the template decides how the nannies start their workers: forked from it
            _warming.join()
        try:
            self._cluster = LocalCluster(**self.cluster_kwargs, scheduler_kwargs=self._scheduler_kwargs)
        except Exception as exc:  # the phase's own task runner starts a cluster instead (and reports its failure)
            print(f"note: the job's local cluster did not start early ({type(exc).__name__}: {exc}); the process "
                  f"phase starts it", file=sys.stderr)

    def address(self) -> str | None:
        """The scheduler's address once the cluster is up; None if it could not start or was closed."""
        self._starting.join()
        return None if self._cluster is None or self._closing is not None else self._cluster.scheduler_address

    def close(self, wait: bool = True) -> None:
        """Close it (its workers close their handler instances as they stop); ``wait=False`` returns at once and
        a later ``close()`` waits for it."""
        with _lock:
            if self._closing is None:
                self._starting.join()
                self._closing = threading.Thread(target=self._close, name="slurmctl-early-cluster-close",
                                                 daemon=True)
                self._closing.start()
        if wait:
            self._closing.join()

    def _close(self) -> None:
        if self._cluster is not None:
            try:
                self._cluster.close()
            except Exception as exc:  # its processes end with this one anyway
                print(f"note: closing the job's local cluster: {type(exc).__name__}: {exc}", file=sys.stderr)
            finally:
                # Freed now, while Dask's modules are whole. Held by this module until the interpreter's exit, it
                # was freed after their globals were cleared, and its finalizers printed AttributeErrors into the
                # coordinator's log after the coordinator's exit line.
                self._cluster = None


_early: EarlyCluster | None = None


def start_cluster(cluster_kwargs: dict[str, Any], scheduler_kwargs: dict[str, Any]) -> None:
    """Start the job's ``LocalCluster`` now, in the background, when this process allows forking its workers
    (a coordinator of a local job). Returns at once."""
    global _early
    if _allowed and _early is None:
        _early = EarlyCluster(cluster_kwargs, scheduler_kwargs)


def reuse(runner: Any) -> Any:
    """``runner`` (a phase's task runner), or one connected to the cluster ``start_cluster`` started when that is
    the cluster ``runner`` would start (same settings) and it is up."""
    from prefect_dask import DaskTaskRunner

    if _early is None or not isinstance(runner, DaskTaskRunner) or runner.cluster_kwargs != _early.cluster_kwargs:
        return runner
    address = _early.address()
    if address is None:
        return runner
    return DaskTaskRunner(address=address, client_kwargs=runner.client_kwargs)


def close_cluster(wait: bool = True) -> None:
    """Close the cluster ``start_cluster`` started, if any (the phases that use it are over)."""
    if _early is not None:
        _early.close(wait)


def end_workers(wait_s: float = 1.0) -> list[int]:
    """Kill this process's local Dask workers (SIGKILL to every nanny's worker process), wait up to ``wait_s`` for
    them to be gone, and return their pids. For a coordinator that exits at once (a second signal, or a stop past its
    bound: ``flows/stop.py``), before its books say ``stopped``.

    Its workers would outlive it: forked from the template, they are not its children, and Dask ends one only once it
    notices that its nanny's pipe closed (tens of milliseconds idle, more on a loaded machine). Meanwhile a worker
    goes on with its batch and may commit it after the job says ``stopped``, or call the API for items that
    ``slurmctl resume`` then runs again. A killed batch never commits (batches commit whole), so resume runs it once.
    Slurm's workers are jobs, cancelled by name (``mark_cancelled``); a thread-only cluster ends with the process."""
    import signal
    import time

    nanny_module = sys.modules.get("distributed.nanny")  # not imported: this process started no local worker
    if nanny_module is None:
        return []
    pids = []
    for nanny in list(nanny_module.Nanny._instances):
        process = getattr(getattr(nanny, "process", None), "process", None)  # WorkerProcess -> AsyncProcess
        pid = getattr(process, "pid", None)
        if pid and getattr(process, "exitcode", None) is None:
            try:
                os.kill(pid, signal.SIGKILL)
                pids.append(pid)
            except OSError:  # gone already
                pass
    deadline = time.monotonic() + wait_s
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.005)
    return pids
