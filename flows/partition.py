"""Phase 1: stream the input once and write the batch plan (one object, whatever the number of batches)."""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect import flow, get_run_logger

from slurmctl.books import input_files
from slurmctl.books.input_chunks import Chunker, decompressing
from slurmctl.books.manifests import Keys
from slurmctl.books.store import load_job, store_for, update_job
from slurmctl.config import JobConfig, parse_config
from slurmctl.flows import cancel
from slurmctl.records import Plan, partition
from slurmctl.storage import Store


@flow(name="partition", flow_run_name="{job_id} / partition", log_prints=True)
@cancel.cancellable
def partition_phase(job_id: str, config: dict[str, Any]) -> int:
    """Cut the input into batch descriptions; idempotent (a resumed job reuses the plan it already has)."""
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    keys = Keys(job_id)
    job = load_job(store, job_id)
    if store.exists(keys.plan) and job.counts.batches_total:
        if cfg.input.many:  # a resume: the files must still be those listed (a file added or changed is an error)
            input_files.check_unchanged(store, job_id, cfg.input)
        return job.counts.batches_total
    plan = plan_input(store, cfg)
    store.put_bytes(keys.plan, b"".join(json.dumps(b.to_dict()).encode() + b"\n" for b in plan.batches))
    counts = job.counts.model_copy(update={"batches_total": len(plan.batches), "items_total": plan.records})
    update_job(store, job_id, counts=counts)
    get_run_logger().info("partitioned %s records (%s bytes) into %s batches of up to %s",
                          plan.records, plan.input_bytes, len(plan.batches), cfg.batch_size)
    return len(plan.batches)


def _log() -> Any:
    try:
        return get_run_logger()
    except Exception:  # called outside a flow run (tests, benchmarks)
        return logging.getLogger("slurmctl.flows.partition")


def plan_input(store: Store, cfg: JobConfig) -> Plan:
    """Stream the input once into batch slices: one file, or each file of many in turn (``books.input_files``: the
    listing is recorded first). A Parquet file's identity (``Store.input_identity``) is taken before it is
    read and recorded in its batches: a file rewritten meanwhile fails the check in its batches instead of passing
    it."""
    if not cfg.input.many:
        identity = store.input_identity(cfg.input.uri) if cfg.input.format == "parquet" else ""
        return plan_file(store, cfg, cfg.input.uri, identity, cfg.input.compression, Plan())
    files = input_files.list_input(store, cfg.input)
    input_files.record(store, cfg.job_id, files)
    plan = Plan()
    for f in files:
        plan_file(store, cfg, f.uri, f.identity, cfg.input.compression_of(f.uri), plan, many=True)
    _log().info("input of %s files: %s records", len(files), plan.records)
    return plan


def plan_file(store: Store, cfg: JobConfig, uri: str, identity: str, compression: str | None, plan: Plan,
              many: bool = False) -> Plan:
    """Cut one file into batches appended to ``plan`` (numbered on, lines job-wide); a compressed one is streamed
    once and its batches written again as chunks a shard opens alone (``books.input_chunks``)."""
    fmt, size = cfg.input.format or "", cfg.batch_size
    where = {"first_index": len(plan.batches), "line_base": plan.lines, "file": uri if many else ""}
    with store.open_uri(uri) as f:
        if compression not in (None, "none"):
            chunker = Chunker(store, cfg.job_id, decompressing(f, compression), first_chunk=plan.chunks)
            part = partition(chunker, fmt, size, on_batch=chunker.add, **where)  # type: ignore[arg-type]
            chunks = part.chunks = chunker.finish(part)
            _log().info("%s (%s): %s bytes of records in %s chunks", uri, compression, part.input_bytes,
                                  chunks)
        else:
            part = partition(f, fmt, size, input_identity=identity if fmt == "parquet" else "", **where)
    plan.batches += part.batches
    plan.records += part.records
    plan.input_bytes += part.input_bytes
    plan.lines += part.lines
    plan.chunks += part.chunks
    return plan
