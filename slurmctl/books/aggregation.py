"""The aggregation plan: which merges turn the committed batch outputs into the job's dataset, and where each writes.

A merge is data, like a batch: a unit with a deterministic name, inputs, outputs, a manifest and a ``.done`` marker;
Prefect task runs execute many of them (``tasks/merge.py``), so the merge tree's size never becomes Prefect's
problem. The tree:

* **Level 1** reads up to ``fan_in`` committed batch outputs (in commit order) and splits their rows by a hash of
  the item id into ``buckets`` hash partitions, writing one file per non-empty partition.
* **Level 2, 3, ...** merge up to ``fan_in`` files *of the same partition* from the level below, until each
  partition has at most ``fan_in`` files. A key (item id, row index) lives in one partition only, so deduplicating
  within a merge is global deduplication, and a merge holds at most one partition's rows (``rows_per_bucket``) in
  memory.
* **Final** is the top merge of every partition: it deduplicates each partition's last files (at most ``fan_in``)
  as a level above would and streams their rows into the configured layout (one file, files of at most N rows, or a
  dataset partitioned by a column), then the flow publishes them under ``output/``. A level that only made each
  partition one file would write every row once more, to be read once more: at 2,000 parts that level and the
  re-read were a third of the aggregation.

Everything a plan writes lives under ``jobs/<job>/aggregate/<plan_id>/``; the plan id is a digest of the inputs (each
winning commit's output and checksum) and the settings, so a restart after a crash at any level finds its finished
merges by their ``.done`` markers and runs only the rest, and a retry round that adds commits makes a new plan.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from slurmctl.books.manifests import Keys
from slurmctl.books.parts import output_sha256
from slurmctl.config import AggregateConfig


@dataclass(frozen=True)
class Merge:
    """One merge: level 1 reads batch outputs (``inputs`` are commit ordinals), a higher level reads files of
    partition ``bucket`` written by the merges ``inputs`` of the level below."""

    level: int
    index: int
    inputs: tuple[int, ...]
    bucket: int | None = None

    @property
    def name(self) -> str:
        return f"L{self.level}-{self.index:05d}"


@dataclass
class AggregationPlan:
    job_id: str
    plan_id: str
    buckets: int
    fan_in: int
    id_field: str = "id"
    levels: list[list[Merge]] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"{Keys(self.job_id).aggregate_prefix}{self.plan_id}/"

    def level_prefix(self, level: int) -> str:
        return f"{self.prefix}L{level}/"

    def manifest_key(self, m: Merge) -> str:
        return self.manifest_key_at(m.level, m.index)

    def manifest_key_at(self, level: int, index: int) -> str:
        return f"{self.level_prefix(level)}{index:05d}.json"

    def done_key(self, m: Merge) -> str:
        """Written last, after the merge's files and manifest: the merge is finished (restart skips it)."""
        return f"{self.level_prefix(m.level)}{m.index:05d}.done"

    def file_key(self, m: Merge, bucket: int) -> str:
        return f"{self.level_prefix(m.level)}{m.index:05d}-b{bucket:04d}.parquet"

    @property
    def final_prefix(self) -> str:
        return f"{self.prefix}final/"

    @property
    def final_manifest(self) -> str:
        return f"{self.prefix}final.json"

    @property
    def final_done(self) -> str:
        return f"{self.prefix}final.done"

    def partition_sources(self) -> list[tuple[int, list[Merge]]]:
        """Each partition with the merges whose files are its last (at most ``fan_in``, in commit order): what the
        final layout merges. A level-1 merge wrote a file for every partition its rows fell in."""
        top = self.levels[-1] if self.levels else []
        return [(b, sources) for b in range(self.buckets)
                if (sources := [m for m in top if m.bucket in (None, b)])]

    @property
    def merges(self) -> int:
        return sum(len(level) for level in self.levels)

    def merge_spec(self, m: Merge, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """What one merge needs (``tasks.merge.run_merge``), and nothing more: a task run's argument stays small."""
        spec: dict[str, Any] = {"plan_id": self.plan_id, "name": m.name, "level": m.level, "index": m.index,
                                "bucket": m.bucket, "buckets": self.buckets, "id_field": self.id_field,
                                "manifest": self.manifest_key(m), "done": self.done_key(m)}
        if m.level == 1:
            spec["inputs"] = []
            for o in m.inputs:
                t = tasks[o]
                spec["inputs"].append({"ordinal": o, "batch_id": t["batch_id"], "key": t["output"],
                                       "sha256": output_sha256(t), "rows": t.get("rows_written")})
            spec["files"] = {str(b): self.file_key(m, b) for b in range(self.buckets)}
        else:
            spec["inputs"] = [self.manifest_key_at(m.level - 1, i) for i in m.inputs]
            spec["files"] = {str(m.bucket): self.file_key(m, m.bucket)}
        return spec

    def final_spec(self, tasks: list[dict[str, Any]], cfg: AggregateConfig) -> dict[str, Any]:
        """What the final layout needs (``tasks.merge.write_output``): the partitions' last files and the layout."""
        return {"plan_id": self.plan_id, "manifest": self.final_manifest, "done": self.final_done,
                "id_field": self.id_field,
                "partitions": [(b, [self.manifest_key(m) for m in merges]) for b, merges in self.partition_sources()],
                "final_prefix": self.final_prefix, "partition_by": cfg.partition_by,
                "max_rows_per_file": cfg.max_rows_per_file, "max_partitions": cfg.max_partitions,
                "batch_ids": [t["batch_id"] for t in tasks]}


def plan_id_of(tasks: list[dict[str, Any]], cfg: AggregateConfig, buckets: int, id_field: str) -> str:
    """A digest of what the plan merges (each commit's output and checksum, in order) and how."""
    h = hashlib.sha256(json.dumps([4, cfg.fan_in, buckets, id_field, cfg.partition_by, cfg.max_rows_per_file],
                                  default=str).encode())
    for t in tasks:
        h.update(f"\n{t['batch_id']} {t.get('output')} {t.get('output_sha256')}".encode())
    return h.hexdigest()[:16]


def _groups(items: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(items[i:i + size]) for i in range(0, len(items), size)]


def plan_aggregation(job_id: str, tasks: list[dict[str, Any]], cfg: AggregateConfig, id_field: str) -> AggregationPlan:
    """The merge tree over ``tasks`` (the committed task manifests, in commit order)."""
    rows = sum(t.get("rows_written") or 0 for t in tasks)
    buckets = max(1, math.ceil(rows / cfg.rows_per_bucket))
    plan = AggregationPlan(job_id, plan_id_of(tasks, cfg, buckets, id_field), buckets, cfg.fan_in, id_field)
    with_output = [i for i, t in enumerate(tasks) if t.get("output")]
    if not with_output:
        return plan
    level = [Merge(1, i, g) for i, g in enumerate(_groups(with_output, cfg.fan_in))]
    plan.levels.append(level)

    def last(level: list[Merge]) -> bool:  # the final layout can merge what is left: <= fan_in files a partition
        return all(sum(1 for m in level if m.bucket in (None, b)) <= cfg.fan_in for b in range(buckets))

    while not last(level):
        below, level = level, []
        for b in range(buckets):
            sources = [m.index for m in below if m.bucket in (None, b)]
            start = len(level)
            level += [Merge(below[0].level + 1, start + i, g, b) for i, g in enumerate(_groups(sources, cfg.fan_in))]
        plan.levels.append(level)
    return plan
