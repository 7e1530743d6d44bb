"""Phase 1: stream the input once and write the batch plan (one object, whatever the number of batches)."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger

from slurmctl.blocks.manifest_store import ManifestStore
from slurmctl.books.input_chunks import Chunker, decompressing
from slurmctl.books.manifests import Keys
from slurmctl.books.store import load_job, store_for, update_job
from slurmctl.config import JobConfig, parse_config
from slurmctl.flows import cancel
from slurmctl.records import Plan, partition


@flow(name="partition", flow_run_name="{job_id} / partition", log_prints=True)
@cancel.cancellable
def partition_phase(job_id: str, config: dict[str, Any]) -> int:
    """Cut the input into batch descriptions; idempotent (a resumed job reuses the plan it already has)."""
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    keys = Keys(job_id)
    job = load_job(store, job_id)
    if store.exists(keys.plan) and job.counts.batches_total:
        return job.counts.batches_total
    plan = plan_input(store, cfg)
    store.put_bytes(keys.plan, b"".join(json.dumps(b.to_dict()).encode() + b"\n" for b in plan.batches))
    counts = job.counts.model_copy(update={"batches_total": len(plan.batches), "items_total": plan.records})
    update_job(store, job_id, counts=counts)
    get_run_logger().info("partitioned %s records (%s bytes) into %s batches of up to %s",
                          plan.records, plan.input_bytes, len(plan.batches), cfg.batch_size)
    return len(plan.batches)


def plan_input(store: ManifestStore, cfg: JobConfig) -> Plan:
    """Stream the input once into batch slices. A Parquet input's identity (``ManifestStore.input_identity``) is
    taken first and recorded in every batch: taken before the file is read, a file rewritten meanwhile fails the
    check in its batches instead of passing it."""
    identity = store.input_identity(cfg.input.uri) if cfg.input.format == "parquet" else ""
    with store.open_uri(cfg.input.uri) as f:
        if cfg.input.compressed:  # streamed once, its batches written again as chunks a shard opens alone
            chunker = Chunker(store, cfg.job_id, decompressing(f, cfg.input.compression))
            plan = partition(chunker, cfg.input.format, cfg.batch_size, on_batch=chunker.add)  # type: ignore[arg-type]
            chunks = chunker.finish(plan)
            get_run_logger().info("compressed input (%s): %s bytes of records in %s chunks", cfg.input.compression,
                                  plan.input_bytes, chunks)
            return plan
        return partition(f, cfg.input.format, cfg.batch_size, input_identity=identity)
