"""Removing a completed job's intermediate objects (``slurmctl gc``): nothing a job leaves is otherwise ever deleted.

What goes: the batches' parts (``outputs/``, ``rejects/``: their rows are in ``output/`` and ``rejects.jsonl``), the
shards' commit logs (``commits/``: the ``tasks/`` listing is the truth), Prefect's result records (``cache/``), the
aggregation's merge levels (``aggregate/``), checkpoints (``checkpoints/``) and a compressed input's chunks
(``input/chunk-*``). What stays: every manifest (the job's, each batch's task manifest and retry manifest, the plan, the
result), the output, the failures and rejects: ``status`` (and ``--scan``), ``list``, ``analyze-errors``, the Python
API and the output all read the same afterwards.

Only a completed job, whose result manifest is there, is collected: a running, paused, stopped or failed job's
``resume`` still needs its parts. ``gc.json`` is written before anything is deleted, so a gc cut short is known,
and a collected job's ``resume`` and ``aggregate`` say that its output is final instead of failing on a missing
part (its output cannot be rebuilt any more: that is what was given up).
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from slurmctl.books.manifests import Keys, now
from slurmctl.books.store import load_job
from slurmctl.storage import Store

INTERMEDIATE = ("outputs/", "rejects/", "commits/", "cache/", "aggregate/", "checkpoints/", "runs/", "input/chunk-")


class GcRefused(ValueError):
    """The job cannot be collected (yet); the message says why and what to do."""


@dataclass
class Collection:
    job_id: str
    store_uri: str
    objects: list[tuple[str, int]] = field(default_factory=list)  # (key, bytes)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.objects)

    def by_prefix(self) -> dict[str, dict[str, int]]:
        """Objects and bytes per intermediate folder (``outputs/``, ``cache/``, ...)."""
        root = len(Keys(self.job_id).root)
        count, size = Counter(), Counter()
        for key, n in self.objects:
            folder = key[root:].split("/", 1)[0] + "/"
            count[folder] += 1
            size[folder] += n
        return {f: {"objects": count[f], "bytes": size[f]} for f in sorted(count)}

    def view(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "store": self.store_uri, "objects": len(self.objects), "bytes": self.bytes,
                "by_folder": self.by_prefix()}


def collected(store: Store, job_id: str) -> dict[str, Any] | None:
    """The job's gc record (when and what), or None if it was never collected."""
    return store.get_json(Keys(job_id).gc)


def plan(store: Store, job_id: str, older_than_days: float | None = None) -> Collection:
    """What ``collect`` would remove. Raises ``GcRefused`` for a job that is not completed, or (with
    ``older_than_days``) finished more recently than that."""
    job = load_job(store, job_id)
    keys = Keys(job_id)
    if job.status != "completed" or store.get_json(keys.result) is None:
        raise GcRefused(f"job {job_id} is {job.status}: only a completed job's intermediate objects can be removed "
                        f"(resume and aggregate still read them); `slurmctl status {job_id}` says where it is")
    finished = job.finished_at or job.updated_at
    if older_than_days is not None:
        age = _dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(finished.replace("Z", "+00:00"))
        if age.total_seconds() < older_than_days * 86400:
            raise GcRefused(f"job {job_id} finished {age.total_seconds() / 86400:.1f} days ago, less than "
                            f"{older_than_days:g}")
    found = Collection(job_id, store.uri(keys.root).rstrip("/"))
    for prefix in INTERMEDIATE:
        found.objects += list(store.list_sizes(keys.root + prefix))
    return found


def collect(store: Store, job_id: str, older_than_days: float | None = None) -> Collection:
    """Remove a completed job's intermediate objects; return what went. The record first (``gc.json``), so a
    collection cut short still marks the job; running it again finishes it (``DeleteIncomplete`` names what is
    left when a delete keeps failing)."""
    found = plan(store, job_id, older_than_days)
    keys = Keys(job_id)
    previous = collected(store, job_id) or {}
    store.put_json(keys.gc, {"job_id": job_id, "at": now(), "first_at": previous.get("first_at") or now(),
                             "objects": len(found.objects) + previous.get("objects", 0),
                             "bytes": found.bytes + previous.get("bytes", 0), "folders": list(INTERMEDIATE)})
    for prefix in INTERMEDIATE:
        store.delete_prefix(keys.root + prefix)
    return found
