"""The units of the aggregation: a merge of the tree (``run_merge``), the final layout (``write_output``), and the
Prefect tasks that run many merges per task run (``merge_chunk``, ``layout_output``).

Every file a merge reads is verified first (sha256 and row count against the manifest that recorded it: a batch's
task manifest, or the merge manifest of the level below); a mismatch fails naming the file. Every file it writes is
stored atomically (``put_file``: rename on disk, a completed multipart upload on S3), then its manifest (checksum,
row count and id range of each file, rows in and out, duplicates dropped per batch), then its ``.done`` marker: a
merge that crashed half way is simply run again, a finished one is never re-run, and nothing downstream reads a file
whose manifest is not there. A first-level merge holds its parts (a batch each) in memory; a merge above, and the
final layout (each partition's top merge), hold the id, batch and line columns of a partition (none when their
inputs' id ranges are disjoint) and stream the rows one input at a time.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from typing import Any, Iterator
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE

from slurmctl import procpool
from slurmctl.books.aggregation import plan_aggregation
from slurmctl.books.manifests import OutputFile
from slurmctl.books.parts import PartMissing, committed_rejects, fetch_part, read_parquet_part
from slurmctl.config import AggregateConfig
from slurmctl.storage import Store, sha256_bytes
from slurmctl.tables import (
    BATCH,
    INTERNAL,
    LINE,
    Dropped,
    IdRange,
    align,
    buckets_of,
    concat,
    dedupe,
    disjoint,
    file_digest,
    id_range,
    latest_rows,
    part_kind,
    read_sqlite,
    span,
    unify,
    with_row_keys,
)

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
READ_BATCH_ROWS = 64 * 1024


class MergeInputMissing(PartMissing):
    """A merge's input manifest is not there: the level below did not finish."""


class PartitionError(ValueError):
    """The partitioned layout cannot be written (no such column, too many values); the message names the setting."""


def _stored_file(store: Store, key: str, path: str, rows: int, ids: IdRange | None = None) -> dict[str, Any]:
    entry = {"key": key, "rows": rows, "bytes": os.path.getsize(path), "sha256": file_digest(path),
             **({"ids": ids} if ids else {})}
    store.put_file(key, path)
    return entry


def _finish(store: Store, spec: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    store.put_json(spec["manifest"], {"schema_version": 1, "kind": "merge", **body})
    store.put_bytes(spec["done"], b"")
    return body


def _read_level1(store: Store, spec: dict[str, Any], scratch: str) -> pa.Table:
    """The batch outputs, each verified then read: a Parquet part is read once into memory (it is one batch's rows)
    and hashed, counted and decoded from those bytes; a SQLite part is a file on disk."""
    tables = []
    for inp in spec["inputs"]:
        named_by = f"batch {inp['batch_id']}"
        if part_kind(inp["key"]) == "sqlite":
            t = read_sqlite(fetch_part(store, inp["key"], scratch, sha256=inp["sha256"], rows=inp["rows"],
                                       named_by=named_by))
        else:
            t = read_parquet_part(store, inp["key"], sha256=inp["sha256"], rows=inp["rows"], named_by=named_by)
        t = with_row_keys(t, spec["id_field"])
        tables.append(t.append_column(BATCH, pa.array(np.full(len(t), inp["ordinal"], dtype=np.int32))))
    return concat(tables)


def _files_below(store: Store, key: str, bucket: int | None, scratch: str, reader: str) -> list[dict[str, Any]]:
    """The files a finished merge wrote (those of partition ``bucket``, or all, in partition order), each fetched
    and verified against that merge's manifest ``key``: its entry there, with ``path``, the local copy."""
    below = store.get_json(key)
    if below is None:
        raise MergeInputMissing(f"{reader}: its input {store.uri(key)} is missing (the level below did not finish); "
                                f"run the aggregation again")
    buckets = [str(bucket)] if bucket is not None else sorted(below["files"], key=int)
    return [{**f, "path": fetch_part(store, f["key"], scratch, sha256=f["sha256"], rows=f["rows"],
                                     named_by=f"merge manifest {store.uri(key)}")}
            for f in (below["files"].get(b) for b in buckets) if f]


def _latest(files: list[dict[str, Any]], schemas: list[pa.Schema],
            id_field: str) -> tuple[np.ndarray | None, int, Dropped]:
    """Which rows of ``files`` (``_files_below``: one partition, in commit order) to keep. Files whose id ranges
    are disjoint share no item: each is one merge's output, deduplicated already, so all their rows are kept
    unread (sequential ids, the common case). Otherwise it is decided on the three columns ``dedupe`` needs, read
    from every file (a partition of a large job is most of its rows: its whole table, twice over in two merges at
    once, took the coordinator from ~300 MB to ~530 MB). Returns the mask (None: every row), the rows and what was
    dropped."""
    if disjoint([f.get("ids") for f in files]):
        return None, sum(f["rows"] for f in files), Dropped({}, {})
    wanted = [id_field, BATCH, LINE]
    keys = concat([_read(f["path"], [c for c in wanted if c in own.names]) for f, own in zip(files, schemas)])
    keep, dropped = latest_rows(keys, id_field)
    return keep, len(keys), dropped


def _kept(paths: list[str], schema: pa.Schema, keep: np.ndarray | None) -> Iterator[pa.Table]:
    """The rows of ``paths`` that ``keep`` keeps, in order, with ``schema``'s columns (``unify``), in record batches
    of at most ``READ_BATCH_ROWS``: one file open at a time, whatever the fan-in."""
    start = 0
    for path in paths:
        with pq.ParquetFile(path) as f:
            for rb in f.iter_batches(batch_size=READ_BATCH_ROWS):
                table = align(pa.Table.from_batches([rb]), schema)
                if keep is not None:
                    table = table.filter(pa.array(keep[start:start + len(table)]))
                start += rb.num_rows
                yield table


def _merge_upper(store: Store, spec: dict[str, Any], scratch: str) -> tuple[dict[str, dict[str, Any]], int, Dropped]:
    """A merge above level 1, streamed (``_latest``, ``_kept``): the same rows, in the same order and schema, as
    merging its inputs in memory."""
    reader = f"merge {spec['name']} of plan {spec['plan_id']}"
    files = [f for key in spec["inputs"] for f in _files_below(store, key, spec["bucket"], scratch, reader)]
    paths = [f["path"] for f in files]
    schemas = [pq.read_schema(path) for path in paths]
    schema = unify(schemas)
    keep, rows_in, dropped = _latest(files, schemas, spec["id_field"])
    if (rows_in if keep is None else int(keep.sum())) == 0:
        return {}, rows_in, dropped
    bucket = str(spec["bucket"] or 0)
    out = os.path.join(scratch, f"out-{bucket}.parquet")
    rows, ranges = 0, []
    with pq.ParquetWriter(out, schema, compression="zstd", compression_level=1) as writer:
        for table in _row_groups(_kept(paths, schema, keep)):
            writer.write_table(table)
            rows += len(table)
            ranges.append(id_range(table, spec["id_field"]))
    return {bucket: _stored_file(store, spec["files"][bucket], out, rows, span(ranges))}, rows_in, dropped


def _row_groups(tables: Iterator[pa.Table], rows: int = READ_BATCH_ROWS) -> Iterator[pa.Table]:
    """``tables`` gathered into tables of at least ``rows`` rows (the last may have fewer; none is empty), so
    filtered or small inputs make row groups of a useful size."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        if len(table):
            pending.append(table)
            held += len(table)
        if held >= rows:
            yield pa.concat_tables(pending)
            pending, held = [], 0
    if held:
        yield pa.concat_tables(pending)


def _read(path: str, columns: list[str] | None = None) -> pa.Table:
    """One local Parquet file, closed after (``pq.read_table`` would go through the dataset machinery: ~1 ms a
    file)."""
    with pq.ParquetFile(path) as f:
        return f.read(columns=columns)


def _finished(store: Store, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a unit (a merge, the layout) that finished before: its ``.done`` marker is there."""
    return store.get_json(spec["manifest"]) if store.exists(spec["done"]) else None


def run_merge(store: Store, spec: dict[str, Any]) -> dict[str, Any]:
    """One merge of the tree (``spec`` from ``AggregationPlan.merge_spec``); a finished one is skipped."""
    done = _finished(store, spec)
    if done is not None:
        return done
    with tempfile.TemporaryDirectory(prefix="slurmctl-merge-") as scratch:
        if spec["level"] > 1:
            files, rows_in, dropped = _merge_upper(store, spec, scratch)
            return _finish(store, spec, _body(spec, files, rows_in, dropped))
        table = _read_level1(store, spec, scratch)
        rows_in = len(table)
        table, dropped = dedupe(table, spec["id_field"])
        files = {}
        if spec["buckets"] > 1:
            of_row = buckets_of(table, spec["id_field"], spec["buckets"])
            order = np.argsort(of_row, kind="stable")  # each partition keeps commit order
            bounds = np.searchsorted(of_row[order], np.arange(spec["buckets"] + 1))
            pieces = {b: table.take(pa.array(order[bounds[b]:bounds[b + 1]])) for b in range(spec["buckets"])
                      if bounds[b + 1] > bounds[b]}
        else:
            pieces = {spec["bucket"] or 0: table} if len(table) else {}
        for b, piece in pieces.items():
            path = os.path.join(scratch, f"out-{b}.parquet")
            pq.write_table(piece, path, compression="zstd", compression_level=1)
            files[str(b)] = _stored_file(store, spec["files"][str(b)], path, len(piece),
                                         id_range(piece, spec["id_field"]))
    return _finish(store, spec, _body(spec, files, rows_in, dropped))


def _body(spec: dict[str, Any], files: dict[str, dict[str, Any]], rows_in: int, dropped: Dropped) -> dict[str, Any]:
    return {"plan_id": spec["plan_id"], "name": spec["name"], "level": spec["level"], "bucket": spec["bucket"],
            "files": files, "rows_in": rows_in, "rows": sum(f["rows"] for f in files.values()),
            "duplicates": {str(k): v for k, v in sorted(dropped.rows.items())},
            "superseded": {str(k): v for k, v in sorted(dropped.items.items())}}


class MergeChunk:
    """The merges one task run performs (``merge_spec``s), and its name. A plain object, not a dict: Prefect walks
    a task's dict and list arguments looking for futures, where the task is submitted and again where it runs
    (20 merges of 100 inputs: ~0.1 s before the task's body), and takes an object like this one as it is.
    (``quote`` would skip that walk too, but a ``DaskTaskRunner`` hands the task the wrapper itself.)"""

    def __init__(self, name: str, merges: list[dict[str, Any]]) -> None:
        self.name, self.merges = name, merges


@task(name="merge", task_run_name="{chunk.name}", cache_policy=NONE, persist_result=False, retries=2,
      retry_delay_seconds=2)
def merge_chunk(store: Store, chunk: MergeChunk, processes: int = 0) -> dict[str, dict[str, int]]:
    """Several merges of one level, one after another in this thread; returns what they dropped, per batch ordinal
    (small: usually empty): ``duplicates`` (rows) and ``superseded`` (item occurrences replaced by a later one of
    the same id). ``processes``: instead, queue them all to a pool of that many processes forked from the workers'
    template (``slurmctl.procpool``), which runs them side by side."""
    if processes:
        return dropped_by(procpool.starmap(processes, run_merge, [(store, spec) for spec in chunk.merges]))
    return dropped_by([run_merge(store, spec) for spec in chunk.merges])


def dropped_by(manifests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The rows and item occurrences that merges (their manifests) dropped, per batch ordinal. Merges finished by a
    release before ``superseded`` was recorded count none there."""
    out: dict[str, Counter[str]] = {"duplicates": Counter(), "superseded": Counter()}
    for m in manifests:
        for what, counter in out.items():
            counter.update(m.get(what) or {})
    return {what: dict(counter) for what, counter in out.items()}


# --- the final layout -----------------------------------------------------------------------------------------------
class RollingWriter:
    """Parquet files under one directory, a new one every ``max_rows`` rows; each file remembers its batches."""

    def __init__(self, directory: str, schema: pa.Schema, max_rows: int | None, single_name: str | None):
        self.directory, self.schema, self.max_rows, self.single_name = directory, schema, max_rows, single_name
        self.files: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None

    def open(self) -> None:
        name = self.single_name or f"part-{len(self.files):05d}.parquet"
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, name)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.files.append({"path": path, "rows": 0, "batches": set()})

    def write(self, table: pa.Table, batches: pa.Array) -> None:
        start = 0
        while start < len(table):
            if self.writer is None:
                self.open()
            current = self.files[-1]
            room = len(table) - start if self.max_rows is None else self.max_rows - current["rows"]
            take = min(room, len(table) - start)
            self.writer.write_table(table.slice(start, take))
            current["batches"].update(pc.unique(batches.slice(start, take)).to_pylist())
            current["rows"] += take
            start += take
            if self.max_rows is not None and current["rows"] >= self.max_rows:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _ranges(ordinals: set[int], batch_ids: list[str]) -> list[list[str]]:
    """Consecutive runs of batch ordinals as [first batch id, last batch id] (lineage of one file)."""
    out: list[list[int]] = []
    for o in sorted(ordinals):
        if out and out[-1][1] == o - 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return [[batch_ids[a], batch_ids[b]] for a, b in out]


def _partition_dir(column: str, value: Any) -> str:
    return f"{column}={HIVE_NULL if value is None else quote(str(value), safe='')}"


def write_output(store: Store, spec: dict[str, Any]) -> dict[str, Any]:
    """The top merge of every partition, streamed into the layout under the plan's ``final/`` prefix: each
    partition's last files (``partitions``: at most ``fan_in``, from the merges below) are deduplicated as a merge
    would (``_latest``) and their rows written in partition order, then commit order. Its manifest lists every file
    with rows, sha256 and lineage, how many rows of each batch it holds (the flow's row check) and, like a merge's,
    what it dropped."""
    done = _finished(store, spec)
    if done is not None:
        return done
    by = spec["partition_by"]
    per_batch: Counter[int] = Counter()
    dropped: Counter[int] = Counter()
    superseded: Counter[int] = Counter()
    with tempfile.TemporaryDirectory(prefix="slurmctl-output-") as scratch:
        reader = f"final layout of plan {spec['plan_id']}"
        groups = [[f for key in keys for f in _files_below(store, key, bucket, scratch, reader)]
                  for bucket, keys in spec["partitions"]]
        schemas = [[pq.read_schema(f["path"]) for f in files] for files in groups]
        full = unify(schema for group in schemas for schema in group)
        data_schema = pa.schema([f for f in full if f.name not in INTERNAL and f.name != by])
        if by is not None and by not in full.names:
            raise PartitionError(f"aggregate.partition_by: column {by!r} is not in the output (its columns: "
                                 f"{', '.join(n for n in full.names if n not in INTERNAL)})")
        out_dir = os.path.join(scratch, "out")
        writers: dict[str, RollingWriter] = {}

        def writer(rel: str) -> RollingWriter:
            if rel not in writers:
                if len(writers) >= spec["max_partitions"]:
                    raise PartitionError(f"aggregate.partition_by: column {by!r} has more than "
                                         f"{spec['max_partitions']} distinct values; raise aggregate.max_partitions "
                                         f"or partition by a coarser column")
                single = None if spec["max_rows_per_file"] or by else "data.parquet"
                writers[rel] = RollingWriter(os.path.join(out_dir, rel), data_schema, spec["max_rows_per_file"],
                                             single)
            return writers[rel]

        for files, own in zip(groups, schemas):
            keep, _, drop = _latest(files, own, spec["id_field"])
            dropped.update(drop.rows)
            superseded.update(drop.items)
            for table in _row_groups(_kept([f["path"] for f in files], full, keep)):
                batches = table[BATCH].combine_chunks()
                per_batch.update(dict(zip(*np.unique(batches.to_numpy(), return_counts=True))))
                data = table.select(data_schema.names)
                if by is None:
                    writer("").write(data, batches)
                    continue
                codes = pc.dictionary_encode(table[by].combine_chunks())
                idx = codes.indices.fill_null(-1).to_numpy()
                order = np.argsort(idx, kind="stable")
                values, starts = np.unique(idx[order], return_index=True)
                ends = list(starts[1:]) + [len(order)]
                for v, a, z in zip(values, starts, ends):
                    value = None if v < 0 else codes.dictionary[int(v)].as_py()
                    take = pa.array(order[a:z])
                    writer(_partition_dir(by, value)).write(data.take(take), batches.take(take))
        if not writers and by is None:
            writer("").open()  # no rows: still one (empty) file with the columns
        for w in writers.values():
            w.close()
        files = []
        for rel, w in sorted(writers.items()):
            for f in w.files:
                name = os.path.relpath(f["path"], out_dir)
                entry = _stored_file(store, spec["final_prefix"] + name, f["path"], f["rows"])
                files.append({**entry, "path": name, "partition": rel or None,
                              "batches": _ranges(f["batches"], spec["batch_ids"])})
    return _finish(store, spec, {"plan_id": spec["plan_id"], "files": files, "rows": sum(f["rows"] for f in files),
                                 "rows_per_batch": {str(int(k)): int(v) for k, v in sorted(per_batch.items())},
                                 "duplicates": {str(k): v for k, v in sorted(dropped.items())},
                                 "superseded": {str(k): v for k, v in sorted(superseded.items())}})


@task(name="write-output", task_run_name="write-output", cache_policy=NONE, persist_result=False, retries=2,
      retry_delay_seconds=2)
def layout_output(store: Store, spec: dict[str, Any], processes: int = 0) -> dict[str, Any]:
    """The final layout (``write_output``), in this thread, or with ``processes`` in one of the merges' processes
    (away from the GIL the caller's Prefect threads hold)."""
    body = procpool.starmap(processes, write_output, [(store, spec)])[0] if processes else write_output(store, spec)
    return {"files": len(body["files"]), "rows": body["rows"]}


def merge_all(store: Store, job_id: str, tasks: list[dict[str, Any]], cfg: AggregateConfig,
              id_field: str = "id") -> dict[str, Any]:
    """The whole tree in this process, without Prefect (unit tests, the overhead benchmark's baseline): the final
    layout's manifest."""
    plan = plan_aggregation(job_id, tasks, cfg, id_field)
    for level in plan.levels:
        for m in level:
            run_merge(store, plan.merge_spec(m, tasks))
    return write_output(store, plan.final_spec(tasks, cfg))


def concat_rejects(store: Store, tasks: list[dict[str, Any]], out_key: str) -> OutputFile | None:
    """All committed rejects, verified, in one JSONL file (None, and no file, when there are none)."""
    parts = [t for t in tasks if t.get("rejects")]
    if not parts:
        store.delete(out_key)
        return None
    return put_jsonl(store, out_key, b"".join(committed_rejects(store, t) for t in parts))


def put_jsonl(store: Store, out_key: str, data: bytes) -> OutputFile:
    store.put_bytes(out_key, data)
    return OutputFile(uri=store.uri(out_key), rows=data.count(b"\n"), bytes=len(data), sha256=sha256_bytes(data))
