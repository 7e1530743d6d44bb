"""The jobs in a store, newest first, from their job manifests alone: what ``slurmctl list`` shows.

One listing of the ids under ``jobs/`` (``Store.list_children``: a request per thousand jobs on S3, never a listing
of their batches) and one read of each job manifest, eight at a time. A job whose manifest cannot be read (corrupt,
or written by a newer slurmctl) is listed with the error instead of hiding it or failing the whole listing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from slurmctl.books.manifests import Keys
from slurmctl.books.store import JobNotFound, load_job
from slurmctl.safe_keys import name_problem
from slurmctl.storage import Store

JOBS_PREFIX = "jobs/"
READERS = 8  # job manifests read at once (S3 GETs)


def job_row(store: Store, job_id: str) -> dict[str, Any] | None:
    """One job's line of the listing; None when ``job_id`` has no job manifest (a folder left by something else)."""
    row: dict[str, Any] = {"job_id": job_id, "store": store.uri(Keys(job_id).root).rstrip("/")}
    try:
        job = load_job(store, job_id)
    except JobNotFound:
        return None
    except Exception as exc:  # ManifestCorrupt, JobTooNew, an unreadable object: shown, not hidden
        return {**row, "status": "unreadable", "error": f"{type(exc).__name__}: {exc}"}
    c = job.counts
    return {**row, "status": job.status, "phase": job.phase, "batches_done": c.batches_done,
            "batches_total": c.batches_total, "items_total": c.items_total, "items_succeeded": c.items_succeeded,
            "items_failed": c.items_failed, "items_rejected": c.items_rejected, "submitted_at": job.submitted_at,
            "updated_at": job.updated_at, "finished_at": job.finished_at, "error": job.error}


def list_jobs(store: Store, limit: int | None = None) -> list[dict[str, Any]]:
    """The jobs in ``store``, newest submission first; ``limit``: the newest that many (every manifest is read:
    only a job's manifest says when it was submitted)."""
    ids = [i for i in store.list_children(JOBS_PREFIX) if not name_problem(i)]
    with ThreadPoolExecutor(max(1, min(READERS, len(ids)))) as pool:
        rows = [r for r in pool.map(lambda i: job_row(store, i), ids) if r is not None]
    rows = newest_first(rows)
    return rows[:limit] if limit else rows


def jobs_in(stores: list[Any], on_error: Callable[[Any, Exception], None] | None = None) -> list[dict[str, Any]]:
    """The jobs of several stores (``StorageConfig``s) in one listing, newest first, each job once. ``on_error``:
    called with a store that cannot be listed and the error, and the others are still listed (else it raises)."""
    from slurmctl.books.store import reader_for

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for storage in stores:
        try:
            for row in list_jobs(reader_for(storage)):
                rows.setdefault((row["store"], row["job_id"]), row)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(storage, exc)
    return newest_first(list(rows.values()))


def newest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r.get("submitted_at") or "", r["job_id"]), reverse=True)
