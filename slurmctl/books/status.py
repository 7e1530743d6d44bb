"""What ``slurmctl status JOB --json`` shows, from the manifests: one function the command and a Python caller share.

The job manifest's counters (or a recount from the commits), the control object (paused), the coordinator's
heartbeat (stale), progress and spend (``status_view``), each rate limit's state when the job declares any
(the limiter backend is optional here: a failure to read it is shown, never raised), and on request the slowest
batches.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from slurmctl.books.budget import usage_view
from slurmctl.books.failures import committed_tasks, recount
from slurmctl.books.heartbeat import read_heartbeat
from slurmctl.books.manifests import STALE_AFTER_S, TERMINAL_STATUSES, Counts, JobManifest, Keys, parse_time
from slurmctl.books.progress import job_progress
from slurmctl.config import JobConfig
from slurmctl.pace_advice import job_advice
from slurmctl.storage import Store


def job_status(store: Store, job: JobManifest, *, scan: bool = False, batches: int = 0) -> dict[str, Any]:
    """The status view of ``job`` (loaded from ``store``). ``scan``: count the committed batches again instead of
    trusting the manifest's counters; ``batches``: add the ``batches`` slowest committed batches."""
    if scan:
        scanned = recount(store, job.job_id, job.counts.batches_total, job.counts.items_total)
        scanned.duplicates = job.counts.duplicates  # the aggregation's counts: no task manifest holds them
        scanned.duplicate_items = job.counts.duplicate_items
        job = job.model_copy(update={"counts": scanned})
    view = status_view(job.model_dump(mode="json"), store.get_json(Keys(job.job_id).control),
                       read_heartbeat(store, job.job_id))
    if job.config.get("rate_limits"):
        try:
            from slurmctl.books.limits import limits_status
            from slurmctl.config import parse_config

            view["rate_limits"] = limits_status(parse_config(job.config))
        except Exception as exc:  # the limiter backend is optional for status: manifests come first
            view["rate_limits"] = {"error": f"{type(exc).__name__}: {exc}"}
    if batches:
        view["slowest_batches"] = slowest_batches(committed_tasks(store, job.job_id), batches)
    return view


def status_view(job: dict[str, Any], control: dict[str, Any] | None = None, heartbeat: dict[str, Any] | None = None,
                *, stale_after_s: int = STALE_AFTER_S) -> dict[str, Any]:
    """The flat JSON object ``slurmctl status --json`` prints, from the job manifest, its control object and the
    coordinator's heartbeat. ``stale``: not finished, and neither the manifest nor the heartbeat written for
    ``stale_after_s``. ``items_done``, ``items_per_s``, ``eta_s`` and ``phases``: ``books.progress.job_progress``;
    ``core_hours``, ``cost_usd`` and ``budget`` (``api_calls`` is a counter): ``books.budget.usage_view``;
    ``advice``: ``pace_view``."""
    counts = job.get("counts", {})
    view = {
        "job_id": job["job_id"],
        "status": job["status"],
        "phase": job["phase"],
        **{k: counts.get(k, 0) for k in Counts.model_fields},
        "output": job.get("output"),
        "submitted_at": job.get("submitted_at"),
        "started_at": job.get("started_at"),
        "updated_at": job.get("updated_at"),
        "heartbeat_at": (heartbeat or {}).get("at"),
        "finished_at": job.get("finished_at"),
        "error": job.get("error"),
        "flow_run_id": job.get("flow_run_id"),
        # Batches queued again because their worker died (spends ``worker_loss_requeues``), and shards handed back
        # by workers retiring before their walltime (planned; spends nothing).
        "worker_loss_requeues": job.get("worker_loss_requeues", 0),
        "worker_retirements": job.get("worker_retirements", 0),
        "worker_preemptions": job.get("worker_preemptions", 0),
        # A coordinator running as a Slurm job (``cluster.coordinator.on: slurm``): which, and how many took over.
        "coordinator_slurm_job": job.get("coordinator_slurm_job"),
        "coordinator_restarts": job.get("coordinator_restarts", 0),
        # Paused by `slurmctl pause` (rate limits: the run goes on without tokens), or at a budget limit (the run
        # ended; status "paused").
        "paused": bool((control or {}).get("paused")) or job["status"] == "paused",
    }
    stale = False
    seen = [parse_time(t) for t in (job.get("updated_at"), view["heartbeat_at"]) if t]
    if job["status"] not in TERMINAL_STATUSES and seen:
        age = (_dt.datetime.now(_dt.timezone.utc) - max(seen)).total_seconds()
        stale = age > stale_after_s
    view["stale"] = stale
    view.update(job_progress(job))
    view.update(usage_view(job))
    view["advice"] = pace_view(job)
    return view


def pace_view(job: dict[str, Any]) -> list[str]:
    """Why the job spends less of its declared rate limits than it could, from its counts, with what to do
    (``slurmctl.pace_advice.job_advice``): an async handler holding its workers' event loops, workers too busy for
    the limit's slots, or fewer calls in flight than it needs (held by ``max_concurrency``, or by a fixed
    ``concurrency``). Empty when nothing is to be said."""
    config = job.get("config") or {}
    cap = config.get("max_concurrency") or JobConfig.model_fields["max_concurrency"].default
    batch_size, batches = 0, 0
    if (job.get("counts") or {}).get("concurrency_needed"):  # which bound held it: max_concurrency or batch_size
        try:
            from slurmctl.books.shards import concurrent_batches  # items were in flight
            from slurmctl.config import parse_config

            cfg = parse_config(config)  # without importing the handler: status runs where its module may not
            batch_size, batches = cfg.batch_size, concurrent_batches(cfg)
        except Exception:  # a config this release cannot read: the advice without that bound
            pass
    return job_advice(job.get("counts") or {}, int(cap), config.get("concurrency"), batch_size, batches)


def slowest_batches(tasks: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` committed batches that took longest, with what their metrics say about why: handler latency,
    time blocked on rate limits, CPU, where they ran (``slurmctl status --batches``). Batches committed before
    metrics were recorded (no ``duration_s``) are left out."""
    rows = []
    for t in tasks:
        m = t.get("metrics") or {}
        if m.get("duration_s") is None:
            continue
        latency = m.get("latency_ms") or {}
        rows.append({"batch_id": t["batch_id"], "duration_s": m["duration_s"], "items": m.get("items"),
                     "api_calls": m.get("api_calls"), "p50_ms": latency.get("p50"), "p95_ms": latency.get("p95"),
                     "tokens_waited_s": m.get("tokens_waited_s"), "cpu_s": m.get("cpu_s"), "host": m.get("host"),
                     "slurm_job_id": m.get("slurm_job_id")})
    return sorted(rows, key=lambda r: -r["duration_s"])[:n]
