"""Phase 3: a retry round over the items that failed with chosen error classes, or were deferred by the breaker.

A round's plan (``retry/round-NN.plan.jsonl``: one ``{"line", "item", "previous"}`` per item) is written once;
its batches (task group ``retry_batch_N``) are slices of that plan, processed in shards by the same
``process_shard`` task with the same commit protocol. Their successes join the job's output; what fails again stays listed with its class.
A resumed round reuses its plan and skips its committed batches.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger

from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.books.manifests import Keys, now
from slurmctl.books.shards import Budget
from slurmctl.books.store import load_job, read_round_batches, save_job, store_for
from slurmctl.config import parse_config
from slurmctl.flows import cancel
from slurmctl.flows.process import run_batches
from slurmctl.records import BatchSpec


def plan_round(store: Any, job_id: str, round_no: int, classes: set[str], include_deferred: bool,
               batch_size: int) -> list[BatchSpec]:
    """Write the round's plan (once) and return its batch specs."""
    keys = Keys(job_id)
    plan_key = keys.retry_plan(round_no)
    specs_key = keys.retry_batches(round_no)
    existing = read_round_batches(store, job_id, round_no)
    if existing is not None:
        return existing
    state = failure_state(store, committed_tasks(store, job_id))
    chosen = [r for r in state.values()
              if (r["state"] == "deferred" and include_deferred) or (r["state"] == "failed" and r["error_class"] in classes)]
    lines = [json.dumps({"line": r["line"], "item": r["item"], "previous": r["state"]}, default=str).encode() + b"\n"
             for r in chosen]
    specs, pos = [], 0
    for i in range(0, len(lines), batch_size):
        chunk = lines[i:i + batch_size]
        size = sum(map(len, chunk))
        specs.append(BatchSpec(batch_id=f"r{round_no:02d}-batch-{i // batch_size:06d}", index=i // batch_size,
                               start=pos, end=pos + size, first_line=0, records=len(chunk), source=plan_key,
                               group=f"retry_batch_{round_no}"))
        pos += size
    store.put_bytes(plan_key, b"".join(lines))
    store.put_bytes(specs_key, b"".join(json.dumps(s.to_dict()).encode() + b"\n" for s in specs))
    return specs


@flow(name="retry", flow_run_name="{job_id} / retry {round_no}", log_prints=True)
@cancel.cancellable
def retry_phase(job_id: str, config: dict[str, Any], round_no: int, classes: list[str],
                include_deferred: bool = True) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    logger = get_run_logger()
    job = load_job(store, job_id)
    rounds = {r["round"]: r for r in job.retry_rounds}
    specs = plan_round(store, job_id, round_no, set(classes), include_deferred, cfg.batch_size)
    if round_no not in rounds:
        rounds[round_no] = {"round": round_no, "classes": sorted(classes), "include_deferred": include_deferred,
                            "items": sum(s.records for s in specs), "batches": len(specs), "started_at": now(),
                            "finished_at": None}
        job.counts.batches_total += len(specs)
    job.retry_rounds = [rounds[k] for k in sorted(rounds)]
    save_job(store, job)
    logger.info("retry round %s: %s items in %s batches (classes %s%s)", round_no, rounds[round_no]["items"],
                len(specs), ",".join(sorted(classes)) or "-", ", deferred" if include_deferred else "")
    failed = run_batches(cfg, store, job, specs, max_shards=Budget.of(cfg).retry_round)
    rounds[round_no]["finished_at"] = now()
    job.retry_rounds = [rounds[k] for k in sorted(rounds)]
    save_job(store, job)
    return {"round": round_no, "batches": len(specs), "batches_failed": len(failed), "failed": failed[:100],
            "items_deferred": job.counts.items_deferred}
