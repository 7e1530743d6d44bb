"""Phase 4: merge the committed batch outputs into the final dataset and write the result manifest.

Before anything is merged the books must balance (``slurmctl.books.audit``): every planned batch — initial and retry
rounds — has a commit, and succeeded + failed + rejected items equal the input's items. Otherwise the run fails
naming the missing batches and the difference, and ``slurmctl resume`` finishes it. Every part is verified against
its task manifest as it is read, and the merged output must hold exactly the rows the committed batches wrote.

The aggregate also writes ``failures.jsonl``: every item that is not in the output and not rejected, with its error
class (items still deferred by the circuit breaker after the automatic retry rounds are listed as failed with the
class that tripped it).
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger

from slurmctl.books.audit import check as check_books
from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.books.manifests import Counts, Keys, ResultManifest
from slurmctl.books.store import load_job, save_job, store_for
from slurmctl.config import parse_config
from slurmctl.tasks.merge_outputs import merge_outputs, put_jsonl


class OutputMismatch(RuntimeError):
    """The merged output does not hold the rows the committed batches wrote."""


@flow(name="aggregate", log_prints=True)
def aggregate_phase(job_id: str, config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    keys = Keys(job_id)
    job = load_job(store, job_id)
    tasks = committed_tasks(store, job_id)
    state = failure_state(store, tasks)
    books = check_books(store, job, tasks, state)  # nothing is merged for a job that cannot complete
    merged = merge_outputs(store, job_id, tasks)
    rows = merged["output"]["rows"]
    if rows != books.rows_written:
        raise OutputMismatch(f"job {job_id}: the merged output {merged['output']['uri']} holds {rows} rows, but the "
                             f"committed batches wrote {books.rows_written} ({rows - books.rows_written:+d})")
    failures = None
    if state:
        lines = b"".join(json.dumps({k: v for k, v in r.items() if k != "item"}, default=str).encode() + b"\n"
                         for r in state.values())
        failures = put_jsonl(store, keys.failures, lines)
    else:
        store.delete(keys.failures)
    result = ResultManifest(
        job_id=job_id, outputs=[merged["output"]], rejects=merged["rejects"], failures=failures, rows=rows,
        batches=len(tasks), items_total=books.items_total, items_succeeded=books.items_succeeded,
        items_failed=books.items_failed, items_rejected=books.items_rejected)
    store.put_json(keys.result, result.model_dump(mode="json"))
    job.counts = Counts(batches_total=books.batches_planned, batches_done=len(tasks), items_total=books.items_total,
                        items_succeeded=books.items_succeeded, items_failed=books.items_failed, items_deferred=0,
                        items_rejected=books.items_rejected, rows_written=rows)
    save_job(store, job)
    get_run_logger().info("wrote %s rows to %s; %s items succeeded, %s failed, %s rejected (of %s)", rows,
                          merged["output"]["uri"], books.items_succeeded, books.items_failed, books.items_rejected,
                          books.items_total)
    return {"output": merged["output"]["uri"], "rows": rows}
