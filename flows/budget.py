"""The budget's runtime guard: a job that reaches a limit pauses itself, between batches, with nothing lost.

``run_batches`` (``flows/process.py``, every pass over batches: the process phase and each retry round) keeps a
``BudgetGuard``. After each commit it adds the batch's API calls to the job's spend (``counts.api_calls``), every
couple of seconds the cores the Dask workers hold times the time since (``core_seconds``), and asks whether a limit
is reached (``slurmctl.books.budget.reached``). When one is:

1. no further shard is submitted, and every worker is told to start no further batch (``stop_pass`` through
   ``Client.run``; repeated every couple of seconds for workers that joined since). The batches already running
   commit, so **the spend passes the limit by at most the batch that reached it plus one batch per Dask thread**
   (those running when the stop reached the workers, within milliseconds of that commit): one per configured
   worker thread, two for a handler whose items run in flight together (``shards_per_thread``);
2. once those shards have ended (``ShardStopped``), ``run_batches`` raises ``BudgetReached``; the phase's subflow
   ends in a Cancelled-type state named **Paused** and its task runner closes the Dask cluster;
3. the job flow (``flows/job.py``) records ``paused`` in the job manifest with the reason (which limit, the numbers,
   the ``slurmctl resume JOB --raise-budget KEY=VALUE`` that continues it), cancels leftover Slurm worker jobs by
   name, writes the summary artifact, emits ``slurmctl.job.paused`` and ends its flow run *Paused* as well.

Why a Cancelled-type state named Paused, not Prefect's own ``Paused``: a Prefect Paused run waits for
``resume_flow_run`` on *the same* run, which for a run ``slurmctl submit`` started has no process left to continue it,
and the UI's Resume button would skip raising the budget. A slurmctl job continues as a new flow run of the same job
once its manifest's budget is raised (as after a cancel), so its run ends here: final, not a failure (the failure
alert stays quiet), and named and messaged so the UI says what happened.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from slurmctl.books.budget import BudgetReached, Reached, pause_reason, reached, spent
from slurmctl.books.manifests import JobManifest, now
from slurmctl.books.store import update_job
from slurmctl.config import JobConfig
from slurmctl.item_run import shards_per_thread
from slurmctl.slurm import cancel_worker_jobs
from slurmctl.tasks.process_shard import stop_pass

log = logging.getLogger("slurmctl.flows.budget")
PAUSED = "Paused"  # the name of the Prefect state a job paused at its budget ends its runs in

# job id -> why its coordinator paused it: set by the guard before it raises, read by the job flow, which may see
# Prefect's CancelledRun of a subflow instead of the BudgetReached raised inside it.
_paused: dict[str, str] = {}


def paused_reason(job_id: str) -> str | None:
    """Why this coordinator paused the job at its budget (None: it did not)."""
    return _paused.get(job_id)


def forget(job_id: str) -> None:
    _paused.pop(job_id, None)


class BudgetGuard:
    """One pass's watch over the job's budget (see the module docstring). ``client``: the pass's Dask client (None
    outside a Dask task runner: no cores are counted, and only this process is told to stop)."""

    def __init__(self, cfg: JobConfig, client: Any, pass_id: str | None) -> None:
        self.cfg, self.client, self.pass_id = cfg, client, pass_id
        self.budget = cfg.budget
        self.active = bool(self.budget.limits)
        self.cores = 0.0
        # Dask's threads per core booked: a handler with items in flight runs two shards per configured thread on
        # threads that book no more cores (``flows/runners.py``, Slurm's ``job_cpu``)
        self.threads_per_core = shards_per_thread(cfg)
        self.last = time.monotonic()
        self.hits: list[Reached] = []
        self.told_at = 0.0

    @property
    def stopping(self) -> bool:
        return bool(self.hits)

    def tick(self, job: JobManifest, sample_cores: bool) -> None:
        """Add the cores held since the last tick to the job's ``core_seconds``; ``sample_cores``: ask the scheduler
        how many there are now (every couple of seconds, not at every commit)."""
        now = time.monotonic()
        job.core_seconds += self.cores * (now - self.last)
        self.last = now
        if sample_cores and self.client is not None:
            try:
                self.cores = sum(self.client.nthreads().values()) / self.threads_per_core
            except Exception as exc:  # the scheduler is going away; the next tick tries again
                log.debug("reading the workers' threads failed: %s", exc)

    def check(self, job: JobManifest) -> bool:
        """True once the job's spend reached a limit: from then on no batch is started (``stop``)."""
        if not self.active:
            return False
        if not self.hits:
            self.hits = reached(self.budget, spent(job))
            if self.hits:
                _paused[self.cfg.job_id] = pause_reason(self.cfg.job_id, self.hits, job.counts)
                log.warning("job %s: %s; starting no further batch, the batches running commit",
                            self.cfg.job_id, "; ".join(map(str, self.hits)))
                self.stop()
        else:
            self.tell_again()
        return self.stopping

    def tell_again(self) -> None:
        """Every couple of seconds while stopping: tell the workers again, for those that joined since."""
        if time.monotonic() - self.told_at >= 2.0:
            self.stop()

    def stop(self) -> None:
        """Tell this process and every worker to start no further batch of this pass."""
        self.told_at = time.monotonic()
        if self.pass_id is None:
            return
        stop_pass(self.pass_id)
        if self.client is not None:
            try:
                self.client.run(stop_pass, self.pass_id)
            except Exception as exc:  # a worker gone meanwhile: the others were told; the next call retries
                log.warning("telling the workers to stop failed (%s: %s); trying again", type(exc).__name__, exc)

    def reached_error(self, job: JobManifest) -> BudgetReached:
        """The pass's end: why, with the spend once the running batches committed (what the job manifest says)."""
        hits = reached(self.budget, spent(job)) or self.hits
        _paused[self.cfg.job_id] = reason = pause_reason(self.cfg.job_id, hits, job.counts)
        return BudgetReached(reason)


def check_before_run(cfg: JobConfig, job: JobManifest) -> None:
    """A job with batches to run that is already at a limit (a deployment's re-run of a paused job, its budget not
    raised) pauses again before any cluster is started: raises ``BudgetReached``."""
    hits = reached(cfg.budget, spent(job)) if cfg.budget.limits else []
    if hits:
        _paused[cfg.job_id] = reason = pause_reason(cfg.job_id, hits, job.counts)
        raise BudgetReached(reason)


def pause_of(exc: BaseException, job_id: str) -> str | None:
    """Why the job's run ended, if it ended at its budget: ``BudgetReached`` itself, or the ``CancelledRun`` of the
    subflow it ended *Paused*. None for anything else (a cancellation, a failure)."""
    from prefect.exceptions import CancelledRun

    if isinstance(exc, (BudgetReached, CancelledRun)):
        return paused_reason(job_id)
    return None


def mark_paused(store: Any, job_id: str, reason: str, kind: str | None) -> JobManifest:
    """Record the pause: the job manifest says ``paused`` with the reason (``slurmctl status`` shows it, ``submit
    --wait`` ends with it); Slurm worker jobs the closed cluster may have left are cancelled by name."""
    if kind == "slurm":
        cancel_worker_jobs(job_id)
    return update_job(store, job_id, status="paused", finished_at=now(), error=reason[:2000])
