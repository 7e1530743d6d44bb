"""Phase 4: merge the committed batch outputs into the final dataset and write the result manifest.

The aggregate also settles the books from the manifests alone: the definitive counts, and ``failures.jsonl`` —
every item that is not in the output and not rejected, with its error class (items still deferred by the circuit
breaker after the automatic retry rounds are listed as failed with the class that tripped it).
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger

from slurmctl.config import parse_config
from slurmctl.failures import committed_tasks, failure_state
from slurmctl.jobs import load_job, save_job, store_for
from slurmctl.manifests import Counts, Keys, ResultManifest
from tasks.merge_outputs import merge_outputs, put_jsonl


@flow(name="aggregate", log_prints=True)
def aggregate_phase(job_id: str, config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    keys = Keys(job_id)
    tasks = committed_tasks(store, job_id)
    merged = merge_outputs(store, job_id, tasks)
    state = failure_state(store, tasks)
    failures = None
    if state:
        lines = b"".join(json.dumps({k: v for k, v in r.items() if k != "item"}, default=str).encode() + b"\n"
                         for r in state.values())
        failures = put_jsonl(store, keys.failures, lines)
    else:
        store.delete(keys.failures)
    succeeded = sum(t.get("items_succeeded", 0) for t in tasks)
    rejected = sum(t.get("items_rejected", 0) for t in tasks)
    result = ResultManifest(
        job_id=job_id, outputs=[merged["output"]], rejects=merged["rejects"], failures=failures,
        rows=merged["output"]["rows"], batches=len(tasks), items_succeeded=succeeded, items_failed=len(state),
        items_rejected=rejected)
    store.put_json(keys.result, result.model_dump(mode="json"))
    job = load_job(store, job_id)
    job.counts = Counts(batches_total=job.counts.batches_total, batches_done=len(tasks),
                        items_total=job.counts.items_total, items_succeeded=succeeded, items_failed=len(state),
                        items_deferred=0, items_rejected=rejected, rows_written=merged["output"]["rows"])
    save_job(store, job)
    get_run_logger().info("wrote %s rows to %s; %s items failed, %s rejected", result.rows,
                          merged["output"]["uri"], len(state), rejected)
    return {"output": merged["output"]["uri"], "rows": result.rows}
