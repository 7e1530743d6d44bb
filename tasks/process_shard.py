"""The unit of execution: one Prefect task run processes a shard, committing each of its batches on its own.

* Batches run one after another through ``run_batch``; each commits (or not) by itself, so a worker that dies
  mid-shard loses only the batch it was in.
* Each commit is reported at once as a Dask event (topic ``commits_topic(job_id)``), which the coordinator folds
  into the job's counters: progress moves per batch, not per shard. The shard's return value (the summaries of all
  its batches) is the authoritative list; the coordinator counts each batch once, whichever arrives first.
* A batch that hits an infrastructure fault does not stop the others; the shard then raises ``ShardIncomplete``,
  and Prefect's task retries run it again, re-reading the commits so committed batches are not run twice.
* Contiguous batches of a jsonl/csv input are read with one range request for the whole shard (``ShardReader``).
* The Prefect cache (key: the shard's batches, their input digests and the handler version) answers when the very
  same shard is submitted again after it completed, e.g. Dask re-running a finished task whose worker died. Shards
  are re-cut on resume, so a batch's "already done" check is its commit in the store, never the cache.
* When the job reaches its budget the coordinator tells every worker (``stop_pass``, through ``Client.run``): its
  shards start no further batch, and raise ``ShardStopped`` (never retried, never cached) once the batch they are
  in has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from typing import Any, Callable

from prefect import task
from prefect.context import get_run_context
from prefect.logging import get_run_logger

from slurmctl.books import checkpoints
from slurmctl.books.manifests import Keys
from slurmctl.books.shards import Shard
from slurmctl.config import JobConfig
from slurmctl.records import BatchSpec
from slurmctl.storage import Store
from slurmctl.tasks.process_batch import BatchHandedOn, checked_summary, run_batch
from slurmctl.walltime import END_ENV, WorkerClock, current_clock, worker_clock

# One shard's input bytes are fetched in one request when its batches lie together and the span is at most this.
PREFETCH_MAX_BYTES = 64 * 2**20


class ShardIncomplete(RuntimeError):
    """Some batches of the shard raised (infrastructure faults); the others committed."""


class ShardStopped(RuntimeError):
    """The coordinator said to start no further batch of this pass (the job reached its budget, or a signal stopped
    the coordinator): the shard ends
    between batches; its uncommitted batches wait for ``slurmctl resume``. Raised, not returned as a Cancelled
    state: Prefect would store a returned state's (empty) result under the shard's cache key, and the same shard cut
    again at resume would be answered from that cache without running."""


# Passes (the flow run ids of a process or retry phase) whose coordinator said "start no further batch": set on every
# worker by ``stop_pass`` (the coordinator runs it through ``Client.run``), read by each shard before each batch.
_stopped: set[str] = set()


def stop_pass(pass_id: str) -> None:
    """Run on each worker (and in the coordinator) when the job reaches its budget: the shards of this pass start no
    further batch. Cheap to repeat (the coordinator repeats it for workers that joined since)."""
    _stopped.add(pass_id)


def pass_stopped(pass_id: str) -> bool:
    # A module-level function, so the task (which cloudpickle ships by value, with copies of the globals it names)
    # reads this module's ``_stopped`` on the worker, not a copy of it.
    return pass_id in _stopped


class ShardAbandoned(RuntimeError):
    """The worker is leaving (it lost its scheduler: the coordinator died or closed the cluster; or it is being
    retired): the shard stops between batches instead of running on as a zombie whose batches the next coordinator
    runs as well. The coordinator treats it as a lost worker: the uncommitted batches are queued again."""


class ShardRetiring(RuntimeError):
    """The worker's Slurm job ends before another batch would (``slurmctl.walltime``): the shard stops between
    batches and its worker leaves. A planned retirement, not a loss: the coordinator queues the uncommitted batches
    again at once without spending ``worker_loss_requeues``, and no item runs twice."""


class ShardPreempted(ShardRetiring):
    """The worker's Slurm job got SIGTERM (``scancel``, preemption, the walltime itself): the batch running starts
    no further item; within Slurm's ``KillWait`` it commits if its items in flight finished it, else saves what they
    did as a checkpoint (``slurmctl.books.checkpoints``). The shard then stops and the coordinator queues its
    uncommitted batches again at once (a checkpointed one runs only its other items), counted as a preemption, not
    a loss."""


def commits_topic(job_id: str) -> str:
    return f"slurmctl-commits-{job_id}"


class ShardReader:
    """``read_range`` for a shard: its batches' contiguous slices come from one request, other reads are cached
    (a CSV header is read once per shard, not once per batch)."""

    def __init__(self, store: Store, uri: str, specs: list[BatchSpec]) -> None:
        self.store, self.uri = store, uri
        self.block: tuple[int, int, bytes] | None = None
        self.small: dict[tuple[str, int, int], bytes] = {}
        if specs:
            lo, hi = min(s.start for s in specs), max(s.end for s in specs)
            wanted = sum(s.end - s.start for s in specs)
            if 0 < hi - lo <= PREFETCH_MAX_BYTES and wanted * 2 >= hi - lo:
                self.block = (lo, hi, b"")

    def __call__(self, uri: str, start: int, end: int) -> bytes:
        if self.block is not None and uri == self.uri and self.block[0] <= start and end <= self.block[1]:
            lo, hi, data = self.block
            if not data:
                data = self.store.read_range(uri, lo, hi)
                self.block = (lo, hi, data)
            return data[start - lo:end - lo]
        key = (uri, start, end)
        if key not in self.small:
            if len(self.small) > 4:
                self.small.clear()
            self.small[key] = self.store.read_range(uri, start, end)
        return self.small[key]


def run_shard(cfg: JobConfig, store: Store, specs: list[BatchSpec], *, check_commits: bool = True,
              on_commit: Callable[[dict[str, Any]], None] | None = None, logger: Any = None,
              run_ids: tuple[str | None, str | None] = (None, None),
              wanted: Callable[[], bool] = lambda: True,
              stopped: Callable[[], bool] = lambda: False,
              clock: WorkerClock | None = None) -> list[dict[str, Any]]:
    """Run and commit each batch of a shard; return their summaries. Plain function: tests call it directly.

    ``wanted`` is asked before each batch; when it says no, the shard stops (``ShardAbandoned``). ``stopped`` too:
    when it says yes (the job reached its budget), the shard stops (``ShardStopped``). ``clock``: the worker's
    walltime (``slurmctl.walltime``); a batch that no longer fits before it is not started (``ShardRetiring``), and
    each batch's duration is recorded in it."""
    if not specs:
        return []
    uri = (specs[0].file or cfg.input.uri) if specs[0].source == "input" else store.uri(specs[0].source)
    ranged = specs[0].source != "input" or (cfg.input.format != "parquet" and not specs[0].chunk
                                            and len({s.file for s in specs}) == 1)
    reader = ShardReader(store, uri, specs if ranged else [])
    summaries: list[dict[str, Any]] = []
    errors: list[str] = []
    committed: list[dict[str, Any]] = []  # the task manifests of this shard's commits: its commit log
    try:
        for spec in specs:
            if stopped():
                raise ShardStopped(f"{spec.batch_id} and the {len(specs) - len(summaries) - len(errors) - 1} batches "
                                   f"after it were not started: the coordinator is stopping (the job reached its "
                                   f"budget, or a signal stopped it)")
            if clock is not None and not clock.fits():
                left = clock.seconds_left()
                if clock.terminated:
                    raise ShardPreempted(f"{spec.batch_id} and the {len(specs) - len(summaries) - len(errors) - 1} "
                                         f"batches after it were not started: this worker's Slurm job got SIGTERM")
                raise ShardRetiring(f"{spec.batch_id} and the {len(specs) - len(summaries) - len(errors) - 1} batches "
                                    f"after it were not started: this worker's Slurm job ends in "
                                    f"{left if left is not None else 0:.0f} s, before a batch (p95 "
                                    f"{clock.expected_batch_s():.1f} s) would; it retires")
            if not wanted():
                raise ShardAbandoned(f"{spec.batch_id} and the {len(specs) - len(summaries) - len(errors) - 1} "
                                     f"batches after it were not started: this worker is leaving (it lost its "
                                     f"scheduler, or is retired)")
            began = time.monotonic()
            try:
                summary = checked_summary(run_batch(
                    cfg, store, spec, logger=logger, run_ids=run_ids, check_commit=check_commits, read_range=reader,
                    committed=committed, halted=clock.halted if clock is not None else None,
                    grace_deadline=clock.grace_deadline if clock is not None else None))
            except BatchHandedOn as exc:  # SIGTERM mid-batch: what it did is saved, it and the rest go back
                raise ShardPreempted(f"{exc}; it and the {len(specs) - len(summaries) - len(errors) - 1} batches "
                                     f"after it go back to the coordinator: this worker's Slurm job got SIGTERM"
                                     ) from None
            except Exception as exc:  # an infrastructure fault in this batch: the others still run and commit
                errors.append(f"{spec.batch_id}: {type(exc).__name__}: {exc}")
                if logger is not None:
                    logger.warning("batch %s did not commit: %s: %s", spec.batch_id, type(exc).__name__, exc)
                continue
            if clock is not None:
                clock.record(time.monotonic() - began)
            summaries.append(summary)
            if on_commit is not None:
                on_commit(summary)
    finally:
        write_commit_log(store, cfg.job_id, specs[0].batch_id, committed, logger)
    if errors:
        raise ShardIncomplete(f"{len(errors)} of {len(specs)} batches did not commit: " + "; ".join(errors)[:1800])
    return summaries


def write_commit_log(store: Store, job_id: str, first: str, committed: list[dict[str, Any]],
                     logger: Any) -> None:
    """One object with copies of the task manifests this shard committed, so readers of the books (aggregate,
    resume, ``status --scan``) make one request per shard instead of one per batch. Best effort: a batch missing
    from every log is read from its own task manifest, which stays the commit; so is one whose copy the readers
    cannot prove current (``books.failures.committed_tasks``). Written once, after every commit it copies: that
    order is what the readers rely on."""
    if not committed:
        return
    try:
        store.put_json(Keys(job_id).commit_log(first, uuid.uuid4().hex[:12]),
                       {"schema_version": 1, "kind": "commit_log", "job_id": job_id, "tasks": committed})
    except Exception as exc:
        if logger is not None:
            logger.warning("commit log of the shard starting at %s not written (%s: %s); its batches' task "
                           "manifests are read one by one instead", first, type(exc).__name__, exc)


def dask_hooks(job_id: str) -> tuple[Callable[[dict[str, Any]], None] | None, Callable[[], bool]]:
    """On a Dask worker: send each commit to the coordinator as an event, and say whether the worker still has its
    scheduler (it closes when the connection breaks). Outside one (unit tests), nothing listens and nothing stops."""
    try:
        from distributed import get_worker
        from distributed.core import Status

        worker = get_worker()
    except (ImportError, ValueError):
        return None, lambda: True
    topic = commits_topic(job_id)
    alive = (Status.running, Status.paused)
    return (lambda summary: worker.log_event(topic, summary)), (lambda: worker.status in alive)


def clock_for(cfg: JobConfig) -> WorkerClock | None:
    """The worker's walltime clock when it runs in a Slurm worker job of this job's cluster; None elsewhere (a
    LocalCluster, unit tests, a coordinator)."""
    cluster = cfg.cluster
    if cluster.kind != "slurm" or not (os.environ.get("SLURM_JOB_ID") or os.environ.get(END_ENV)):
        return None
    return worker_clock(cluster.walltime, cluster.retire_margin_s, cluster.retire_stagger_s)


def on_sigterm(worker: Any) -> None:
    """A Slurm worker got SIGTERM (``flows/worker_plugin.py`` installs this instead of dask's immediate close): its
    shards start no further batch and their batches no further item; each batch commits, or saves a checkpoint of
    what its items in flight did (they get ``WorkerClock.grace_deadline``, inside the site's ``KillWait``), and the
    worker leaves once they have. Only an item still running at Slurm's SIGKILL is lost (its batch runs again)."""
    clock = current_clock()
    clock.terminate()
    if clock.leave():
        worker.loop.add_callback(_close_when_idle, worker, "slurmctl: SIGTERM, left between batches")


def retire_worker(logger: Any = None) -> None:
    """A shard stopped for this worker's walltime: the scheduler gives the worker no new shard from now on, and once
    the shards it runs have stopped too (each after its batch), it leaves the cluster. Its Slurm job ends, and the
    cluster's adaptive scaling starts a replacement while batches wait."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    if logger is not None:
        logger.info("worker %s leaves: its Slurm job's walltime is near, or it got SIGTERM", worker.name)
    worker.loop.add_callback(_close_when_idle, worker)


async def _close_when_idle(worker: Any, reason: str = "slurmctl: retired before its Slurm job's walltime") -> None:
    from distributed.core import Status

    worker.status = Status.closing_gracefully  # the scheduler assigns it nothing more
    # Not while a task executes: the scheduler would run it again elsewhere. Then as dask's close_gracefully does,
    # without its early return for a worker already closing gracefully: its data (shard results the coordinator
    # has not released yet) moves to another worker when there is one, and the worker closes.
    while worker.state.executing_count:
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # the last task's outcome reaches the scheduler first
    with contextlib.suppress(Exception):  # bounded: after a SIGTERM the scheduler may be gone already
        await asyncio.wait_for(worker.scheduler.retire_workers(
            workers=[worker.address], close_workers=False, remove=True,
            stimulus_id=f"slurmctl-walltime-{time.time()}"), timeout=5)
    await worker.close(nanny=True, reason=reason)


def shard_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """A shard's identity: job, its batches and their input digests, handler version. Never the flow run id."""
    cfg, shard = parameters["cfg"], parameters["shard"]
    ident = "|".join([cfg.job_id, parameters.get("handler_version", ""),
                      *(f"{s['batch_id']}:{s.get('digest', '')}" for s in shard["specs"])])
    first = shard["specs"][0]["batch_id"]
    return f"jobs/{cfg.job_id}/cache/{first}-{hashlib.sha256(ident.encode()).hexdigest()[:24]}"


def retry_unless_abandoned(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retries a shard that hit an infrastructure fault; an abandoned one (its worker is leaving) goes back
    to the coordinator at once, which queues its uncommitted batches again on another worker; a stopped one (the
    job reached its budget) too, which leaves them for ``slurmctl resume``."""
    return not isinstance(getattr(state, "data", None), (ShardAbandoned, ShardStopped, ShardRetiring))


@task(name="process-shard", task_run_name="{shard[name]}", cache_key_fn=shard_cache_key, persist_result=True,
      result_serializer="json", retry_delay_seconds=[2, 10, 30], retry_jitter_factor=0.5,
      retry_condition_fn=retry_unless_abandoned)
def process_shard(cfg: JobConfig, store: Store, shard: dict[str, Any], handler_version: str = "",
                  check_commits: bool = False) -> list[dict[str, Any]]:
    """``check_commits``: read each batch's commit first (set for a re-queued shard; always when this task run has
    executed before: a Prefect retry, or Dask running it again after the worker holding its result died)."""
    ctx = get_run_context()
    ids = (str(ctx.task_run.flow_run_id), str(ctx.task_run.id))
    on_commit, wanted = dask_hooks(cfg.job_id)
    logger = get_run_logger()
    clock = clock_for(cfg)
    try:
        check = check_commits or ctx.task_run.run_count > 1 or checkpoints.ran_before(store, cfg.job_id, ids[1])
        return run_shard(cfg, store, Shard.specs_of(shard), check_commits=check,
                         on_commit=on_commit, wanted=wanted, stopped=lambda: pass_stopped(ids[0]), logger=logger,
                         run_ids=ids, clock=clock)
    except ShardRetiring:
        if clock is not None and clock.leave():
            retire_worker(logger)
        raise
