"""Cancelling a job's current run: ``cancel.json`` (the manifests' request every coordinator polls) and its flow
run Cancelling when Prefect is reachable; with no live coordinator, the cancellation is finished here."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from slurmctl.control.errors import ControlFailed
from slurmctl.control.liveness import coordinator_alive
from slurmctl.control.server import prefect_api
from slurmctl.control.slurm_coordinator import cancel_coordinator_jobs, continued_on_slurm


def cancel(job: Any, store: Any, *, wait: bool = True, timeout: float = 120) -> str:
    """Ask the job's run to stop; with ``wait``, until the manifest says so and no Slurm job of it is left (raises
    ``ControlFailed`` after ``timeout`` seconds: the request stands). Returns what happened, in words."""
    import getpass
    import socket

    from slurmctl.books.manifests import TERMINAL_STATUSES
    from slurmctl.books.store import load_job, update_job
    from slurmctl.flows.cancel import mark_cancelled, request_cancel
    from slurmctl.slurm import worker_jobs

    job_id = job.job_id
    if continued_on_slurm(job):  # stopped at its coordinator's walltime, the next coordinator queued: not that
        ids = cancel_coordinator_jobs(job_id)
        update_job(store, job_id, status="cancelled", error=(
            f"cancelled by slurmctl cancel (its next coordinator, Slurm job {', '.join(ids)}, was cancelled); "
            f"`slurmctl resume {job_id}` continues it")[:2000])
        return f"cancelled {job_id} (its queued coordinator {', '.join(ids)} too)"
    if job.status in TERMINAL_STATUSES:
        return f"job {job_id} is not running (status {job.status}); nothing to cancel"
    request_cancel(store, job_id, by=f"slurmctl cancel ({getpass.getuser()}@{socket.gethostname()})")
    note = _cancel_flow_run(job.flow_run_id)
    if not coordinator_alive(job, store):
        if job.coordinator_slurm_job:  # a coordinator job that has not started yet must not start
            cancel_coordinator_jobs(job_id)
        ids = mark_cancelled(store, job_id, "cancelled by slurmctl cancel (no coordinator was running)",
                             job.cluster.get("kind"))
        return (f"cancelled {job_id} (its coordinator was not running; Slurm jobs cancelled: "
                f"{', '.join(ids) or 'none'}){note}")
    asked = f"cancelling {job_id}: the coordinator stops after the batches in flight{note}"
    if not wait:
        return asked
    print(asked, file=sys.stderr, flush=True)  # a note while it waits
    deadline = time.monotonic() + timeout
    left: list[str] = []
    while time.monotonic() < deadline:
        job = load_job(store, job_id)
        left = worker_jobs(job_id) if job.cluster.get("kind") == "slurm" else []
        if job.status in TERMINAL_STATUSES and not left:
            break
        time.sleep(0.5)
    else:
        raise ControlFailed(f"{job_id} did not stop within {timeout:g} s (status {job.status}, Slurm jobs left: "
                            f"{', '.join(left) or 'none'}); the request stands — `slurmctl status {job_id}` follows it")
    c = job.counts
    return (f"{job_id} {job.status}: {c.batches_done}/{c.batches_total} batches committed and kept, 0 Slurm "
            f"jobs left; `slurmctl resume {job_id}` continues it")


def _cancel_flow_run(flow_run_id: str | None) -> str:
    """Move the job's flow run to Cancelling, as the Prefect UI's Cancel does (a deployment's worker then stops its
    process); a note for the user when Prefect cannot be reached (the manifests' request still works)."""
    if not flow_run_id:
        return ""
    from slurmctl import prefect_server

    server = None if os.environ.get("PREFECT_API_URL") else prefect_server.running()
    if server is None and not os.environ.get("PREFECT_API_URL"):
        return " (no Prefect server running: the flow run's state is left as it is)"
    try:
        with prefect_api(server):
            _set_cancelling(flow_run_id)
    except Exception as exc:
        return f" (the flow run's state in Prefect was not changed: {type(exc).__name__}: {exc})"
    return ""


def _set_cancelling(flow_run_id: str) -> None:
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    async def mark() -> None:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(flow_run_id))
            if run.state and not run.state.is_final():
                await client.set_flow_run_state(UUID(flow_run_id), Cancelling(message="slurmctl cancel"))

    asyncio.run(mark())
