"""Phase 2: map ``process_batch`` over the plan on the job's Dask cluster, with a bounded number in flight.

``run_batches`` is shared with the retry phase: it keeps at most ``max_in_flight`` futures, folds each finished
batch's small summary into the job's counters, writes them to the job manifest every couple of seconds (the
progress ``slurmctl status`` reads; the coordinator's liveness is its separate heartbeat), and runs a batch again — without touching its retry budget — when the worker
running it died. Batches already committed are skipped, so a resumed job picks up where the last coordinator stopped.
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import subprocess
import time
from collections import deque
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from slurmctl.blocks.manifest_store import ManifestStore
from slurmctl.books.failures import committed_batch_ids, committed_tasks
from slurmctl.books.manifests import Counts, JobManifest, Keys, TaskManifest, counts_from_tasks, now
from slurmctl.books.store import load_job, read_plan, save_job, store_for
from slurmctl.config import JobConfig, parse_config
from slurmctl.records import BatchSpec
from slurmctl.tasks.process_batch import process_batch

HEARTBEAT_S = 2.0
# Exceptions that mean "the worker (or its Slurm job) running this batch went away", not "the batch failed".
WORKER_LOSS = ("KilledWorker", "FutureCancelledError", "CancelledError", "CommClosedError", "StreamClosedError",
               "WorkerLost")


def recount(store: ManifestStore, job_id: str, batches_total: int, items_total: int) -> Counts:
    """Counts from the committed task manifests alone (resume, ``status --scan``)."""
    return counts_from_tasks(committed_tasks(store, job_id), batches_total, items_total)


class NoWorkers(RuntimeError):
    """Batches are waiting and no Dask worker has been alive for ``no_workers_timeout_s``: the cluster is lost."""


class WorkerWatch:
    """Notices a cluster that has lost all its workers (Slurm walltime, scancel, a partition taken down)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.since: float | None = None
        try:
            self.client = get_run_context().task_runner.client
        except Exception:  # not on a Dask task runner (unit tests): nothing to watch
            self.client = None

    def check(self, waiting: bool) -> None:
        if self.client is None:
            return
        alive = len(self.client.nthreads())
        if alive or not waiting:
            self.since = None
            return
        self.since = self.since or time.monotonic()
        if time.monotonic() - self.since > self.cfg.no_workers_timeout_s:
            raise NoWorkers(f"no Dask worker alive for {self.cfg.no_workers_timeout_s:.0f} s while batches wait"
                            f"{self.slurm_diagnosis()}; the cluster is lost — `slurmctl resume {self.cfg.job_id}` "
                            f"continues the job when workers can start again")

    def slurm_diagnosis(self) -> str:
        if self.cfg.cluster.kind != "slurm" or not shutil.which("squeue"):
            return ""
        from slurmctl.flows.runners import slurm_job_name

        out = subprocess.run(["squeue", "-h", "--name", slurm_job_name(self.cfg.job_id), "-o", "%i %T %r"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return f" (Slurm worker jobs: {out.replace(chr(10), '; ') or 'none'})"


def saved_store(store: ManifestStore) -> ManifestStore:
    """The store saved as a Prefect block (Prefect requires saved blocks for result storage); one per store URI."""
    name = "slurmctl-" + hashlib.sha256(store.uri("").encode()).hexdigest()[:16]
    store.save(name, overwrite=True)
    return store


def is_worker_loss(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & set(WORKER_LOSS))


def run_batches(cfg: JobConfig, store: ManifestStore, job: JobManifest, specs: list[BatchSpec],
                done: set[str] | None = None) -> list[str]:
    """Run ``specs`` (already-committed ones skipped) and keep ``job.counts`` current; return failed batch ids."""
    logger = get_run_logger()
    done = set(committed_batch_ids(store, job.job_id)) if done is None else done
    todo = deque(b for b in specs if b.batch_id not in done)
    task = process_batch.with_options(retries=cfg.batch_retries, result_storage=saved_store(store))
    finished: queue.Queue = queue.Queue()
    in_flight: dict[Any, BatchSpec] = {}
    requeues: dict[str, int] = {}
    failed: list[str] = []
    last_beat = 0.0
    watch = WorkerWatch(cfg)

    def beat(force: bool = False) -> None:
        nonlocal last_beat
        if force or time.monotonic() - last_beat >= HEARTBEAT_S:
            save_job(store, job)
            last_beat = time.monotonic()
            watch.check(waiting=bool(in_flight))

    while todo or in_flight:
        while todo and len(in_flight) < cfg.max_in_flight:
            spec = todo.popleft()
            future = task.submit(cfg, store, spec.to_dict(), handler_version=job.handler_version or "")
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
        except BaseException as exc:
            if is_worker_loss(exc) and requeues.get(spec.batch_id, 0) < cfg.worker_loss_requeues:
                requeues[spec.batch_id] = requeues.get(spec.batch_id, 0) + 1
                job.worker_loss_requeues += 1
                logger.warning("batch %s lost its worker (%s: %s); running it again (%s/%s)", spec.batch_id,
                               type(exc).__name__, exc, requeues[spec.batch_id], cfg.worker_loss_requeues)
                todo.appendleft(spec)
                beat(force=True)  # rare: operators see the requeue in the job manifest at once
                continue
            failed.append(spec.batch_id)
            job.counts.batches_failed += 1
            error = f"{type(exc).__name__}: {exc}"
            logger.error("batch %s failed: %s", spec.batch_id, error)
            store.put_json(Keys(job.job_id).failed_task(spec.batch_id), TaskManifest(
                job_id=job.job_id, batch_id=spec.batch_id, task_id=spec.batch_id, group=spec.group, status="failed",
                started_at=now(), finished_at=now(), items=spec.records, error=error[:2000],
            ).model_dump(mode="json"))
        else:
            job.counts.add(summary)
        beat()
    beat(force=True)
    return failed


@flow(name="process", log_prints=True)
def process_phase(job_id: str, config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    logger = get_run_logger()
    job = load_job(store, job_id)
    plan = read_plan(store, job_id)
    done = set(committed_batch_ids(store, job_id))
    if done:
        job.counts = recount(store, job_id, max(len(plan), job.counts.batches_total), job.counts.items_total)
        logger.info("resuming: %s batches already committed, %s in the plan", len(done), len(plan))
    else:
        job.counts = Counts(batches_total=len(plan), items_total=job.counts.items_total)
    failed = run_batches(cfg, store, job, plan, done)
    return {"batches_done": job.counts.batches_done, "batches_failed": len(failed), "failed": failed[:100],
            "items_deferred": job.counts.items_deferred}
