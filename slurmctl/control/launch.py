"""Starting a job's coordinator: what ``submit`` (``slurmctl submit``, ``slurmctl.submit``) and ``resume`` share.

``start`` admits a new job and starts its coordinator (here, on standby while the job is admitted, or as a Slurm job),
raising ``SubmitRefused`` (nothing was submitted: the problems name the fields) or ``SubmitFailed`` (the job exists
but did not start: the message says what to fix, then ``resume``). The caller prints, waits or returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slurmctl.config import JobConfig, StorageConfig
from slurmctl.control import spare
from slurmctl.control.errors import SubmitFailed, SubmitRefused
from slurmctl.control.server import local_prefect_server
from slurmctl.paths import coordinator_log, home

__all__ = ["Launched", "SubmitFailed", "SubmitRefused", "admit", "coordinator_on_slurm", "release", "remember",
           "spawn_coordinator", "start", "start_as_deployment_run", "start_on_slurm"]


@dataclass
class Launched:
    job: Any  # the JobManifest as admitted
    store: Any
    proc: Any  # the coordinator here (a Popen, or a spare that took the job: spare.Adopted); None on Slurm
    log: Path
    server: dict[str, Any] | None  # the local Prefect server, when no PREFECT_API_URL names one


def remember(job_id: str, storage: StorageConfig) -> None:
    path = home() / "jobs" / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job_id": job_id, "storage": storage.model_dump()}))


def spawn_coordinator(job_id: str, storage: StorageConfig, retry_errors: list[str] | None = None,
                      standby: bool = False, aggregate_only: bool = False,
                      fork_workers: bool = False) -> tuple[subprocess.Popen, Path]:
    """Start the job's coordinator process. ``standby``: it imports what it needs and waits for ``release``, so
    its start-up overlaps with the caller's checks. ``fork_workers``: the job's cluster is local, so the coordinator
    starts the template its workers fork from at once (``slurmctl.flows.local_workers``)."""
    log = coordinator_log(job_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = coordinator_env()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slurmctl.cli.coordinator", job_id, "--storage-json", storage.model_dump_json(),
             "--retry-errors", ",".join(retry_errors or []), *(["--standby"] if standby else []),
             *(["--aggregate-only"] if aggregate_only else []), *(["--fork-workers"] if fork_workers else [])],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE if standby else subprocess.DEVNULL, env=env,
            start_new_session=True)
    return proc, log


def coordinator_env() -> dict[str, str]:
    """The environment a coordinator started from here gets: ours, this directory importable (handlers)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *filter(None, env.get("PYTHONPATH", "").split(
        os.pathsep))]))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def spare_for(fork_workers: bool) -> str | None:
    """The fingerprint of a spare coordinator (``slurmctl.control.spare``) waiting for a job started from here, if
    one is."""
    env = coordinator_env()
    if not spare.enabled(env):
        return None
    fp = spare.fingerprint(env, os.getcwd(), fork_workers)
    return fp if spare.available(fp) else None


def hand_to_spare(fp: str | None, job_id: str, storage: StorageConfig, retry_errors: list[str] | None = None,
                  aggregate_only: bool = False, fork_workers: bool = False) -> tuple[Any, Path]:
    """Give the job to the spare ``fp`` (``spare_for``); a coordinator started as before if it does not take it."""
    log = coordinator_log(job_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    adopted = spare.claim(fp, {"job_id": job_id, "storage_json": storage.model_dump_json(),
                               "retry_errors": ",".join(retry_errors or []), "aggregate_only": aggregate_only,
                               "log": str(log)}) if fp else None
    if adopted is not None:
        return adopted, log
    return spawn_coordinator(job_id, storage, retry_errors, aggregate_only=aggregate_only, fork_workers=fork_workers)


def release(proc: subprocess.Popen, go: bool) -> None:
    """Let a standby coordinator run the job (``go``), or end it: the job was not created, it has done nothing."""
    if go:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        return
    # Its whole process group (it leads one: start_new_session): the template its workers would have forked from
    # is in it too, and would otherwise finish its imports for nothing.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    with contextlib.suppress(OSError):
        proc.stdin.close()


def coordinator_on_slurm(cfg: JobConfig, on: str | None) -> bool | None:
    """Does the job's coordinator run as a Slurm job (``--on``, else ``cluster.coordinator.on``)? None: it cannot."""
    wanted = on or (cfg.cluster.coordinator.on if cfg.cluster.kind == "slurm" else "local")
    if wanted == "slurm" and cfg.cluster.kind != "slurm":
        return None
    return wanted == "slurm"


def start_on_slurm(job_id: str, storage: StorageConfig, cluster: Any, store: Any) -> str:
    """sbatch the job's coordinator (``slurmctl.control.slurm_coordinator``); record it in the job manifest. Raises
    ``SubmitFailed`` (the job marked failed, the message saying what to do) when sbatch refuses."""
    from slurmctl.books.manifests import now
    from slurmctl.books.store import update_job
    from slurmctl.control import slurm_coordinator

    try:
        slurm_id = slurm_coordinator.submit(job_id, storage.model_dump_json(), cluster)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        update_job(store, job_id, status="failed", finished_at=now(), error=f"{exc}"[:2000])
        raise SubmitFailed(f"job {job_id} is submitted but its coordinator is not: {exc}\n  fix that "
                           f"(cluster.coordinator), then `slurmctl resume {job_id}`") from None
    update_job(store, job_id, coordinator_slurm_job=slurm_id)
    print(f"coordinator of {job_id}: Slurm job {slurm_id} (`squeue -j {slurm_id}`)", file=sys.stderr)
    return slurm_id


def admit(cfg: JobConfig, config_file: str | None, sample: Any = None) -> Any:
    """Create the job (its manifest, after admission's checks) and remember where it lives on this machine; raise
    ``SubmitRefused`` naming the fields when admission refuses it or the job id is taken."""
    from slurmctl.books.admission import JobRefused, create_job
    from slurmctl.books.store import JobExists

    try:
        job = create_job(cfg, config_file, sample)
    except JobExists as exc:
        raise SubmitRefused([("job_id", str(exc))]) from None
    except JobRefused as exc:
        raise SubmitRefused(exc.problems) from None
    remember(cfg.job_id, cfg.storage)
    return job


def start(cfg: JobConfig, config_file: str | None, sample: Any = None, on: str | None = None) -> Launched:
    """Admit ``cfg`` as a new job and start its coordinator. Its coordinator starts at once, on standby: its
    imports (~2.5 s) overlap with the admission checks (as a Slurm job it is submitted once the job exists)."""
    on_slurm = coordinator_on_slurm(cfg, on)
    if on_slurm is None:
        raise SubmitRefused([("--on slurm", "the coordinator runs as a Slurm job only with cluster.kind: slurm")])
    new_log = not coordinator_log(cfg.job_id).exists()
    from slurmctl.flows.local_workers import forks

    fork = forks(cfg.cluster)
    fp = None if on_slurm else spare_for(fork)  # a coordinator past its imports is waiting: it takes the job
    proc, log = (None, coordinator_log(cfg.job_id)) if on_slurm or fp else spawn_coordinator(
        cfg.job_id, cfg.storage, standby=True, fork_workers=fork)
    go = False
    try:
        from slurmctl.books.store import reader_for

        job = admit(cfg, config_file, sample)
        store = reader_for(cfg.storage)
        try:
            server = local_prefect_server()
        except Exception as exc:  # ServerError (it says why), or an OSError of $SLURMCTL_HOME
            from slurmctl.books.manifests import now
            from slurmctl.books.store import update_job

            update_job(store, cfg.job_id, status="failed", finished_at=now(),
                       error=f"the local Prefect server did not start: {exc}"[:2000])
            raise SubmitFailed(
                f"job {cfg.job_id} is submitted but not started: the local Prefect server did not start: {exc}\n"
                f"  fix that (or set PREFECT_API_URL to a running server), then `slurmctl resume {cfg.job_id}`"
            ) from None
        if on_slurm:
            start_on_slurm(cfg.job_id, cfg.storage, cfg.cluster, store)
        go = True
    finally:
        if proc is not None:
            release(proc, go)
        if not go and new_log:
            with contextlib.suppress(OSError):
                if log.stat().st_size == 0:
                    log.unlink()
    if fp:
        proc, log = hand_to_spare(fp, cfg.job_id, cfg.storage, fork_workers=fork)
    return Launched(job, store, proc, log, server)


def start_as_deployment_run(cfg: JobConfig, config_file: str | None, deployment: str,
                            sample: Any = None) -> tuple[Any, Any, str]:
    """Admit ``cfg`` here (a refused config never reaches Prefect), then create a flow run of the Prefect deployment
    ``deployment`` (``flow/name``; a name alone means ``slurmctl-job/NAME``) for it: that deployment's worker runs
    it, as a run started from the UI. Returns the job manifest, the flow run and the deployment's name. Raises
    ``SubmitRefused`` or ``SubmitFailed`` (the job exists, failed, and the message says what to check)."""
    name = deployment if "/" in deployment else f"slurmctl-job/{deployment}"
    job = admit(cfg, config_file, sample)
    server = local_prefect_server()  # None when PREFECT_API_URL names the server
    try:
        from slurmctl.control.server import prefect_api

        with prefect_api(server):
            from prefect.deployments import run_deployment

            run = run_deployment(name, parameters={"job_id": cfg.job_id, "storage": cfg.storage.model_dump()},
                                 timeout=0, flow_run_name=cfg.job_id)
    except Exception as exc:  # no such deployment, or the API is down: the job waits, nothing ran
        from slurmctl.books.manifests import now
        from slurmctl.books.store import reader_for, update_job

        update_job(reader_for(cfg.storage), cfg.job_id, status="failed", finished_at=now(),
                   error=f"no flow run of deployment {name}: {exc}"[:2000])
        raise SubmitFailed(
            f"job {cfg.job_id} is submitted but not started: could not run deployment {name!r}: {exc}\n  check "
            f"`prefect deployment ls`, then `slurmctl resume {cfg.job_id}` (or run the deployment with job_id "
            f"{cfg.job_id})") from None
    return job, run, name
