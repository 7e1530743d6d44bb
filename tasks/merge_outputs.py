"""Merge committed batch outputs into the job's final Parquet dataset, streaming one part at a time.

This is the plain merge of the walking skeleton; the hierarchical, restartable version replaces it in a later
phase. Only parts named by committed task manifests are read, so orphaned attempts (a zombie's output) never leak
into the result, and each is verified against its task manifest first (``slurmctl.books.parts``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE

from slurmctl.blocks.manifest_store import ManifestStore
from slurmctl.books.manifests import Keys, OutputFile
from slurmctl.books.parts import committed_output, committed_rejects


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def unify(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for all parts: union of columns, null-typed columns promoted to their typed counterparts."""
    return pa.unify_schemas(schemas, promote_options="permissive")


def merge_parquet(store: ManifestStore, tasks: list[dict[str, Any]], out_key: str) -> OutputFile:
    """Concatenate the committed outputs of ``tasks`` (in the given order) into ``out_key``.

    Every part is fetched once, verified against its task manifest (sha256, row count) and spooled to local disk;
    the schemas are unified, then the spooled parts are written out. Memory holds one part at a time.
    """
    parts = [t for t in tasks if t.get("output")]
    rows = 0
    with tempfile.TemporaryDirectory(prefix="slurmctl-merge-") as spool:
        schemas = []
        for i, t in enumerate(parts):
            data = committed_output(store, t)
            schemas.append(pq.read_schema(io.BytesIO(data)))
            with open(os.path.join(spool, f"{i}.parquet"), "wb") as f:
                f.write(data)
        schema = unify(schemas) if schemas else pa.schema([])
        tmp = os.path.join(spool, "merged.parquet")
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for i in range(len(parts)):
                table = pq.read_table(os.path.join(spool, f"{i}.parquet"))
                table = pa.table({f.name: (table[f.name].cast(f.type) if f.name in table.column_names
                                           else pa.nulls(len(table), f.type)) for f in schema}, schema=schema)
                writer.write_table(table)
                rows += len(table)
        size, digest = os.path.getsize(tmp), _file_digest(tmp)
        with open(tmp, "rb") as f:
            store.put_bytes(out_key, f.read())
    return OutputFile(uri=store.uri(out_key), rows=rows, bytes=size, sha256=digest)


def concat_rejects(store: ManifestStore, tasks: list[dict[str, Any]], out_key: str) -> OutputFile | None:
    """All committed rejects, verified, in one JSONL file (None, and no file, when there are none)."""
    parts = [t for t in tasks if t.get("rejects")]
    if not parts:
        store.delete(out_key)
        return None
    return put_jsonl(store, out_key, b"".join(committed_rejects(store, t) for t in parts))


def put_jsonl(store: ManifestStore, out_key: str, data: bytes) -> OutputFile:
    store.put_bytes(out_key, data)
    return OutputFile(uri=store.uri(out_key), rows=data.count(b"\n"), bytes=len(data),
                      sha256="sha256:" + hashlib.sha256(data).hexdigest())


@task(name="merge-outputs", cache_policy=NONE, persist_result=False, retries=2, retry_delay_seconds=5)
def merge_outputs(store: ManifestStore, job_id: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    keys = Keys(job_id)
    # tasks come in commit order (initial batches, then retry rounds): the output keeps that order
    output = merge_parquet(store, tasks, keys.output)
    rejects = concat_rejects(store, tasks, keys.rejects)
    return {"output": output.model_dump(), "rejects": rejects and rejects.model_dump()}
