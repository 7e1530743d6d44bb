"""What ``slurmctl status JOB --json`` shows, from the manifests: one function the command and a Python caller share.

The job manifest's counters (or a recount from the commits), the control object (paused), the coordinator's
heartbeat (stale), progress and spend (``manifests.status_view``), each rate limit's state when the job declares any
(the limiter backend is optional here: a failure to read it is shown, never raised), and on request the slowest
batches.
"""

from __future__ import annotations

from typing import Any

from slurmctl.books.failures import committed_tasks, recount
from slurmctl.books.heartbeat import read_heartbeat
from slurmctl.books.manifests import JobManifest, Keys, status_view
from slurmctl.storage import Store


def job_status(store: Store, job: JobManifest, *, scan: bool = False, batches: int = 0) -> dict[str, Any]:
    """The status view of ``job`` (loaded from ``store``). ``scan``: count the committed batches again instead of
    trusting the manifest's counters; ``batches``: add the ``batches`` slowest committed batches."""
    if scan:
        scanned = recount(store, job.job_id, job.counts.batches_total, job.counts.items_total)
        scanned.duplicates = job.counts.duplicates  # the aggregation's counts: no task manifest holds them
        scanned.duplicate_items = job.counts.duplicate_items
        job = job.model_copy(update={"counts": scanned})
    view = status_view(job.model_dump(mode="json"), store.get_json(Keys(job.job_id).control),
                       read_heartbeat(store, job.job_id))
    if job.config.get("rate_limits"):
        try:
            from slurmctl.books.limits import limits_status
            from slurmctl.config import parse_config

            view["rate_limits"] = limits_status(parse_config(job.config))
        except Exception as exc:  # the limiter backend is optional for status: manifests come first
            view["rate_limits"] = {"error": f"{type(exc).__name__}: {exc}"}
    if batches:
        from slurmctl.batch_metrics import slowest_batches

        view["slowest_batches"] = slowest_batches(committed_tasks(store, job.job_id), batches)
    return view
