"""The books: does every input item appear exactly once as succeeded, failed (listed with its class) or rejected?

A job completes only when its books balance. ``audit`` settles them from the manifests alone — the plans (initial
batches and every retry round's batches) and the committed task manifests — and ``check`` refuses to let a job
complete when they do not, naming the batches without a commit and the difference, so nothing is silently missing
from an output that claims to be complete.

Items still deferred by the circuit breaker when the automatic retry rounds are spent are resolved by being listed as
failed (with the class that tripped the breaker), so they count as failed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slurmctl.books.failures import failure_state
from slurmctl.books.manifests import JobManifest, Keys
from slurmctl.books.store import read_plan, read_round_batches
from slurmctl.storage import Store

SHOWN = 20  # batch ids named in an error message


class BooksUnbalanced(RuntimeError):
    """The job cannot complete: batches without a commit, or item counts that do not add up."""


@dataclass
class Books:
    """What the manifests say about every planned item."""

    batches_planned: int = 0
    missing: list[str] = field(default_factory=list)  # planned batches with no commit
    inconsistent: list[str] = field(default_factory=list)  # commits whose own counts do not add up
    unplanned: list[str] = field(default_factory=list)  # commits of batches no plan names
    items_total: int = 0
    items_succeeded: int = 0
    items_failed: int = 0  # failed, and deferred ones (listed as failed)
    items_rejected: int = 0
    rows_written: int = 0

    @property
    def accounted(self) -> int:
        return self.items_succeeded + self.items_failed + self.items_rejected

    @property
    def difference(self) -> int:
        """Accounted minus total: negative means items are missing, positive means some are counted twice."""
        return self.accounted - self.items_total

    @property
    def balanced(self) -> bool:
        return not self.missing and not self.inconsistent and not self.unplanned and self.difference == 0

    def problems(self, job_id: str) -> str:
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} of {self.batches_planned} planned batch(es) have no commit: "
                       f"{_some(self.missing)}")
        if self.inconsistent:
            out.append(f"{len(self.inconsistent)} committed batch(es) whose counts do not add up to their items: "
                       f"{_some(self.inconsistent)}")
        if self.unplanned:
            out.append(f"{len(self.unplanned)} commit(s) of batches no plan names: {_some(self.unplanned)}")
        if self.difference:
            out.append(f"items succeeded {self.items_succeeded} + failed {self.items_failed} + rejected "
                       f"{self.items_rejected} = {self.accounted}, but the input has {self.items_total} "
                       f"({self.difference:+d})")
        return (f"job {job_id} cannot complete, its books do not balance: " + "; ".join(out)
                + f". `slurmctl resume {job_id}` runs the batches without a commit again")


def _some(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN]) + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")


def _adds_up(task: dict[str, Any], records: int) -> bool:
    parts = (task.get("items_succeeded", 0) + task.get("items_failed", 0) + task.get("items_deferred", 0)
             + task.get("items_rejected", 0))
    return task.get("items") == records == parts


def audit(store: Store, job: JobManifest, tasks: list[dict[str, Any]],
          state: dict[int, dict[str, Any]] | None = None) -> Books:
    """The books from the plans and ``tasks`` (the committed task manifests, in commit order)."""
    plan = read_plan(store, job.job_id)
    planned = {spec.batch_id: spec.records for spec in plan}
    for r in job.retry_rounds:
        for spec in read_round_batches(store, job.job_id, r["round"]) or []:
            planned[spec.batch_id] = spec.records
    by_id = {t["batch_id"]: t for t in tasks}
    books = Books(batches_planned=len(planned), items_total=sum(spec.records for spec in plan))
    books.missing = [b for b in planned if b not in by_id]
    books.unplanned = sorted(b for b in by_id if b not in planned)
    books.inconsistent = [b for b, t in by_id.items() if b in planned and not _adds_up(t, planned[b])]
    state = failure_state(store, tasks) if state is None else state
    books.items_succeeded = sum(t.get("items_succeeded", 0) for t in tasks)
    books.items_rejected = sum(t.get("items_rejected", 0) for t in tasks)
    books.items_failed = len(state)
    books.rows_written = sum(t.get("rows_written", 0) for t in tasks)
    return books


def check(store: Store, job: JobManifest, tasks: list[dict[str, Any]],
          state: dict[int, dict[str, Any]] | None = None) -> Books:
    """``audit``, raising ``BooksUnbalanced`` when the books do not balance.

    Batches without a commit lose their Prefect cache records too, so that ``resume`` runs them again instead of
    being answered from a cache entry whose commits are gone. A shard's record is keyed by its first batch, and a
    shard is only submitted again unchanged when none of its batches is committed — its first batch among them.
    """
    books = audit(store, job, tasks, state)
    if not books.balanced:
        keys = Keys(job.job_id)
        for batch_id in books.missing:
            for key in list(store.list_keys(f"{keys.cache_prefix}{batch_id}-")):
                store.delete(key)
        raise BooksUnbalanced(books.problems(job.job_id))
    return books
