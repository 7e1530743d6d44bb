"""Is a job's coordinator alive, and taking over from a dead one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from slurmctl.config import StorageConfig
from slurmctl.procs import pid_alive


def coordinator_alive(job: Any, store: Any = None) -> bool:
    """Is the job's coordinator still running? Certain on this host (its pid); elsewhere, a fresh heartbeat.

    The heartbeat (``jobs/<id>/heartbeat.json``, written in every phase by the coordinator itself) gives its real
    host and pid — the job manifest's host is where the job was submitted — and its freshness.
    """
    import socket

    from slurmctl.books.heartbeat import read_heartbeat
    from slurmctl.books.manifests import TERMINAL_STATUSES
    from slurmctl.books.status import status_view
    from slurmctl.books.store import reader_for

    if job.status in TERMINAL_STATUSES:
        return False
    beat = read_heartbeat(store if store is not None else reader_for(job.config["storage"]), job.job_id)
    host, pid = (beat["host"], beat["pid"]) if beat else (job.coordinator_host, job.coordinator_pid)
    if host == socket.gethostname() and pid:
        if not pid_alive(pid):
            return False
        if _is_coordinator(pid, job.job_id):
            return True
        # Alive but not `slurmctl.cli.coordinator JOB`: a reused pid, or a run started another way (a deployment):
        # the heartbeat tells.
    return not status_view(job.model_dump(mode="json"), None, beat)["stale"]


def _is_coordinator(pid: int, job_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # cannot tell: assume it is
    # `slurmctl.coordinator` is the module's name before 0.2: a coordinator started by the previous release counts.
    return bool({b"slurmctl.cli.coordinator", b"slurmctl.coordinator"} & set(cmdline)) and job_id.encode() in cmdline


def take_over(job: Any, storage: StorageConfig) -> None:
    """Before a new coordinator starts: cancel Slurm workers the dead one left, mark its flow run Crashed."""
    from slurmctl.slurm import cancel_worker_jobs

    if job.cluster.get("kind") == "slurm":
        cancel_worker_jobs(job.job_id)
    if job.flow_run_id:
        try:
            mark_flow_run_crashed(job.flow_run_id, "its coordinator died; continued by `slurmctl resume`")
        except Exception as exc:  # the Prefect API may be down: the manifests are what matter
            print(f"note: could not mark flow run {job.flow_run_id} crashed ({exc})", file=sys.stderr)


def mark_flow_run_crashed(flow_run_id: str, message: str) -> None:
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    async def mark() -> None:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(flow_run_id))
            if run.state and not run.state.is_final():
                await client.set_flow_run_state(UUID(flow_run_id), Crashed(message=message), force=True)

    asyncio.run(mark())
