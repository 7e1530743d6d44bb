"""Phase 4: merge the committed batch outputs into the job's dataset, hierarchically, and write the completion manifest.

Before anything is merged the books must balance (``slurmctl.books.audit``): every planned batch (initial and retry
rounds) has a commit, and succeeded + failed + rejected items equal the input's items. Otherwise the run fails
naming the missing batches and the difference, and ``slurmctl resume`` finishes it.

Then the merge tree of ``slurmctl.books.aggregation`` runs level by level, each level's merges spread over at most
its share of the job's task-run budget (``merge_chunk``: a task run performs many merges), then the final layout
(each partition's top merge, ``layout_output``) is written and published under ``output/``. Restarted after a
crash at any point, it skips every merge whose ``.done`` marker is there.

Deduplication: each input item id appears once in the output, with the rows of its latest occurrence: the last
committed attempt wins, and for an id repeated in the input its last occurrence. The rows dropped are counted per
batch (``duplicates``), and so are the item occurrences whose rows were replaced (``duplicate_items``: the books
count every occurrence of an id as an item, the output holds one). The output must then hold, for every batch,
exactly the rows it committed minus its dropped duplicates; otherwise the job fails listing the batches and the
difference.

``result.json`` (the completion manifest) is written last: output files with rows, sha256 and lineage (which
batches went into which file), duplicates, rejects and ``failures.jsonl`` (every item that is not in the output and
not rejected, with its error class). While the output is being replaced there is no ``result.json``: a reader never
takes a half-published output for a complete one.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from slurmctl import procpool
from slurmctl.books.aggregation import AggregationPlan, Merge, plan_aggregation
from slurmctl.books.audit import SHOWN, BooksUnbalanced
from slurmctl.books.audit import check as check_books
from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.books.manifests import Counts, Keys, ResultManifest, metric_counts
from slurmctl.books.shards import Budget, worker_slots
from slurmctl.books.store import load_job, save_job, store_for
from slurmctl.config import JobConfig, LocalClusterConfig, parse_config
from slurmctl.flows import cancel, local_workers
from slurmctl.flows.runners import task_runner_for
from slurmctl.storage import DeleteIncomplete, Store
from slurmctl.tasks.merge import MergeChunk, concat_rejects, dropped_by, layout_output, merge_chunk, put_jsonl


class OutputMismatch(RuntimeError):
    """The merged output does not hold the rows the committed batches wrote (minus the duplicates dropped)."""


def aggregate_runner(cfg: JobConfig, committed_batches: int) -> TaskRunner:
    """Where the merges run.

    On a Slurm cluster, the job's cluster (the data is spread over its nodes' work) when there is more than one
    first-level merge. On the embedded default the cluster's workers would be this machine's cores anyway: the
    coordinator's task runs, one thread per worker slot, without starting a second cluster (each worker imports
    Prefect and slurmctl again: ~4 s on 2 cores); a coordinator hands their merges to processes forked from its
    workers' template (``merge_processes``). The same tasks either way.
    """
    if isinstance(cfg.cluster, LocalClusterConfig):
        return ThreadPoolTaskRunner(max_workers=worker_slots(cfg))
    if committed_batches <= cfg.aggregate.fan_in:
        return ThreadPoolTaskRunner(max_workers=1)
    return task_runner_for(cfg.cluster, job_id=cfg.job_id)


def runs_per_level(cfg: JobConfig, levels: int) -> int:
    """Task runs a level's merges are spread over: two per worker slot (a slow one does not leave the others idle
    for long; each task run costs Prefect ~0.2 s), within the level's share of the aggregation's budget."""
    share = max(1, (Budget.of(cfg).aggregate - 1) // max(1, levels))  # the final layout is one more
    return max(1, min(share, 2 * worker_slots(cfg)))


def chunked(merges: list[Merge], runs: int) -> list[list[Merge]]:
    """``merges`` in at most ``runs`` contiguous, near-equal chunks (one task run each)."""
    runs = max(1, min(runs, len(merges)))
    size, extra = divmod(len(merges), runs)
    out, start = [], 0
    for i in range(runs):
        end = start + size + (1 if i < extra else 0)
        out.append(merges[start:end])
        start = end
    return [c for c in out if c]


def _chunk_name(chunk: list[Merge]) -> str:
    first, last = chunk[0], chunk[-1]
    return f"merge-{first.name}..{last.index:05d} ({len(chunk)})" if len(chunk) > 1 else f"merge-{first.name}"


def merge_processes(cfg: JobConfig, outputs: int) -> int:
    """How many processes run the merges and the final layout of ``outputs`` batch outputs: in a coordinator of a
    job on the embedded default, one per worker slot, forked from the workers' template (``slurmctl.procpool``: a
    merge holds the GIL for most of its work, so the coordinator's threads only wait for them, and for Prefect's
    own threads), when there is more than one first-level merge (starting them costs a small job more than it
    saves); otherwise none (0): they run in the task runs' threads."""
    return worker_slots(cfg) if local_workers.forking(cfg.cluster) and outputs > cfg.aggregate.fan_in else 0


def run_levels(store: Store, plan: AggregationPlan, tasks: list[dict[str, Any]], cfg: JobConfig,
               runs: int, processes: int = 0) -> tuple[Counter[int], Counter[int]]:
    """Run every unfinished merge, level by level, in ``runs`` task runs a level (one with ``processes``: the pool
    keeps them all busy); return what the whole plan dropped per batch ordinal: rows (duplicates) and item
    occurrences (superseded by a later occurrence of their id)."""
    logger = get_run_logger()
    rows: Counter[int] = Counter()
    items: Counter[int] = Counter()
    for level in plan.levels:
        cancel.check(cfg.job_id)  # finished merges are kept: a resumed aggregation starts where this one stopped
        no = level[0].level
        done = {k for k in store.list_keys(plan.level_prefix(no)) if k.endswith(".done")}
        todo = [m for m in level if plan.done_key(m) not in done]
        chunks = chunked(todo, 1 if processes else runs)  # the pool spreads them: one task run reports the level
        logger.info("aggregate level %s: %s merge(s) (%s done before) in %s task run(s)", no, len(level),
                    len(level) - len(todo), len(chunks))
        futures = [merge_chunk.with_options(task_run_name=_chunk_name(c)).submit(
            store, MergeChunk(_chunk_name(c), [plan.merge_spec(m, tasks) for m in c]),
            processes) for c in chunks]
        counts = [f.result() for f in futures]  # raises the first failure (after its retries) naming the file
        # merges finished by an earlier run: what they dropped belongs to this plan too, from their manifests
        counts.append(dropped_by([store.get_json(plan.manifest_key(m)) or {} for m in level
                                  if plan.done_key(m) in done]))
        for c in counts:
            rows.update({int(k): v for k, v in c["duplicates"].items()})
            items.update({int(k): v for k, v in c["superseded"].items()})
    return rows, items


def check_rows(job_id: str, tasks: list[dict[str, Any]], dropped: Counter[int], per_batch: dict[str, int],
               rows: int) -> int:
    """The output holds, batch by batch, the rows committed minus the duplicates dropped; returns the duplicates."""
    wrong = []
    for o, t in enumerate(tasks):
        want = (t.get("rows_written") or 0) - dropped.get(o, 0)
        got = per_batch.get(str(o), 0)
        if got != want:
            wrong.append(f"{t['batch_id']} {got - want:+d}")
    duplicates = sum(dropped.values())
    expected = sum(t.get("rows_written") or 0 for t in tasks) - duplicates
    if wrong or rows != expected:
        more = f" and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else ""
        raise OutputMismatch(f"job {job_id}: the merged output holds {rows} rows, but the committed batches wrote "
                             f"{expected + duplicates} minus {duplicates} duplicate(s) = {expected} "
                             f"({rows - expected:+d}); batches off: {', '.join(wrong[:SHOWN]) or 'none'}{more}. "
                             f"Nothing was published; `slurmctl aggregate {job_id}` runs the aggregation again")
    return duplicates


def publish(store: Store, keys: Keys, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy the final files under ``output/`` and remove what the previous output had besides; the previous
    completion manifest goes first, so nothing claims the output is complete while it changes."""
    store.delete(keys.result)
    published = []
    for f in files:
        key = keys.output_prefix + f["path"]
        store.copy(f["key"], key)
        published.append({**{k: v for k, v in f.items() if k not in ("key", "path")}, "uri": store.uri(key)})
    keep = {keys.output_prefix + f["path"] for f in files}
    for key in list(store.list_keys(keys.output_prefix)):
        if key not in keep:
            store.delete(key)
    return published


def remove_intermediates(store: Store, keys: Keys, logger: Any) -> None:
    """Remove the merge trees' files (this plan's and any earlier one's) once the output is published. Their
    ``.done`` markers go first: a delete cut short must not leave a marker vouching for a merge whose files are gone
    (a later aggregation with the same plan would skip that merge and fail reading them). What is left is said, not
    hidden; the output is complete either way."""
    try:
        store.delete_prefix(keys.aggregate_prefix, first=lambda key: key.endswith(".done"))
    except DeleteIncomplete as exc:
        logger.warning("the output is published, but intermediate files were left behind: %s. They only cost "
                       "storage; the next `slurmctl aggregate` removes them again", exc)


@flow(name="aggregate", flow_run_name="{job_id} / aggregate", log_prints=True)
@cancel.cancellable
def aggregate_phase(job_id: str, config: dict[str, Any]) -> dict[str, Any]:
    cfg = parse_config(config)
    store = store_for(cfg.storage)
    keys = Keys(job_id)
    logger = get_run_logger()
    job = load_job(store, job_id)
    if not store.exists(keys.plan):
        raise BooksUnbalanced(f"job {job_id} has not been partitioned yet, so there is nothing to aggregate; "
                              f"`slurmctl resume {job_id}` processes it (and aggregates at the end)")
    try:
        if early := merge_processes(cfg, job.counts.batches_total):  # the batches planned: they start meanwhile
            procpool.start(early)
        tasks = committed_tasks(store, job_id)
        state = failure_state(store, tasks)
        books = check_books(store, job, tasks, state)  # nothing is merged for a job that cannot complete
        plan = plan_aggregation(job_id, tasks, cfg.aggregate, cfg.input.id_field)
        outputs = sum(1 for t in tasks if t.get("output"))
        logger.info("aggregate plan %s: %s batch output(s), %s hash partition(s), fan-in %s, %s level(s), %s "
                    "merge(s)", plan.plan_id, outputs, plan.buckets, plan.fan_in, len(plan.levels), plan.merges)
        processes = merge_processes(cfg, outputs)
        dropped, superseded = run_levels(store, plan, tasks, cfg, runs_per_level(cfg, len(plan.levels)), processes)
        layout_output.submit(store, plan.final_spec(tasks, cfg.aggregate), processes).result()
    finally:
        procpool.shutdown()  # the merges' processes, if any: nothing else needs them
    final = store.get_json(plan.final_manifest)
    if final is None:
        raise OutputMismatch(f"job {job_id}: the final layout's manifest {store.uri(plan.final_manifest)} is missing")
    top = dropped_by([final])  # the final layout is each partition's top merge
    dropped.update({int(k): v for k, v in top["duplicates"].items()})
    superseded.update({int(k): v for k, v in top["superseded"].items()})
    duplicate_items = sum(superseded.values())
    duplicates = check_rows(job_id, tasks, dropped, final["rows_per_batch"], final["rows"])
    outputs = publish(store, keys, final["files"])
    rejects = concat_rejects(store, tasks, keys.rejects)
    failures = None
    if state:
        lines = b"".join(json.dumps({k: v for k, v in r.items() if k != "item"}, default=str).encode() + b"\n"
                         for r in state.values())
        failures = put_jsonl(store, keys.failures, lines)
    else:
        store.delete(keys.failures)
    rows = final["rows"]
    single = len(outputs) == 1 and not cfg.aggregate.partition_by and not cfg.aggregate.max_rows_per_file
    output_uri = store.uri(keys.output) if single else store.uri(keys.output_prefix).rstrip("/") + "/"
    result = ResultManifest(
        job_id=job_id, output=output_uri, outputs=outputs, rejects=rejects, failures=failures, rows=rows,
        duplicates=duplicates, duplicate_items=duplicate_items, batches=len(tasks), items_total=books.items_total,
        items_succeeded=books.items_succeeded, items_failed=books.items_failed, items_rejected=books.items_rejected,
        rows_written=books.rows_written, plan_id=plan.plan_id,
        layout={"partition_by": cfg.aggregate.partition_by, "max_rows_per_file": cfg.aggregate.max_rows_per_file,
                "hash_partitions": plan.buckets, "fan_in": plan.fan_in, "levels": len(plan.levels)})
    store.put_json(keys.result, result.model_dump(mode="json"))
    job = load_job(store, job_id)
    job.output = output_uri
    job.counts = Counts(batches_total=books.batches_planned, batches_done=len(tasks), items_total=books.items_total,
                        items_succeeded=books.items_succeeded, items_failed=books.items_failed, items_deferred=0,
                        items_rejected=books.items_rejected, rows_written=books.rows_written, duplicates=duplicates,
                        duplicate_items=duplicate_items, **metric_counts(tasks))
    save_job(store, job)
    remove_intermediates(store, keys, logger)
    logger.info("wrote %s rows in %s file(s) to %s (%s duplicate row(s) dropped); %s items succeeded, %s failed, "
                "%s rejected (of %s); %s item(s) superseded by a later occurrence of their id", rows, len(outputs),
                output_uri, duplicates, books.items_succeeded, books.items_failed, books.items_rejected,
                books.items_total, duplicate_items)
    return {"output": output_uri, "rows": rows, "duplicates": duplicates, "duplicate_items": duplicate_items}
