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
import re
from collections import Counter, defaultdict
from typing import Any, Iterable

from slurmctl.blocks.manifest_store import ManifestStore
from slurmctl.books.manifests import Counts, Keys, counts_from_tasks
from slurmctl.books.parts import committed_retry

_ROUND = re.compile(r"^r(\d+)-")


def round_of(batch_id: str) -> int:
    """0 for an initial batch, N for a batch of retry round N (``rNN-batch-...``)."""
    m = _ROUND.match(batch_id)
    return int(m.group(1)) if m else 0


def id_key(value: Any) -> str:
    """Items ids as exact keys (1 and "1" stay different)."""
    return json.dumps(value, sort_keys=True, default=str)


def committed_batch_ids(store: ManifestStore, job_id: str) -> list[str]:
    """Batch ids with a committed task manifest: one LIST per 1,000 batches, no GETs."""
    return [b for b in map(Keys.committed_batch, store.list_keys(Keys(job_id).tasks_prefix)) if b]


def committed_tasks(store: ManifestStore, job_id: str, ids: set[str] | None = None) -> list[dict[str, Any]]:
    """Every committed task manifest (or those of ``ids``, known committed), in commit order (initial batches,
    then each retry round).

    Which batches are committed comes from the listing of ``tasks/`` (the commits themselves). Their contents come
    from the shards' commit logs where one holds the batch (one request per shard, not per batch) and must be the
    committed attempt; any other batch's task manifest is read on its own.
    """
    keys = Keys(job_id)
    ids = set(committed_batch_ids(store, job_id)) if ids is None else ids
    found: dict[str, dict[str, Any]] = {}
    for key in store.list_keys(keys.commit_logs_prefix):
        log = store.get_json(key) if key.endswith(".json") else None
        for t in (log or {}).get("tasks", []):
            if t.get("batch_id") in ids:
                found.setdefault(t["batch_id"], _bare(t))
    for b in ids - found.keys():
        t = store.get_json(keys.task(b))
        if t:
            found[b] = _bare(t)
    return sorted(found.values(), key=lambda t: (round_of(t["batch_id"]), t["batch_id"]))


def recount(store: ManifestStore, job_id: str, batches_total: int, items_total: int,
            ids: set[str] | None = None) -> Counts:
    """Counts from the committed task manifests alone (resume, ``status --scan``); ``ids``: of those batches."""
    return counts_from_tasks(committed_tasks(store, job_id, ids), batches_total, items_total)


def _bare(task: dict[str, Any]) -> dict[str, Any]:
    """A task manifest without the store's checksum of its own file (a commit log's copy has none)."""
    return {k: v for k, v in task.items() if k != "checksum"}


def failure_state(store: ManifestStore, tasks: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Input line -> the item's latest failure record, with ``state`` "failed" or "deferred" (tasks in commit order).

    A committed retry manifest that is missing or does not match its batch's counts is an error (``PartError``).
    """
    state: dict[int, dict[str, Any]] = {}
    lines_of: dict[str, set[int]] = defaultdict(set)  # id key -> lines, for manifests that only name ids

    def put(rec: dict[str, Any]) -> None:
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
