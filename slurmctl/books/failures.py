"""The job's current failures, from its manifests: which items are failed (and why) or deferred right now.

Initial batches record failed and deferred items in their retry manifests. A retry round takes some of them (its
plan), and each of its batches records which items it took (``retried_lines``; ``retried_ids`` in manifests written
before lines were recorded) and which failed again. Replaying the committed manifests in order — initial batches,
then round 1, round 2, ... — gives the current state. Retry planning, ``slurmctl analyze-errors``, the final
``failures.jsonl`` and the books all read it from here.

The state is keyed by the item's input line (row for Parquet), not its id: an input may hold one id twice, and each
occurrence is an item of its own that must be accounted for.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from slurmctl.books.manifests import Counts, Keys, counts_from_tasks
from slurmctl.storage import ManifestCorrupt, Store

_ROUND = re.compile(r"^r(\d+)-")
_MARKER = ".failed.json"
logger = logging.getLogger("slurmctl.books.failures")


def round_of(batch_id: str) -> int:
    """0 for an initial batch, N for a batch of retry round N (``rNN-batch-...``)."""
    m = _ROUND.match(batch_id)
    return int(m.group(1)) if m else 0


def id_key(value: Any) -> str:
    """Items ids as exact keys (1 and "1" stay different)."""
    return json.dumps(value, sort_keys=True, default=str)


def committed_batch_ids(store: Store, job_id: str) -> list[str]:
    """Batch ids with a committed task manifest: one LIST per 1,000 batches, no GETs."""
    return list_batches(store, job_id).committed


@dataclass
class BatchListing:
    """What one listing of ``tasks/`` says: the committed batches, and the batches with a failure marker
    (``<batch>.failed.json``, written by ``flows.process.fail_uncommitted``) — some of them committed since."""

    committed: list[str] = field(default_factory=list)
    marked: set[str] = field(default_factory=set)

    @property
    def stale_markers(self) -> set[str]:
        """Batches whose failure marker is out of date: a later run committed them."""
        return self.marked.intersection(self.committed)


def list_batches(store: Store, job_id: str) -> BatchListing:
    """One listing of ``tasks/``: its commits and its failure markers."""
    listing = BatchListing()
    for key in store.list_keys(Keys(job_id).tasks_prefix):
        batch = Keys.committed_batch(key)
        if batch:
            listing.committed.append(batch)
        elif key.endswith(_MARKER):
            listing.marked.add(key.rsplit("/", 1)[-1][: -len(_MARKER)])
    return listing


def committed_tasks(store: Store, job_id: str, ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Every committed task manifest (or those of ``ids``, known committed), in commit order (initial batches,
    then each retry round).

    Which batches are committed comes from the listing of ``tasks/`` (the commits themselves). Their contents come
    from the shards' commit logs where one holds the batch (one request per shard, not per batch); any other
    batch's task manifest is read on its own. The task manifest is the truth and a log only a copy of it, taken
    when the shard committed: logs are never deleted, so a batch whose commit was lost and made again by a later
    attempt still has its old attempt in an old log. A log's copy of batch B is therefore used only when

    * the log was written strictly after ``tasks/B.json``, by the listed times at the store's granularity (S3 gives
      seconds, a filesystem its mtime's clock ticks: equal times are in no known order and such a copy is not
      used), and
    * no log names another attempt of B (a log written after a re-commit by a shard that copied the earlier
      attempt before it, e.g. a zombie, is caught whenever the re-commit's own log exists).

    Otherwise B's task manifest is read. Sound because a log is written once, after the task manifests it copies:
    a commit re-created after a log was written is newer than that log. A log that fails its checksum is skipped
    with a warning naming it (logs are a best-effort index): its batches are read from their task manifests.
    """
    keys = Keys(job_id)
    committed_at = {b: t for k, t in store.list_modified(keys.tasks_prefix) if (b := Keys.committed_batch(k))}
    ids = set(committed_at) if ids is None else ids
    usable: dict[str, dict[str, Any]] = {}  # batch -> a copy from a log written after its commit
    attempts: dict[str, set[Any]] = defaultdict(set)  # batch -> the attempts any log names
    for key, written in store.list_modified(keys.commit_logs_prefix):
        for t in _log_tasks(store, key):
            b = t.get("batch_id")
            if b not in ids:
                continue
            attempts[b].add(t.get("attempt"))
            if b in committed_at and committed_at[b] < written:
                usable.setdefault(b, t)
    found = {b: _bare(t) for b, t in usable.items() if len(attempts[b]) == 1}
    for b in ids - found.keys():
        t = store.get_json(keys.task(b))
        if t:
            found[b] = _bare(t)
    return sorted(found.values(), key=lambda t: (round_of(t["batch_id"]), t["batch_id"]))


def _log_tasks(store: Store, key: str) -> list[dict[str, Any]]:
    """The task manifest copies of one commit log; none (and a warning) when it is corrupt."""
    if not key.endswith(".json"):
        return []
    try:
        log = store.get_json(key)
    except ManifestCorrupt as exc:
        logger.warning("commit log %s skipped, its batches are read from their task manifests: %s",
                       store.uri(key), exc)
        return []
    return list((log or {}).get("tasks", []))


def recount(store: Store, job_id: str, batches_total: int, items_total: int,
            ids: set[str] | None = None) -> Counts:
    """Counts from the committed task manifests alone (resume, ``status --scan``); ``ids``: of those batches."""
    return counts_from_tasks(committed_tasks(store, job_id, ids), batches_total, items_total)


def _bare(task: dict[str, Any]) -> dict[str, Any]:
    """A task manifest without the store's checksum of its own file (a commit log's copy has none)."""
    return {k: v for k, v in task.items() if k != "checksum"}


def failure_state(store: Store, tasks: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Input line -> the item's latest failure record, with ``state`` "failed" or "deferred" (tasks in commit order).

    A committed retry manifest that is missing or does not match its batch's counts is an error (``PartError``).
    """
    from slurmctl.books.parts import committed_retry  # here: pyarrow is not needed to read a job's status

    state: dict[int, dict[str, Any]] = {}
    lines_of: dict[str, set[int]] = defaultdict(set)  # id key -> lines, for manifests that only name ids
    where: dict[int, dict[str, Any]] = {}  # line -> its file and own line (an input of many files), kept for retries

    def put(rec: dict[str, Any]) -> None:
        if "file" in rec:
            where[rec["line"]] = {"file": rec["file"], "file_line": rec.get("file_line")}
        elif rec["line"] in where:  # failed again in a retry round, whose batches read the retry plan
            rec = {**rec, **where[rec["line"]]}
        state[rec["line"]] = rec
        lines_of[id_key(rec["id"])].add(rec["line"])

    for t in tasks:
        if t.get("retried_lines"):
            for line in t["retried_lines"]:
                state.pop(line, None)
        else:
            for item_id in t.get("retried_ids") or []:
                for line in lines_of.pop(id_key(item_id), ()):
                    state.pop(line, None)
        if not t.get("retry"):
            continue
        retry = committed_retry(store, t)
        for rec in retry.get("failed", []):
            put({**rec, "state": "failed", "batch_id": t["batch_id"], "host": t.get("host")})
        for rec in retry.get("deferred", []):
            cls = retry.get("tripped_by") or "throttle"
            put({**rec, "state": "deferred", "batch_id": t["batch_id"], "host": t.get("host"), "error_class": cls,
                 "error_type": "Deferred", "message": f"deferred: circuit breaker opened on {cls}", "attempts": 0})
    return state


def analyze(job_id: str, state: dict[str, dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """Counts by class, top messages with example ids, hot batches and hosts."""
    classes = Counter(r["error_class"] for r in state.values())
    by_message: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for r in state.values():
        by_message[(r["error_class"], (r.get("message") or "")[:200])].append(r["id"])
    top_messages = [{"error_class": cls, "message": msg, "count": len(ids), "example_ids": ids[:5]}
                    for (cls, msg), ids in sorted(by_message.items(), key=lambda kv: -len(kv[1]))[:top]]
    batches = Counter(r["batch_id"] for r in state.values())
    hosts = Counter(r.get("host") or "?" for r in state.values())
    return {"job_id": job_id, "items_failed": sum(1 for r in state.values() if r["state"] == "failed"),
            "items_deferred": sum(1 for r in state.values() if r["state"] == "deferred"),
            "classes": dict(classes.most_common()), "top_messages": top_messages,
            "batches": dict(batches.most_common(top)), "hosts": dict(hosts.most_common(top))}
