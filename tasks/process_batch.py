"""The unit of work: run the handler over one batch's items and commit the batch's output and task manifest.

The task returns a small summary (counts and keys), never the data: at 50k batches the coordinator holds only these.
Item-level exceptions never fail the batch; they become failure records. Only infrastructure faults (store
unreachable, unreadable input) raise, and Prefect's task ``retries`` cover those.
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE
from prefect.context import get_run_context
from prefect.logging import get_run_logger

from blocks.manifest_store import ManifestStore, sha256_bytes
from slurmctl.config import JobConfig
from slurmctl.handler import BatchContext, load_handler, normalise_output
from slurmctl.manifests import Keys, TaskManifest, now
from slurmctl.records import BatchSpec, read_batch


@functools.lru_cache(maxsize=16)
def _handler(spec: str):
    # One import per worker process, not one per batch.
    return load_handler(spec)


def rows_to_parquet(rows: list[dict[str, Any]]) -> bytes:
    """Rows (dicts, possibly with differing keys) as Parquet bytes; columns are the union of keys in first-seen order."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    arrays = {}
    for c in columns:
        try:
            arrays[c] = pa.array([r.get(c) for r in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TypeError(f"output column {c!r} has values of mixed types: {exc}") from None
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays), buf, compression="zstd")
    return buf.getvalue()


def jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, default=str).encode() + b"\n" for r in records)


def run_batch(cfg: JobConfig, store: ManifestStore, spec: BatchSpec, *, logger: Any = None,
              run_ids: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    """Process one batch and write its output, rejects, failures and task manifest; return the summary.

    Plain function (no Prefect) so benchmarks and unit tests can call it; ``process_batch`` wraps it as a task.
    """
    started, t0 = now(), time.perf_counter()
    keys = Keys(cfg.job_id)
    attempt = uuid.uuid4().hex[:12]
    handler = _handler(cfg.handler)
    id_field = cfg.input.id_field
    sliced = read_batch(store.open_uri, store.read_range, cfg.input.uri, cfg.input.format, spec, id_field)
    ctx = BatchContext(cfg.job_id, spec.batch_id, params=cfg.params, logger=logger)

    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for line, item in sliced.items:
        try:
            rows.extend(normalise_output(handler(item, ctx), item, id_field))
        except Exception as exc:  # an item's failure is recorded, never the batch's
            failures.append({"id": item.get(id_field), "line": line, "batch_id": spec.batch_id,
                             "error_class": "handler", "error_type": type(exc).__name__,
                             "message": str(exc)[:1000], "attempts": 1})

    manifest = TaskManifest(
        job_id=cfg.job_id, batch_id=spec.batch_id, task_id=f"task-{spec.index:06d}", status="succeeded",
        input_digest=sliced.digest, started_at=started, finished_at=started, items=spec.records,
        items_succeeded=len(sliced.items) - len(failures), items_failed=len(failures),
        items_rejected=len(sliced.rejects), rows_written=len(rows), host=socket.gethostname(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"), flow_run_id=run_ids[0], task_run_id=run_ids[1],
        attempt=attempt)
    written: list[str] = []
    if rows:
        data = rows_to_parquet(rows)
        manifest.output, manifest.output_sha256 = keys.batch_output(spec.batch_id, attempt), sha256_bytes(data)
        store.put_bytes(manifest.output, data)
        written.append(manifest.output)
    if sliced.rejects:
        for r in sliced.rejects:
            r["batch_id"] = spec.batch_id
        manifest.rejects = keys.batch_rejects(spec.batch_id, attempt)
        store.put_bytes(manifest.rejects, jsonl_bytes(sliced.rejects))
        written.append(manifest.rejects)
    if failures:
        manifest.failures = keys.batch_failures(spec.batch_id, attempt)
        store.put_bytes(manifest.failures, jsonl_bytes(failures))
        written.append(manifest.failures)

    elapsed = time.perf_counter() - t0
    manifest.metrics = {**dict(ctx.metrics), "seconds": round(elapsed, 4)}
    manifest.finished_at = now()
    # The task manifest is the batch's commit: written last, create-if-absent, after everything it points to.
    # If another attempt (a zombie worker, a duplicate submission) committed first, ours is discarded.
    if not store.put_json(keys.task(spec.batch_id), manifest.model_dump(mode="json"), if_absent=True):
        for key in written:
            store.delete(key)
        winner = store.get_json(keys.task(spec.batch_id)) or {}
        return {**summary_of(winner), "duplicate": True}
    return summary_of(manifest.model_dump(mode="json"))


SUMMARY_FIELDS = ("batch_id", "status", "items_succeeded", "items_failed", "items_rejected", "rows_written",
                  "slurm_job_id", "host")


def summary_of(task_manifest: dict[str, Any]) -> dict[str, Any]:
    """The few fields of a task manifest the coordinator keeps (a task's return value: keys and counts, not data)."""
    return {k: task_manifest.get(k) for k in SUMMARY_FIELDS}


@task(name="process-batch", task_run_name="{spec[batch_id]}", cache_policy=NONE, persist_result=False, retry_delay_seconds=[2, 10, 30])
def process_batch(cfg: JobConfig, store: ManifestStore, spec: dict[str, Any]) -> dict[str, Any]:
    ctx = get_run_context()
    ids = (str(ctx.task_run.flow_run_id), str(ctx.task_run.id))
    return run_batch(cfg, store, BatchSpec.from_dict(spec), logger=get_run_logger(), run_ids=ids)
