"""The job flow: partition -> process -> aggregate, each a subflow, with the job manifest tracking the phase.

The flow takes only the job id and where its store is: everything else comes from the job manifest that
``slurmctl submit`` wrote, so a deployment run, a scheduled run and ``slurmctl resume`` all start the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from flows.aggregate import aggregate_phase
from flows.partition import partition_phase
from flows.process import process_phase
from flows.runners import task_runner_for
from slurmctl.config import load_config, parse_config
from slurmctl.jobs import JobExists, create_job, load_job, store_for, update_job
from slurmctl.manifests import Keys, now


class JobFailed(RuntimeError):
    pass


@flow(name="slurmctl-job", log_prints=True)
def run_job(job_id: str | None = None, storage: dict[str, Any] | None = None,
            config_path: str | None = None) -> dict[str, Any]:
    """Run (or continue) a job. ``job_id`` + ``storage`` name an existing job; ``config_path`` creates it first if
    needed (how a Prefect deployment starts one from the UI or ``prefect deployment run``)."""
    if config_path:
        cfg = load_config(config_path)
        if job_id:
            cfg = parse_config({**cfg.model_dump(mode="json"), "job_id": job_id})
        storage = cfg.storage.model_dump()
        job_id = cfg.job_id
        try:
            create_job(cfg, str(Path(config_path).resolve()))
        except JobExists:
            pass  # a re-run of the deployment continues the same job
    if not job_id or storage is None:
        raise ValueError("run_job needs config_path, or job_id and storage")
    store = store_for(storage)
    job = load_job(store, job_id)
    cfg = parse_config(job.config)
    config = cfg.model_dump(mode="json")
    logger = get_run_logger()
    update_job(store, job_id, status="running", phase="partition", started_at=job.started_at or now(),
               finished_at=None, error=None, flow_run_id=str(get_run_context().flow_run.id))
    try:
        partition_phase(job_id, config)
        update_job(store, job_id, phase="process")
        runner = task_runner_for(cfg.cluster)
        processed = process_phase.with_options(task_runner=runner)(job_id, config)
        if processed["batches_failed"]:
            raise JobFailed(f"{processed['batches_failed']} batch(es) failed: {', '.join(processed['failed'][:10])}"
                            f" — see the task manifests under {store.uri(Keys(job_id).tasks_prefix)}; "
                            f"`slurmctl resume {job_id}` runs them again")
        update_job(store, job_id, phase="aggregate")
        result = aggregate_phase(job_id, config)
    except BaseException as exc:
        update_job(store, job_id, status="failed", finished_at=now(), error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    update_job(store, job_id, status="completed", phase="done", finished_at=now(), output=result["output"])
    logger.info("job %s completed: %s rows in %s", job_id, result["rows"], result["output"])
    return result
