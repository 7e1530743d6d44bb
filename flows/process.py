"""Phase 2: map ``process_batch`` over the plan on the job's Dask cluster, with a bounded number in flight.

The coordinator keeps only small summaries, writes running counts to the job manifest every couple of seconds (the
heartbeat ``slurmctl status`` reads), and skips batches that already committed, so a resumed job picks up where the
last coordinator stopped.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from typing import Any

from prefect import flow, get_run_logger

from flows.partition import read_plan
from slurmctl.config import parse_config
from slurmctl.jobs import load_job, save_job, store_for
from slurmctl.manifests import Counts, Keys, TaskManifest, counts_from_tasks, now
from tasks.process_batch import process_batch

HEARTBEAT_S = 2.0


def committed_batches(store, job_id: str) -> list[str]:
    """Batch ids with a committed task manifest: one LIST per 1,000 batches, no GETs."""
    keys = Keys(job_id)
    return [b for b in map(Keys.committed_batch, store.list_keys(keys.tasks_prefix)) if b]


def recount(store, job_id: str, batches_total: int, items_total: int) -> Counts:
    """Counts from the committed task manifests (resume, ``status --scan``)."""
    keys = Keys(job_id)
    tasks = [store.get_json(keys.task(b)) for b in committed_batches(store, job_id)]
    return counts_from_tasks([t for t in tasks if t], batches_total, items_total)


@flow(name="process", log_prints=True)
def process_phase(job_id: str, config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    logger = get_run_logger()
    job = load_job(store, job_id)
    plan = read_plan(store, job_id)
    done = set(committed_batches(store, job_id))
    counts = recount(store, job_id, len(plan), job.counts.items_total) if done else job.counts.model_copy(
        update={"batches_done": 0, "batches_failed": 0, "items_succeeded": 0, "items_failed": 0,
                "items_rejected": 0, "rows_written": 0})
    todo = deque(b for b in plan if b.batch_id not in done)
    if done:
        logger.info("resuming: %s of %s batches already committed, %s to run", len(done), len(plan), len(todo))

    task = process_batch.with_options(retries=cfg.batch_retries)
    finished: queue.Queue = queue.Queue()
    in_flight: dict[Any, Any] = {}
    failed: list[str] = []
    last_beat = 0.0

    def beat(force: bool = False) -> None:
        nonlocal last_beat
        if force or time.monotonic() - last_beat >= HEARTBEAT_S:
            job.counts = counts
            save_job(store, job)
            last_beat = time.monotonic()

    while todo or in_flight:
        while todo and len(in_flight) < cfg.max_in_flight:
            spec = todo.popleft()
            future = task.submit(cfg, store, spec.to_dict())
            in_flight[future] = spec
            future.add_done_callback(finished.put)
        try:
            future = finished.get(timeout=HEARTBEAT_S)
        except queue.Empty:
            beat()
            continue
        spec = in_flight.pop(future)
        try:
            summary = future.result()
        except BaseException as exc:  # retries exhausted, or the worker running it died
            failed.append(spec.batch_id)
            counts.batches_failed += 1
            error = f"{type(exc).__name__}: {exc}"
            logger.error("batch %s failed: %s", spec.batch_id, error)
            store.put_json(Keys(job_id).failed_task(spec.batch_id), TaskManifest(
                job_id=job_id, batch_id=spec.batch_id, task_id=f"task-{spec.index:06d}", status="failed",
                started_at=now(), finished_at=now(), items=spec.records, error=error[:2000],
            ).model_dump(mode="json"))
        else:
            counts.batches_done += 1
            for k in ("items_succeeded", "items_failed", "items_rejected", "rows_written"):
                setattr(counts, k, getattr(counts, k) + (summary.get(k) or 0))
        beat()
    beat(force=True)
    return {"batches_done": counts.batches_done, "batches_failed": len(failed), "failed": failed[:100]}
