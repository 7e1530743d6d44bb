"""What a batch stopped mid-way by SIGTERM had done: the finer recovery point inside a batch.

A batch is the unit of commit: its task manifest is written once, create-if-absent, naming every item's outcome. A
Slurm worker told to stop (preemption, ``scancel``, the walltime reached anyway) has ``KillWait`` seconds before its
SIGKILL, often less than a batch. So a batch that hears SIGTERM starts no further item, lets the items in flight
finish within that grace, and saves what they did as a *checkpoint*: the input lines with an outcome, their rows
(Parquet, checksummed), their failure records and the handler calls they took. It does not commit. The coordinator
queues the batch again at once; the next attempt (its commit check on) reads the latest checkpoint, runs only the
other items, and commits the whole batch, the checkpoint's rows and failures included: one commit per batch as
always, so the books, the aggregation and every reader stay as they were, and no item's handler runs twice.

* Checkpoints of a batch form a chain (``0001.json``, ``0002.json``, ...), each written create-if-absent and holding
  everything done so far (a batch stopped twice carries the first checkpoint's outcomes into the second). Two
  attempts racing for the same number: one wins, the other's outcomes are dropped (its items run again; the output
  still holds each once).
* A checkpoint is only ever read by an attempt of the same batch whose input slice has the same digest, and is only
  a shortcut: whichever attempt commits the batch, its task manifest alone is the truth. A checkpoint never
  committed into a batch (a zombie's, one superseded) is garbage that changes nothing.
"""

from __future__ import annotations

import io
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from slurmctl.books.manifests import Keys
from slurmctl.books.parts import PartCorrupt, PartMissing
from slurmctl.storage import Store, sha256_bytes
from slurmctl.tables import LINE, ROW, rows_table


@dataclass
class Checkpoint:
    """The outcomes of a batch's first items, as one attempt of it saved them before it stopped."""

    batch_id: str
    input_digest: str
    done: set[int] = field(default_factory=set)  # input lines with an outcome (succeeded or failed)
    succeeded: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # each row's input line and index within its item's output
    row_index: list[int] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    api_calls: int = 0
    n: int = 0  # its number in the batch's chain (0: none saved yet)
    key: str | None = None


def checkpointed_batches(store: Store, job_id: str) -> set[str]:
    """Batches with a checkpoint (one listing): the attempts that run them read it first."""
    prefix = Keys(job_id).checkpoints_prefix
    return {key[len(prefix):].split("/", 1)[0] for key in store.list_keys(prefix) if key.endswith(".json")}


def ran_before(store: Store, job_id: str, task_run_id: str | None) -> bool:
    """Has this shard's task run executed before, anywhere? Noted at each start (one small object per shard run,
    written only if absent: the write answers).

    Dask runs a finished task again when the worker holding its result dies before the coordinator gathered it: a
    worker stopped by SIGTERM hands its batch on with a checkpoint, and the SIGKILL that follows takes the shard's
    result with it. That is lost data, not a failure (``allowed-failures`` does not apply), and Prefect counts the
    new execution as a first run (``run_count`` 1): without this note it ran the checkpoint's items again, and
    would have run a batch committed there again (the commit refused, its calls spent)."""
    if not task_run_id:
        return False
    note = {"task_run_id": task_run_id, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    return not store.put_json(Keys(job_id).shard_run(task_run_id), note, if_absent=True)  # one create-if-absent


def latest(store: Store, job_id: str, batch_id: str, input_digest: str) -> Checkpoint | None:
    """The batch's latest checkpoint, verified (its checksum, its rows' sha256 and count), or None. One listing of
    the batch's folder; a checkpoint of other input bytes (cannot happen: the slice's digest is checked first) is an
    error, never silently used."""
    keys = Keys(job_id)
    prefix = f"{keys.checkpoints_prefix}{batch_id}/"
    numbered = sorted(k for k in store.list_keys(prefix) if k.endswith(".json"))
    if not numbered:
        return None
    key = numbered[-1]
    body = store.get_json(key)  # checksum verified
    if body is None:
        raise PartMissing(f"checkpoint {store.uri(key)} was listed but cannot be read")
    if body.get("input_digest") != input_digest:
        raise PartCorrupt(f"checkpoint {store.uri(key)} is of input {body.get('input_digest')}, but batch "
                          f"{batch_id} now reads {input_digest}")
    cp = Checkpoint(batch_id, input_digest, set(body["done"]), int(body["succeeded"]), failed=body["failed"],
                    api_calls=int(body.get("api_calls") or 0), n=int(body["n"]), key=key)
    if body.get("rows"):
        data = store.get_bytes(body["rows"])
        if data is None:
            raise PartMissing(f"rows {store.uri(body['rows'])} of checkpoint {store.uri(key)} are missing")
        if sha256_bytes(data) != body["rows_sha256"]:
            raise PartCorrupt(f"rows {store.uri(body['rows'])} of checkpoint {store.uri(key)} differ from the "
                              f"sha256 it recorded")
        table = pq.read_table(io.BytesIO(data))
        if table.num_rows != body["rows_written"]:
            raise PartCorrupt(f"rows {store.uri(body['rows'])} hold {table.num_rows} rows, not "
                              f"{body['rows_written']}")
        cp.lines, cp.row_index = table.column(LINE).to_pylist(), table.column(ROW).to_pylist()
        cp.rows = table.drop_columns([LINE, ROW]).to_pylist()
    return cp


def save(store: Store, job_id: str, cp: Checkpoint) -> str | None:
    """Write ``cp`` as the next checkpoint of its batch (create-if-absent, rows first); its key, or None when
    another attempt saved that number first (ours is dropped: its items run again)."""
    keys = Keys(job_id)
    attempt = uuid.uuid4().hex[:12]
    body: dict[str, Any] = {"schema_version": 1, "kind": "checkpoint", "job_id": job_id, "batch_id": cp.batch_id,
                            "n": cp.n + 1, "attempt": attempt, "input_digest": cp.input_digest,
                            "done": sorted(cp.done), "succeeded": cp.succeeded, "failed": cp.failed,
                            "api_calls": cp.api_calls, "rows": None, "rows_sha256": None, "rows_written": len(cp.rows)}
    if cp.rows:
        buf = io.BytesIO()
        pq.write_table(rows_table(cp.rows, cp.lines, cp.row_index), buf, compression="zstd")
        data = buf.getvalue()
        body["rows"], body["rows_sha256"] = keys.checkpoint_rows(cp.batch_id, attempt), sha256_bytes(data)
        store.put_bytes(body["rows"], data)
    key = keys.checkpoint(cp.batch_id, cp.n + 1)
    if store.put_json(key, body, if_absent=True):
        return key
    if body["rows"]:
        store.delete(body["rows"])
    return None
