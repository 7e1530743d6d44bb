"""Reading a committed part back: checked against what its task manifest says was written, before anything uses it.

A part is a file a committed batch points to: its output rows (Parquet), its rejects (JSONL) or its retry manifest
(JSON, checksummed by the store itself). The task manifest records each part's sha256 and row count when the batch
commits; every reader (the merges, the failure state) goes through ``read_part`` or ``fetch_part`` so a part that was
truncated, replaced or lost is an error naming the file, never empty bytes or silently different data.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from slurmctl.storage import Store, sha256_bytes
from slurmctl.tables import count_part_rows, file_digest, part_kind, read_parquet_bytes

PartFormat = Literal["parquet", "sqlite", "jsonl"]


class PartError(RuntimeError):
    """A committed part is missing or differs from what its task manifest recorded."""


class PartMissing(PartError):
    pass


class PartCorrupt(PartError):
    pass


def _verify(store: Store, key: str, named_by: str, fmt: str, sha256: str | None, digest: Callable[[], str],
            rows: int | None, count: Callable[[], int]) -> None:
    """The one check every reader of a part makes: sha256 as recorded (when recorded), ``rows`` rows (when given)."""
    uri = _Uri(store, key)
    if sha256 is not None:
        got = digest()
        if got != sha256:
            raise PartCorrupt(f"part {uri} (named by {named_by}) has sha256 {got}, but {sha256} was recorded: the "
                              f"file was changed or damaged after it was written")
    if rows is not None:
        try:
            got_rows = count()
        except Exception as exc:  # unreadable Parquet footer, not a database, and the like
            raise PartCorrupt(f"part {uri} (named by {named_by}) is not readable {fmt}: {exc}") from None
        if got_rows != rows:
            raise PartCorrupt(f"part {uri} (named by {named_by}) holds {got_rows} rows, but {rows} were recorded")


class _Uri:
    """A part's URI for an error message, built only if one is raised (a merge verifies thousands of parts)."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key

    def __str__(self) -> str:
        return self.store.uri(self.key)


def _missing(uri: str, named_by: str) -> PartMissing:
    return PartMissing(f"part {uri} (named by {named_by}) is missing; the job's output cannot be trusted until it is "
                       f"restored or the batch is run again")


def read_part(store: Store, key: str, *, fmt: PartFormat, sha256: str | None, rows: int | None,
              named_by: str = "its task manifest") -> bytes:
    """The part's bytes, verified: present, sha256 as recorded (when recorded), ``rows`` rows (when given).

    ``named_by`` says which manifest committed the part, for the error message. Small parts (rejects); outputs go
    through ``fetch_part``.
    """
    data = store.get_bytes(key)
    if data is None:
        raise _missing(store.uri(key), named_by)
    _verify(store, key, named_by, fmt, sha256, lambda: sha256_bytes(data), rows,
            lambda: data.count(b"\n") if fmt == "jsonl" else pq.ParquetFile(io.BytesIO(data)).metadata.num_rows)
    return data


def read_parquet_part(store: Store, key: str, *, sha256: str | None, rows: int | None,
                      named_by: str) -> pa.Table:
    """A small Parquet part (one batch's rows) as a table, verified like ``read_part``; decoded once, and its rows
    counted on the decoded table."""
    data = store.get_bytes(key)
    if data is None:
        raise _missing(store.uri(key), named_by)
    decoded: list[pa.Table] = []
    _verify(store, key, named_by, "parquet", sha256, lambda: sha256_bytes(data), rows,
            lambda: decoded.append(read_parquet_bytes(data)) or decoded[0].num_rows)
    return decoded[0] if decoded else read_parquet_bytes(data)


def fetch_part(store: Store, key: str, scratch: str, *, sha256: str | None, rows: int | None,
               named_by: str) -> str:
    """A local path to the part ``key`` (in place for a local store, else streamed into ``scratch``), verified
    like ``read_part`` before anyone reads it. Parquet or SQLite."""
    path = store.local_path(key)
    if path is None:
        path = os.path.join(scratch, key.replace("/", "__"))
        found = store.get_file(key, path)
    else:
        found = os.path.isfile(path)
    if not found:
        raise _missing(store.uri(key), named_by)
    kind = part_kind(key)
    _verify(store, key, named_by, kind, sha256, lambda: file_digest(path), rows,
            lambda: count_part_rows(path, kind))
    return path


def output_sha256(task: dict[str, Any]) -> str:
    """The sha256 a committed batch recorded for its output; a manifest naming an output without one is damaged."""
    if not task.get("output_sha256"):
        raise PartCorrupt(f"task manifest of {task.get('batch_id')} names output {task.get('output')} without its "
                          f"output_sha256: the manifest is damaged")
    return task["output_sha256"]


def committed_output(store: Store, task: dict[str, Any], scratch: str) -> str:
    """A committed batch's output rows (Parquet or SQLite), verified against its task manifest: a local path."""
    return fetch_part(store, task["output"], scratch, sha256=output_sha256(task), rows=task.get("rows_written"),
                      named_by=f"batch {task.get('batch_id')}")


def committed_rejects(store: Store, task: dict[str, Any]) -> bytes:
    """A committed batch's rejects (JSONL), verified. Manifests from before ``rejects_sha256`` get a row check only."""
    return read_part(store, task["rejects"], fmt="jsonl", sha256=task.get("rejects_sha256"),
                     rows=task.get("items_rejected"), named_by=f"batch {task.get('batch_id')}")


def committed_retry(store: Store, task: dict[str, Any]) -> dict[str, Any]:
    """A committed batch's retry manifest (checksummed JSON): failed and deferred items."""
    body = store.get_json(task["retry"])
    if body is None:
        raise PartMissing(f"committed retry manifest {store.uri(task['retry'])} (named by batch "
                          f"{task.get('batch_id')}) is missing: its failed and deferred items cannot be listed")
    failed, deferred = len(body.get("failed", [])), len(body.get("deferred", []))
    if (failed, deferred) != (task.get("items_failed", failed), task.get("items_deferred", deferred)):
        raise PartCorrupt(f"committed retry manifest {store.uri(task['retry'])} lists {failed} failed and "
                          f"{deferred} deferred items, but batch {task.get('batch_id')} committed "
                          f"{task.get('items_failed')} and {task.get('items_deferred')}")
    return body
