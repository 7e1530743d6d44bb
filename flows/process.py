"""Phase 2: the uncommitted batches, cut into shards, as ``process_shard`` task runs on the job's Dask cluster.

``run_batches`` is shared with the retry phase. It plans the shards (``slurmctl.books.shards``: a bounded number of
task runs whatever the job's size), keeps at most two per worker thread in flight, folds each batch's summary into
the job's counters as its commit is reported (a Dask event per commit; the shard's result confirms them), writes the
counters to the job manifest every couple of seconds (the progress ``slurmctl status`` reads; the coordinator's
liveness is its separate heartbeat), and when a worker dies queues its shard's uncommitted batches again, without
touching the retry budget. Batches already committed are skipped, so a resumed job re-cuts only what is left. A job
with a ``budget:`` is watched after each commit (``flows/budget.py``): at a limit no further batch starts, the ones
running commit, and the pass ends with ``BudgetReached``.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import hashlib
import importlib
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.settings import PREFECT_API_URL

from slurmctl.books.checkpoints import checkpointed_batches
from slurmctl.books.failures import committed_batch_ids, list_batches, recount
from slurmctl.books.manifests import Counts, JobManifest, Keys, TaskManifest, now
from slurmctl.books.shards import Budget, Shard, plan_shards, waves_for, worker_slots
from slurmctl.books.store import load_job, read_plan, save_job, store_for, update_job
from slurmctl.config import JobConfig, parse_config
from slurmctl.flows import artifacts, budget, cancel, events, stop, task_states, worker_plugin
from slurmctl.flows.budget import BudgetGuard
from slurmctl.flows.replacement import Replacements
from slurmctl.item_run import shards_per_thread
from slurmctl.records import BatchSpec
from slurmctl.storage import Store
from slurmctl.tasks.process_batch import summary_of
from slurmctl.tasks.process_shard import ShardPreempted, ShardRetiring, ShardStopped, commits_topic, process_shard

HEARTBEAT_S = 2.0
# Exceptions that mean "the worker (or its Slurm job) running this batch went away", not "the batch failed".
WORKER_LOSS = ("KilledWorker", "FutureCancelledError", "CancelledError", "CommClosedError", "StreamClosedError",
               "WorkerLost", "ShardAbandoned")


# The Prefect message of a shard that handed its uncommitted batches back (its task run ends Cancelled).
HANDED_BACK = {
    ShardStopped: "the job reached its budget or was stopped: its uncommitted batches wait for `slurmctl resume`",
    ShardRetiring: "its worker retired before its Slurm job's walltime: its uncommitted batches were queued again",
    ShardPreempted: "its worker's Slurm job got SIGTERM: its uncommitted batches were queued again",
}


def dask_client() -> Any:
    """The flow run's Dask client (its task runner starts the cluster on first use); None when there is no flow
    run here or its task runner is not a Dask one (unit tests): then there is nothing to watch, listen to or start.

    Only those two cases mean "no client". Anything the client itself raises (the cluster failing to start, the
    scheduler unreachable) propagates: swallowed, it would silently switch off ``WorkerWatch`` (a lost cluster
    would then be waited for forever), the commit feed and the budget guard."""
    try:
        runner = get_run_context().task_runner
    except (MissingContextError, AttributeError):  # not in a run; a task run's context carries no task runner
        return None
    if "client" not in dir(runner):  # dir() lists the property without calling it: not a Dask task runner
        return None
    return runner.client


class NoWorkers(RuntimeError):
    """Batches are waiting and no Dask worker has been alive for ``no_workers_timeout_s``: the cluster is lost."""


# job id -> the batches of the shards running when a pass stopped waiting for them (a cancel, a stop signal), not
# counted: ``count_late_commits`` counts those that committed before their workers stopped.
_running_at_exit: dict[str, list[BatchSpec]] = {}


def commits_of(store: Store, job_id: str, specs: list[BatchSpec]) -> list[dict[str, Any]]:
    """The summaries of those of ``specs`` that have committed (one listing, a GET per commit): batches of shards the
    coordinator stopped hearing from, which may have committed since."""
    if not specs:
        return []
    committed = set(committed_batch_ids(store, job_id))
    return [summary_of(store.get_json(Keys(job_id).task(s.batch_id))) for s in specs if s.batch_id in committed]


def count_late_commits(store: Store, job_id: str) -> int:
    """The pass stopped waiting with shards running (``_running_at_exit``), and their workers have stopped since: add
    the batches of theirs that committed meanwhile to the job manifest's counts, so ``status`` counts every commit
    (as a resume would recount). Returns how many there were."""
    summaries = commits_of(store, job_id, _running_at_exit.pop(job_id, []))
    if summaries:
        counts = load_job(store, job_id).counts
        for summary in summaries:
            counts.add(summary)
        update_job(store, job_id, counts=counts)
    return len(summaries)


def cluster_outlives_pass() -> bool:
    """Is this pass's task runner connected to a cluster it did not start (``DaskTaskRunner(address=...)``: the job's
    local cluster, started early by the coordinator), which the next pass (a retry round) reuses?"""
    try:
        runner = get_run_context().task_runner
    except (MissingContextError, AttributeError):
        return False
    return bool(getattr(runner, "address", None))


class WorkerWatch:
    """Notices a cluster that has lost all its workers (Slurm walltime, scancel, a partition taken down)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.since: float | None = None
        self.client = dask_client()

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
        if self.cfg.cluster.kind != "slurm":
            return ""
        from slurmctl.slurm import jobs_named, slurm_job_name

        rows = jobs_named(slurm_job_name(self.cfg.job_id), "%i %T %r")
        return f" (Slurm worker jobs: {'; '.join(' '.join(r) for r in rows) or 'none'})"


_saved: dict[str, Store] = {}  # "<api url>|<block name>" -> the block this process saved there


def saved_store(store: Store) -> Store:
    """The store saved as a Prefect block (Prefect requires saved blocks for result storage); one per store URI,
    saved once per coordinator process: later calls get that block. A block of that name already on the server
    with the same settings (the last job on this store saved it) is used as it is: loading it takes ~0.06 s, saving
    ~0.6 s of the coordinator's CPU (block type and schema registration, round trips), spent while the cluster
    starts on the same cores."""
    name = "slurmctl-" + hashlib.sha256(store.uri("").encode()).hexdigest()[:16]
    where = f"{PREFECT_API_URL.value()}|{name}"
    if where not in _saved:
        found = _same_block(store, name)
        if found is None:
            store.save(name, overwrite=True)
        _saved[where] = found or store
    return _saved[where]


def _same_block(store: Store, name: str) -> Store | None:
    """The block ``name`` on the server if it holds exactly ``store``'s settings (secrets included), else None."""
    try:
        found = type(store).load(name)
    except Exception:  # not there, or saved by another release in another shape: save ours
        return None

    def settings(block: Store) -> dict[str, Any]:
        return {k: v for k, v in block.model_dump().items() if not k.startswith("_")}  # not the document's id

    return found if settings(found) == settings(store) else None


def is_worker_loss(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & set(WORKER_LOSS))


class CommitFeed:
    """Batch commits as the shards report them (Dask events), so the counters move per batch, not per shard.
    ``wake``: called after each commit arrives (a job with a budget looks at its spend at once)."""

    def __init__(self, job_id: str, wake: Any = None) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.topic = commits_topic(job_id)
        self.client = dask_client()  # None: the shards' results alone count
        if self.client is not None:
            def on_event(event: Any) -> None:
                self.queue.put(event[1])
                if wake is not None:
                    wake()

            self.client.subscribe_topic(self.topic, on_event)

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic(self.topic)


def listed_commits(store: Store, job_id: str) -> tuple[set[str], set[str]]:
    """The committed batches and the batches still carrying a failure marker, from one listing of ``tasks/`` (a
    phase's start). Markers of batches committed since they were written are removed here."""
    listing = list_batches(store, job_id)
    clear_markers(store, job_id, listing.stale_markers)
    return set(listing.committed), listing.marked - listing.stale_markers


def clear_markers(store: Store, job_id: str, batch_ids: set[str]) -> None:
    """Remove the failure markers (``tasks/<batch>.failed.json``) of batches that committed: the marker says why a
    batch did not commit, which is no longer true (and what it says would mislead whoever reads it)."""
    keys = Keys(job_id)
    for batch_id in sorted(batch_ids):
        store.delete(keys.failed_task(batch_id))


def plan_pass(cfg: JobConfig, specs: list[BatchSpec], cap: int) -> tuple[int, list[Shard]]:
    """The process phase's Dask threads (``_runner``: two per configured thread when items run concurrently) and
    the shards ``specs`` are cut into: waves counted over the configured threads (``books.shards.waves_for``)."""
    per_thread = shards_per_thread(cfg)
    slots = worker_slots(cfg) * per_thread
    return slots, plan_shards(specs, slots, cap, waves_for(cfg, per_thread))


def run_batches(cfg: JobConfig, store: Store, job: JobManifest, specs: list[BatchSpec],
                done: set[str] | None = None, max_shards: int | None = None,
                check_commits: bool = False, base: Future | None = None,
                marked: set[str] | None = None) -> list[str]:
    """Run ``specs`` (already-committed ones skipped) as shards and keep ``job.counts`` current; return failed
    batch ids. ``check_commits``: the shards read each batch's commit before running it (a caller that has not
    just listed the commits). ``base``: the counts of the ``done`` batches, still being recounted (a resume):
    until it is ready the counters start from the job manifest's last saved ones. ``marked``: uncommitted batches
    with a failure marker (``listed_commits``); the markers of those that commit in this pass are removed at its
    end (listed here when ``done`` is not given)."""
    logger = get_run_logger()
    if done is None:
        done, marked = listed_commits(store, job.job_id)
    todo_specs = [b for b in specs if b.batch_id not in done]
    slots, planned = plan_pass(cfg, todo_specs, max_shards or Budget.of(cfg).process)
    # Batches a SIGTERM stopped mid-way in an earlier run: their shards read the checkpoint (and the commit) first.
    resumable = checkpointed_batches(store, job.job_id) if todo_specs else set()
    shards = deque((shard, check_commits or any(s.batch_id in resumable for s in shard.specs)) for shard in planned)
    if todo_specs:
        logger.info("%s batches in %s shards (task runs) over %s worker threads", len(todo_specs), len(shards), slots)
    task = process_shard.with_options(retries=cfg.batch_retries, result_storage=saved_store(store))
    finished: queue.Queue = queue.Queue()
    in_flight: dict[Any, Shard] = {}
    requeues: dict[str, int] = {}
    counted: set[str] = set()
    failed: list[str] = []
    last_beat = 0.0
    watch = WorkerWatch(cfg)
    if watch.client is not None:
        # Workers close the handler instances they built when they stop; Slurm workers hear SIGTERM between batches.
        worker_plugin.register(watch.client, slurm=cfg.cluster.kind == "slurm")
    guard = BudgetGuard(cfg, watch.client, _pass_id())
    replacements = Replacements(cfg, watch.client, logger)  # Slurm: worker jobs replaced before they retire
    wake = object()  # in ``finished``: a commit arrived (budget jobs only), not a shard that ended
    feed = CommitFeed(job.job_id, (lambda: finished.put(wake)) if guard.active else None)
    stopped_left: list[BatchSpec] = []  # batches of shards stopped at the budget, not seen committed
    draining = [False]  # a stop signal came: nothing more is submitted, the shards running end after their batch
    # ...and the loop hears of it at once, not at its next beat: a shard must not start another batch meanwhile. (A
    # thread puts the wake-up: the signal handler may have interrupted this thread inside the queue's lock.)
    unlisten = stop.listen(lambda _: threading.Thread(target=finished.put, args=(wake,), daemon=True).start(),
                           lambda _: None)
    limit = max(1, min(cfg.max_in_flight, 2 * slots))
    emitter = events.live(job.job_id)  # the job's Prefect events (alerts), one of each kind per beat at most
    if emitter is not None:
        emitter.processing(len(todo_specs), slots)

    start, delta = job.counts.model_copy(), Counts()  # job.counts = (recounted base, or start) + this run's

    def fold(summary: dict[str, Any]) -> None:
        if summary["batch_id"] not in counted:
            counted.add(summary["batch_id"])
            delta.add(summary)
            if emitter is not None:
                emitter.batch(summary)

    def failed_one(batch_id: str) -> None:
        failed.append(batch_id)
        delta.batches_failed += 1

    def beat(force: bool = False) -> None:
        nonlocal last_beat
        for summary in feed.drain():
            fold(summary)
        if force and base is not None:
            base.result()  # the final counts wait for the recount
        ready = base.result() if base is not None and base.done() else None
        job.counts = (ready or start).plus(delta)
        due = force or time.monotonic() - last_beat >= HEARTBEAT_S
        guard.tick(job, sample_cores=due)
        if guard.check(job):
            shards.clear()  # nothing more is submitted; the shards in flight stop after their running batch
        if due:
            save_job(store, job)
            arts = artifacts.live(job.job_id)
            if arts is not None:  # the Prefect UI, a few seconds behind the commits
                arts.update(job)
            if emitter is not None:
                emitter.beat(job.counts)
            last_beat = time.monotonic()
            watch.check(waiting=bool(in_flight))
            replacements.tick()
        deadline = cancel.stop_deadline(job.job_id)
        if deadline is not None and in_flight and time.monotonic() < deadline:
            # A stop signal (flows/stop.py): the batches running get until the deadline to commit; none starts.
            if not draining[0]:
                draining[0] = True
                shards.clear()
                guard.stop()  # before saying so: once the log says it, no worker starts another batch
                logger.warning("stop signal: no new batch starts; waiting up to %.0f s for the %s shard(s) running "
                               "to commit their current batch", deadline - time.monotonic(), len(in_flight))
            else:
                guard.tell_again()
            return
        try:
            cancel.check(job.job_id)  # between batches: what is committed stays, the rest is not started
        except cancel.JobCancelled:
            if not due:  # the cancelled job's manifest counts every commit seen so far (status reads it)
                save_job(store, job)
            raise

    if guard.check(job):  # a job already at its budget (a re-run without raising it) starts nothing
        shards.clear()
    try:
        while shards or in_flight:
            while shards and len(in_flight) < limit:
                shard, check = shards.popleft()
                future = task.submit(cfg, store, shard.to_dict(), handler_version=job.handler_version or "",
                                     check_commits=check)
                in_flight[future] = shard
                future.add_done_callback(finished.put)
            try:
                future = finished.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                beat()
                continue
            if future is wake:
                beat()
                continue
            shard = in_flight.pop(future)
            try:
                for summary in release(future, future.result()):
                    fold(summary)
            except BaseException as exc:
                release(future)
                if is_worker_loss(exc):  # nobody else will say its task run ended (prefect#12969)
                    task_states.settle([task_states.task_run_id_of(future)], task_states.CRASHED,
                                       f"its worker was lost ({type(exc).__name__}: {exc}); the coordinator queues "
                                       f"its uncommitted batches again")
                if isinstance(exc, (ShardStopped, ShardRetiring)):  # handed back on purpose: Cancelled, not Failed
                    task_states.settle_handed_back([task_states.task_run_id_of(future)], HANDED_BACK[type(exc)])
                beat()  # commits the shard reported before it ended are counted first (a stop may end the pass)
                left = [s for s in shard.specs if s.batch_id not in counted]
                if (guard.stopping or draining[0]) and (is_worker_loss(exc) or isinstance(exc, (ShardStopped,
                                                                                              ShardRetiring))):
                    stopped_left += left  # stopped at the budget or by a signal (or lost meanwhile): left for resume
                    beat()
                    continue
                if isinstance(exc, ShardRetiring):
                    if left:
                        preempted = isinstance(exc, ShardPreempted)
                        if preempted:
                            job.worker_preemptions += 1
                        else:
                            job.worker_retirements += 1
                        logger.info("shard %s handed back %s uncommitted batches: its worker %s; running them on "
                                    "another worker", shard.name, len(left),
                                    "got SIGTERM" if preempted else "retires before its walltime")
                        shards.appendleft((Shard(tuple(left)), True))  # some may have committed unreported
                    continue
                if is_worker_loss(exc) and requeues.get(shard.name, 0) < cfg.worker_loss_requeues and left:
                    again = Shard(tuple(left))
                    requeues[again.name] = requeues.get(shard.name, 0) + 1
                    job.worker_loss_requeues += 1
                    logger.warning("shard %s lost its worker (%s: %s) with %s of its %s batches uncommitted; "
                                   "running those again (%s/%s)", shard.name, type(exc).__name__, exc, len(left),
                                   len(shard.specs), requeues[again.name], cfg.worker_loss_requeues)
                    shards.appendleft((again, True))  # some may have committed unreported: check first
                    beat(force=True)  # rare: operators see the requeue in the job manifest at once
                    continue
                fail_uncommitted(store, job, left, f"{type(exc).__name__}: {exc}", fold, failed_one)
            beat()
    finally:
        unlisten()
        feed.close()
        task_states.wait_settled()
        if in_flight:  # the pass ends (cancelled, stopped, failed) with shards running: their workers are closed
            # Their batches may still commit until then: the job flow counts those once the workers are gone.
            _running_at_exit[job.job_id] = [spec for shard in in_flight.values() for spec in shard.specs
                                            if spec.batch_id not in counted]
            task_states.settle(map(task_states.task_run_id_of, in_flight), task_states.CANCELLED,
                               "the coordinator stopped waiting for this shard (the job was cancelled or stopped); "
                               "its batches that did not commit run at resume")
    if watch.client is not None and not cluster_outlives_pass():
        # Every shard has ended, and this pass's cluster ends with it: workers close the handler instances they built.
        # On a cluster that outlives the pass (the job's local cluster, which runs its retry rounds too) they are
        # built once and closed when it closes (``worker_plugin.CloseHandlers``).
        worker_plugin.close_on_workers(watch.client, logger)
    for summary in commits_of(store, job.job_id, stopped_left):  # a commit whose report was lost with its shard
        fold(summary)
    beat(force=True)
    clear_markers(store, job.job_id, (marked or set()) & counted)  # every batch counted has a commit
    if guard.stopping:
        if any(s.batch_id not in counted for s in todo_specs):
            raise guard.reached_error(job)  # the phase ends Paused; the job flow records why
        budget.forget(job.job_id)  # the limit came with the last batch: nothing is left to pause
    if emitter is not None:
        emitter.processed(job.counts)
    return failed


def release(future: Any, result: Any = None) -> Any:
    """Let Dask forget a shard's outcome once it is read (Prefect persisted it): a worker holding outcomes nobody
    will read cannot leave cleanly (the scheduler would move them, or run their shards again elsewhere)."""
    with contextlib.suppress(Exception):
        future.wrapped_future.release()
    return result


def _pass_id() -> str | None:
    """This pass's flow run id (the process or retry subflow): the shards' task runs carry it, so a stop reaches
    only them. None outside a flow run (unit tests)."""
    try:
        return str(get_run_context().flow_run.id)
    except Exception:
        return None


def fail_uncommitted(store: Store, job: JobManifest, specs: list[BatchSpec], error: str,
                     fold: Any, failed_one: Any) -> None:
    """A shard failed for good: its batches that did commit are counted, the others recorded as failed."""
    logger = get_run_logger()
    keys = Keys(job.job_id)
    for spec in specs:
        committed = store.get_json(keys.task(spec.batch_id))
        if committed is not None:  # committed, but its report was lost with the shard
            fold(summary_of(committed))
            continue
        failed_one(spec.batch_id)
        logger.error("batch %s failed: %s", spec.batch_id, error)
        store.put_json(keys.failed_task(spec.batch_id), TaskManifest(
            job_id=job.job_id, batch_id=spec.batch_id, task_id=spec.batch_id, group=spec.group, status="failed",
            started_at=now(), finished_at=now(), items=spec.records, error=error[:2000],
        ).model_dump(mode="json"))


@flow(name="process", flow_run_name="{job_id} / process", log_prints=True)
@cancel.cancellable
def process_phase(job_id: str, config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    logger = get_run_logger()
    with ThreadPoolExecutor(2, thread_name_prefix="process-setup") as pool:
        # Started together, joined before the first shard (each ~1-2 s on a busy machine): the cluster (with the
        # workers importing the shard task) and Prefect's result-storage block, while this thread reads the plan
        # and lists the commits.
        setup = [pool.submit(contextvars.copy_context().run, fn, *args)  # in this flow run's Prefect context
                 for fn, args in ((start_workers, ()), (saved_store, (store,)))]
        job = load_job(store, job_id)
        plan = read_plan(store, job_id)
        done, marked = listed_commits(store, job_id)
        for f in setup:
            f.result()
        total = max(len(plan), job.counts.batches_total)
        if not done:
            job.counts = Counts(batches_total=len(plan), items_total=job.counts.items_total)
            return _processed(run_batches(cfg, store, job, plan, done, marked=marked), job)
        # Resuming: the first shards start at once; the committed batches are recounted meanwhile (one commit log
        # read per shard; ~1.4 s for 25,000 batches), and until then status shows the last saved counters.
        logger.info("resuming: %s batches already committed, %s in the plan", len(done), len(plan))
        job.counts = job.counts.model_copy(update={"batches_total": total})
        base = pool.submit(recount, store, job_id, total, job.counts.items_total, done)
        return _processed(run_batches(cfg, store, job, plan, done, base=base, marked=marked), job)


def _processed(failed: list[str], job: JobManifest) -> dict[str, Any]:
    return {"batches_done": job.counts.batches_done, "batches_failed": len(failed), "failed": failed[:100],
            "items_deferred": job.counts.items_deferred}


def start_workers() -> None:
    """Start the Dask cluster (the task runner starts it on first use) and have its workers import the shard task
    now (Prefect, pyarrow, the blocks: ~2.7 s in a fresh process) instead of when the first shard arrives."""
    client = dask_client()
    if client is not None:
        client.run(_import_shard_task, wait=False)


async def _import_shard_task() -> None:
    # A coroutine: Client.run may leave it running (wait=False); the worker's loop does the import.
    for module in ("slurmctl.tasks.process_shard", "slurmctl.blocks.manifest_store", "pandas"):  # local_workers.PRELOAD
        importlib.import_module(module)
    gc.freeze()  # what the imports built lives as long as the worker: out of its collections (flows/frozen_imports.py)
