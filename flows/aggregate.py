"""Phase 3: merge the committed batch outputs into the final dataset and write the result manifest."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.process import committed_batches
from slurmctl.config import parse_config
from slurmctl.jobs import store_for
from slurmctl.manifests import Keys, ResultManifest
from tasks.merge_outputs import merge_outputs


@flow(name="aggregate", log_prints=True)
def aggregate_phase(job_id: str, config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    keys = Keys(job_id)
    tasks = [store.get_json(keys.task(b)) for b in committed_batches(store, job_id)]
    merged = merge_outputs(store, job_id, [t for t in tasks if t])
    result = ResultManifest(
        job_id=job_id, outputs=[merged["output"]], rejects=merged["rejects"], failures=merged["failures"],
        rows=merged["output"]["rows"], batches=len(tasks),
        items_succeeded=sum(t["items_succeeded"] for t in tasks), items_failed=sum(t["items_failed"] for t in tasks),
        items_rejected=sum(t["items_rejected"] for t in tasks))
    store.put_json(keys.result, result.model_dump(mode="json"))
    get_run_logger().info("wrote %s rows to %s", result.rows, merged["output"]["uri"])
    return {"output": merged["output"]["uri"], "rows": result.rows}
