"""Phase 1: stream the input once and write the batch plan (one object, whatever the number of batches)."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger

from slurmctl.books.manifests import Keys
from slurmctl.books.store import load_job, store_for, update_job
from slurmctl.config import parse_config
from slurmctl.records import partition


@flow(name="partition", flow_run_name="{job_id} / partition", log_prints=True)
def partition_phase(job_id: str, config: dict[str, Any]) -> int:
    """Cut the input into batch descriptions; idempotent (a resumed job reuses the plan it already has)."""
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    keys = Keys(job_id)
    job = load_job(store, job_id)
    if store.exists(keys.plan) and job.counts.batches_total:
        return job.counts.batches_total
    with store.open_uri(cfg.input.uri) as f:
        plan = partition(f, cfg.input.format, cfg.batch_size)
    store.put_bytes(keys.plan, b"".join(json.dumps(b.to_dict()).encode() + b"\n" for b in plan.batches))
    counts = job.counts.model_copy(update={"batches_total": len(plan.batches), "items_total": plan.records})
    update_job(store, job_id, counts=counts)
    get_run_logger().info("partitioned %s records (%s bytes) into %s batches of up to %s",
                          plan.records, plan.input_bytes, len(plan.batches), cfg.batch_size)
    return len(plan.batches)
