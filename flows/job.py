"""The job flow: partition -> process -> retry -> aggregate, each a subflow, the job manifest tracking the phase.

The flow takes the job id and where its store is (or a config path, for deployments): everything else comes from
the job manifest, so a deployment run, a scheduled run, ``slurmctl resume`` and ``slurmctl retry`` all start the
same way, and each continues from what the manifests say is committed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.exceptions import CancelledRun, TerminationSignal
from prefect.states import Cancelled

from slurmctl.books.admission import create_job
from slurmctl.books.failures import analyze, committed_batch_ids, committed_tasks, failure_state, recount, round_of
from slurmctl.books.gc import collected
from slurmctl.books.heartbeat import Heartbeat
from slurmctl.books.limits import ensure_limits, limits_status
from slurmctl.books.manifests import Keys, now
from slurmctl.books.store import JobExists, load_job, read_round_batches, reader_for, store_for, update_job
from slurmctl.config import known_storage, parse_config
from slurmctl.flows import artifacts, budget, cancel, local_workers, naming, stop
from slurmctl.flows.aggregate import aggregate_phase, aggregate_runner
from slurmctl.flows.artifacts import JobArtifacts
from slurmctl.flows.events import JobEvents
from slurmctl.flows.naming import job_run_name
from slurmctl.flows.partition import partition_phase
from slurmctl.flows.process import count_late_commits, process_phase
from slurmctl.flows.retry import retry_phase
from slurmctl.flows.runners import task_runner_for
from slurmctl.item_run import shards_per_thread


# Notice a silent worker (network partition, frozen node) within 10 s; a killed one is noticed at once.
# allowed-failures 0: a batch whose worker died comes back to us at once as a KilledWorker, and `run_batches`
# re-queues it (bounded by `worker_loss_requeues`, counted in the job manifest, logged) instead of Dask re-running it
# up to 3 times unseen and then failing it. One mechanism, visible to operators; neither spends `batch_retries`.
# worker-ttl: a worker that dies is noticed at once (its connection closes); the ttl only catches a silent one (a frozen
# node, a network partition), so it is long enough that a handler holding the GIL or a busy node is not taken for one.
def scheduler_kwargs(cfg: Any) -> dict[str, Any]:
    return {"worker_ttl": f"{cfg.worker_ttl_s:g}s", "allowed_failures": 0}


def dask_settings(cfg: Any) -> dict[str, Any]:
    return {f"distributed.scheduler.{k.replace('_', '-')}": v for k, v in scheduler_kwargs(cfg).items()}


class JobFailed(RuntimeError):
    pass


def first_failure(store: Any, job_id: str, failed: list[str]) -> str:
    """Why the first failed batch failed, from its failure marker, for the job's error: a handler class whose
    ``__init__`` raises fails every batch, and the error said only which batches and where to look, while a resume
    would fail the same way. Empty when the marker cannot be read."""
    try:
        marker = store.get_json(Keys(job_id).failed_task(failed[0])) if failed else None
    except Exception:
        return ""
    error = " ".join(str((marker or {}).get("error") or "").split())
    if not error:
        return ""
    return f". The first failed with {error[:300]}{'…' if len(error) > 300 else ''}; fix that before resuming"


def _cluster_runner(cfg: Any) -> Any:
    """A task runner that starts the job's cluster (``flows/runners.py``) when it is first used."""
    return task_runner_for(cfg.cluster, job_id=cfg.job_id, threads_factor=shards_per_thread(cfg))


def _runner(cfg: Any) -> Any:
    """The process phase's and retry rounds' task runner: on the cluster the coordinator started early when it
    did (``start_cluster_early``), else one that starts the cluster when the phase first submits."""
    return local_workers.reuse(_cluster_runner(cfg))


def start_cluster_early(job_id: str, storage: dict[str, Any]) -> None:
    """A coordinator of a job on a local cluster starts that cluster now, beside its flow's start-up and the
    partition (``slurmctl.flows.local_workers``); the phases that process batches connect to it."""
    cfg = parse_config(load_job(reader_for(storage), job_id).config)
    if local_workers.forks(cfg.cluster):
        local_workers.start_cluster(_cluster_runner(cfg).cluster_kwargs, scheduler_kwargs(cfg))


@flow(name="slurmctl-job", flow_run_name=job_run_name, log_prints=True, on_cancellation=[cancel.on_cancellation])
def run_job(job_id: str | None = None, config_path: str | None = None, config: dict[str, Any] | None = None,
            date: str | None = None, days_before: int = 0, timezone: str = "UTC",
            retry_errors: list[str] | None = None, storage: dict[str, Any] | None = None,
            aggregate_only: bool = False) -> Any:
    """Run or continue a slurmctl job: partition, process, retry, aggregate.

    Re-running with the same job id continues that job from its committed batches (a finished job only
    re-aggregates). Give a config (``config_path`` or ``config``) to start a job, or ``job_id`` + ``storage`` for one
    already submitted (``slurmctl submit``, ``resume``).

    Args:
        job_id: The job's id (e.g. backfill-2025-04-12). Default: the config's job_id; a run of a config without one
            is a new job named after the run.
        config_path: Path of the job's YAML config, as the worker running this flow sees it.
        config: The job's config inline (the YAML's keys), instead of config_path.
        date: The date a backfill is for (YYYY-MM-DD), put in place of {date} in the config. Default: the run's
            scheduled date (minus days_before).
        days_before: With no date: process the day this many days before the scheduled date (1 = yesterday).
        timezone: The time zone of the scheduled date (an IANA name, e.g. Europe/Berlin).
        retry_errors: Also retry the items that failed with these error classes (e.g. network, throttle).
        storage: The store of an existing job_id (set by slurmctl submit and resume; leave empty with a config).
        aggregate_only: Only merge the committed batch outputs again (slurmctl aggregate).
    """
    flow_run = get_run_context().flow_run
    flow_run_id = str(flow_run.id)
    if config_path or config is not None:
        cfg = naming.config_of_run({"job_id": job_id, "config_path": config_path, "config": config, "date": date,
                                    "days_before": days_before, "timezone": timezone},
                                   flow_run.expected_start_time, flow_run_id)
        storage = cfg.storage.model_dump()
        job_id = cfg.job_id
        try:
            create_job(cfg, str(Path(config_path).resolve()) if config_path else None)
        except JobExists:
            pass  # a re-run of the deployment (or of the same date) continues the same job
    if not job_id:
        raise ValueError("run_job needs a job_id, or a config (config_path or config)")
    if storage is None:  # a job submitted from this machine (a retry or aggregate deployment's Run form)
        storage = known_storage(job_id).model_dump()
    store = store_for(storage)
    job = load_job(store, job_id)
    if job.status == "completed" and collected(store, job_id):  # `slurmctl gc` removed its parts: nothing to redo
        get_run_logger().info("job %s is completed and `slurmctl gc` removed its batch parts: its output %s is final",
                              job_id, job.output)
        return store.get_json(Keys(job_id).result)
    cfg = parse_config(job.config)
    config = cfg.model_dump(mode="json")
    job = update_job(store, job_id, status="running", phase="aggregate" if aggregate_only else "partition",
                     started_at=job.started_at or now(), finished_at=None, error=None, flow_run_id=flow_run_id,
                     coordinator_pid=os.getpid(), coordinator_host=socket.gethostname())
    budget.forget(job_id)
    heartbeat = Heartbeat(store, job_id, flow_run_id=flow_run_id).start()  # every phase
    watch = cancel.CancelWatch(store, job_id, flow_run_id, kind=cfg.cluster.kind).start()
    arts = JobArtifacts(job, flow_run_id)
    emitter = JobEvents(cfg, flow_run_id)  # slurmctl's own events, for the alerts (`slurmctl alerts install`)
    emitter.started(job.phase)
    with stop.on_signals():  # SIGTERM, SIGINT, SIGHUP: stop between batches (flows/stop.py)
        return _run_phases(store, job_id, cfg, config, retry_errors or [], aggregate_only, watch, arts, emitter,
                           heartbeat)


def _run_phases(store: Any, job_id: str, cfg: Any, config: dict[str, Any], retry_errors: list[str],
                aggregate_only: bool, watch: Any, arts: JobArtifacts, emitter: JobEvents, heartbeat: Heartbeat) -> Any:
    """The phases and how the run ends: completed, paused, stopped, cancelled or failed."""
    logger = get_run_logger()
    try:
        with dask.config.set(dask_settings(cfg)):
            if not aggregate_only:
                process_and_retry(store, job_id, cfg, config, retry_errors)
            local_workers.close_cluster(wait=False)  # its workers stop while the aggregation runs
            enter_phase(store, job_id, "aggregate")
            committed = len(committed_batch_ids(store, job_id))
            result = aggregate_phase.with_options(task_runner=aggregate_runner(cfg, committed))(job_id, config)
    except BaseException as exc:
        # Its workers stop before the job is said to have stopped, as when the phase's runner owned the cluster: a
        # batch still running (a cancel, a pause) never commits after it
        local_workers.close_cluster()
        paused = budget.pause_of(exc, job_id)
        if paused:  # at a budget limit: between batches, everything committed kept (flows/budget.py)
            job = budget.mark_paused(store, job_id, paused, cfg.cluster.kind)
            logger.warning("job %s paused: %s", job_id, paused)
            finish_artifacts(arts, store, cfg, job)
            emitter.ended("paused", job.counts, paused)
            return Cancelled(name=budget.PAUSED, message=f"{job_id} paused: {paused}")
        request = stop.requested()
        signalled = request is not None and (cancel.is_cancellation(exc) or isinstance(
            exc, (TerminationSignal, KeyboardInterrupt)))
        asked = watch.asked_now() if signalled else None  # a runner's bare SIGTERM for a Cancel is a cancellation
        if signalled or cancel.is_cancellation(exc):
            stopped = signalled and not asked
            status, reason = ("stopped", request.reason) if stopped and request else (
                "cancelled", asked or watch.reason or "cancelled in Prefect")
            count_late_commits(store, job_id)  # its workers have stopped: what committed meanwhile is counted
            ids = cancel.mark_cancelled(store, job_id, reason, cfg.cluster.kind, status=status)
            logger.warning("job %s %s (%s); Slurm worker jobs cancelled: %s; `slurmctl resume %s` continues it",
                           job_id, status, reason, ", ".join(ids) or "none left", job_id)
            job = load_job(store, job_id)
            finish_artifacts(arts, store, cfg, job)
            emitter.ended(status, job.counts, reason)
            if stopped:
                return Cancelled(message=f"{job_id}: {reason}; `slurmctl resume {job_id}` continues it")
            if isinstance(exc, (cancel.JobCancelled, CancelledRun)):
                return Cancelled(message=f"{job_id}: {reason}")
            raise  # a runner's SIGTERM: Prefect's engine records the cancellation
        job = update_job(store, job_id, status="failed", finished_at=now(),
                         error=f"{type(exc).__name__}: {exc}"[:2000])
        finish_artifacts(arts, store, cfg, job)
        emitter.ended("failed", job.counts, job.error)
        raise
    finally:
        local_workers.close_cluster()
        watch.stop()
        heartbeat.stop()
    job = update_job(store, job_id, status="completed", phase="done", finished_at=now(), output=result["output"])
    finish_artifacts(arts, store, cfg, job)
    emitter.ended("completed", job.counts)
    logger.info("job %s completed: %s rows in %s", job_id, result["rows"], result["output"])
    return result


def finish_artifacts(arts: JobArtifacts, store: Any, cfg: Any, job: Any) -> None:
    """The job's errors table and summary in the Prefect UI, from its manifests."""
    keys = Keys(job.job_id)
    errors = limits = None
    try:
        if job.counts.items_failed:
            errors = analyze(job.job_id, failure_state(store, committed_tasks(store, job.job_id)))
        limits = limits_status(cfg)
    except Exception as exc:  # the summary is a view: a damaged part or an unreachable limiter fails nothing here
        get_run_logger().warning("job summary without errors or limits: %s: %s", type(exc).__name__, exc)
    result = store.get_json(keys.result) if job.status == "completed" else None
    links = {"output": job.output, "completion manifest": result and store.uri(keys.result),
             "failures": result and (result.get("failures") or {}).get("uri"),
             "rejects": result and (result.get("rejects") or {}).get("uri"), "job manifest": store.uri(keys.job),
             "batch manifests": store.uri(keys.tasks_prefix)}
    arts.finish(job, errors, links, limits or {})


def enter_phase(store: Any, job_id: str, phase: str) -> None:
    job = update_job(store, job_id, phase=phase)
    arts = artifacts.live(job_id)
    if arts is not None:
        arts.enter(phase, job)


def process_and_retry(store: Any, job_id: str, cfg: Any, config: dict[str, Any], retry_errors: list[str]) -> None:
    """Partition, process the uncommitted batches, then the retry rounds."""
    total = partition_phase(job_id, config)
    cancel.check(job_id)
    enter_phase(store, job_id, "process")
    initial_done = sum(1 for b in committed_batch_ids(store, job_id) if round_of(b) == 0)
    if initial_done < total:  # else no cluster is started at all
        budget.check_before_run(cfg, load_job(store, job_id))  # at its limit: paused again, no cluster started
        ensure_limits(cfg)
        processed = process_phase.with_options(task_runner=_runner(cfg))(job_id, config)
    else:  # the counters may predate a coordinator's death: take them from the commits
        counts = load_job(store, job_id).counts
        update_job(store, job_id, counts=recount(store, job_id, max(total, counts.batches_total),
                                                 counts.items_total))
        processed = {"batches_failed": 0, "failed": []}
    if processed["batches_failed"]:
        raise JobFailed(f"{processed['batches_failed']} batch(es) failed: {', '.join(processed['failed'][:10])}"
                        f"{first_failure(store, job_id, processed['failed'])} — see the task manifests under "
                        f"{store.uri(Keys(job_id).tasks_prefix)}; `slurmctl resume {job_id}` runs them again")
    run_retry_rounds(store, job_id, cfg, config, retry_errors)


def run_retry_rounds(store: Any, job_id: str, cfg: Any, config: dict[str, Any], retry_errors: list[str]) -> None:
    """Finish an interrupted round; retry deferred items (automatic rounds); then the requested classes."""
    logger = get_run_logger()
    job = load_job(store, job_id)

    def run_round(round_no: int, classes: list[str]) -> dict[str, Any]:
        enter_phase(store, job_id, "retry")
        result = retry_phase.with_options(task_runner=_runner(cfg))(job_id, config, round_no, classes)
        if result["batches_failed"]:
            raise JobFailed(f"retry round {round_no}: {result['batches_failed']} batch(es) failed: "
                            f"{', '.join(result['failed'][:10])}{first_failure(store, job_id, result['failed'])}; "
                            f"`slurmctl resume {job_id}` runs them again")
        return result

    # A round is unfinished until every one of its batches has a commit (its finished_at may predate a lost one).
    committed = set(committed_batch_ids(store, job_id)) if job.retry_rounds else set()
    unfinished = [r for r in job.retry_rounds if not r.get("finished_at") or any(
        spec.batch_id not in committed for spec in read_round_batches(store, job_id, r["round"]) or [])]
    for r in unfinished:
        run_round(r["round"], r["classes"])
    next_round = max([r["round"] for r in job.retry_rounds], default=0) + 1
    automatic = sum(1 for r in job.retry_rounds if not r["classes"])
    while load_job(store, job_id).counts.items_deferred > 0 and automatic < cfg.errors.auto_retry_rounds:
        wait = cfg.errors.retry_cooldown_s * (2 ** automatic)
        enter_phase(store, job_id, "retry")  # the cooldown is part of the retry phase
        logger.info("%s items deferred by the circuit breaker; retry round %s in %.0f s",
                    load_job(store, job_id).counts.items_deferred, next_round, wait)
        cancel.sleep(job_id, wait)
        run_round(next_round, [])
        next_round += 1
        automatic += 1
    if retry_errors:
        run_round(next_round, sorted(set(retry_errors)))
