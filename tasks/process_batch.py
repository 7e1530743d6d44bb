"""One batch: run the handler over its items and commit it exactly once (``run_batch``; shards call it).

* When asked (a re-executed shard, a re-queue after a worker died), it first checks whether the batch already
  committed: then it returns the committed summary and calls nothing. A first execution skips that read: the
  coordinator has just listed the commits, and the create-if-absent commit refuses a second one anyway.
* Each item runs with in-batch retries for transient error classes (backoff with jitter, ``Retry-After``), and a
  circuit breaker that defers the rest of the batch when one transient class dominates; one at a time, or many in
  flight for an async handler or ``concurrency`` (``slurmctl.item_run``), its outcomes collected in input order.
* A failing item never fails its batch: the batch commits its successes and records failures and deferred items in
  its retry manifest. Only infrastructure faults (store unreachable, input changed) raise; the shard's Prefect task
  ``retries`` cover those.
* The commit is the task manifest, written create-if-absent after everything it points to, with the sha256 of each
  part it names. A refused commit deletes this attempt's files only when another attempt's manifest is there.

It returns a small summary (counts and keys), never the data.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import time
import uuid
from collections import Counter
from typing import Any, Callable

import pyarrow.parquet as pq

from slurmctl import output_schema, pace_advice
from slurmctl.batch_metrics import BatchMeter
from slurmctl.batch_run import ITEM_INDEX, BatchRun, is_batch_mode
from slurmctl.books import checkpoints
from slurmctl.books.input_chunks import ChunkReader
from slurmctl.books.input_files import InputChanged, describe_line
from slurmctl.books.limits import leasers_for
from slurmctl.books.manifests import Keys, TaskManifest, concurrency_needed_of, limit_slots_of, loop_held_of, now
from slurmctl.config import JobConfig
from slurmctl.errors import CircuitBreaker, Classified, ErrorPolicy, ItemOutcome
from slurmctl.handler import BatchContext, handler_for
from slurmctl.item_run import ItemRun, is_concurrent
from slurmctl.records import BatchSpec, read_batch
from slurmctl.storage import Store, sha256_bytes
from slurmctl.tables import rows_table, write_sqlite

# A summary without any of these describes no batch (``checked_summary``); the rest may be None.
REQUIRED_SUMMARY_FIELDS = ("batch_id", "status", "items_succeeded", "items_failed", "items_deferred", "items_rejected",
                           "rows_written")
SUMMARY_FIELDS = (*REQUIRED_SUMMARY_FIELDS, "retried_failed", "retried_deferred", "slurm_job_id", "host")


class BatchHandedOn(RuntimeError):
    """The batch heard SIGTERM mid-way: it started no further item, saved what its items in flight did as a
    checkpoint (``slurmctl.books.checkpoints``) and did not commit. The shard hands it back with the batches after
    it; the attempt that runs it next takes the checkpoint's outcomes and runs only the rest."""


class CommitUnresolved(RuntimeError):
    """The store refused our create-if-absent commit but no committed manifest can be read: an infrastructure
    fault (retried like one), never a batch counted done."""


def rows_to_parquet(rows: list[dict[str, Any]], lines: list[int] | None = None,
                    row_index: list[int] | None = None) -> bytes:
    """Rows as Parquet bytes, with the input line and row index of each (``slurmctl.tables``)."""
    return table_to_parquet(rows_table(rows, lines if lines is not None else list(range(len(rows))),
                                       row_index if row_index is not None else [0] * len(rows)))


def table_to_parquet(table: Any) -> bytes:
    """A part's rows (with their line and row-index columns) as Parquet bytes.

    Snappy, not zstd: a part is small, written once and read once by a merge, and zstd's set-up per page dominated
    both (1,000 rows: write 0.81 -> 0.50 ms, read 0.45 -> 0.31 ms; 100 rows: 0.46 -> 0.25, 0.33 -> 0.18), for
    parts about 1.3-1.9x the size. The job's output stays zstd."""
    buf = io.BytesIO()
    pq.write_table(part_columns(table), buf, compression="snappy")
    return buf.getvalue()


def table_to_sqlite(table: Any) -> bytes:
    """A part's rows as the bytes of a SQLite database (``part_format: sqlite``), built in a scratch file."""
    with tempfile.TemporaryDirectory(prefix="slurmctl-part-") as scratch:
        path = os.path.join(scratch, "part.sqlite")
        write_sqlite(part_columns(table), path)
        with open(path, "rb") as f:
            return f.read()


def part_columns(table: Any) -> Any:
    """The part's columns: the batch handler's fast path keeps its item index column until here."""
    return table.drop_columns([ITEM_INDEX]) if ITEM_INDEX in table.column_names else table


def jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, default=str).encode() + b"\n" for r in records)


def summary_of(task_manifest: dict[str, Any]) -> dict[str, Any]:
    """The few fields of a task manifest the coordinator keeps (a task's return value: keys and counts, not data),
    ``tokens_waited_s``: the seconds its handler calls were blocked on rate limits (the token-wait alert),
    ``api_calls``: its handler calls (the budget), ``in_flight_max``: the most items its worker process had in
    flight while it ran (1: one at a time), and what the job's pace advice reads (``limit_slots``,
    ``limit_slots_late``, ``concurrency_needed``, ``loop_held_s``: ``books.manifests.Counts``)."""
    metrics = task_manifest.get("metrics") or {}
    slots, late = limit_slots_of(task_manifest)
    return {**{k: task_manifest.get(k) for k in SUMMARY_FIELDS},
            "tokens_waited_s": float(metrics.get("tokens_waited_s") or 0),
            "api_calls": int(metrics.get("api_calls") or 0), "in_flight_max": int(metrics.get("in_flight_max") or 1),
            "limit_slots": slots, "limit_slots_late": late, "concurrency_needed": concurrency_needed_of(task_manifest),
            "loop_held_s": loop_held_of(task_manifest)}


def run_batch(cfg: JobConfig, store: Store, spec: BatchSpec, *, logger: Any = None,
              run_ids: tuple[str | None, str | None] = (None, None),
              sleep: Callable[[float], None] = time.sleep, check_commit: bool = True,
              read_range: Callable[[str, int, int], bytes] | None = None,
              committed: list[dict[str, Any]] | None = None,
              halted: Callable[[], bool] | None = None,
              grace_deadline: Callable[[], float | None] | None = None) -> dict[str, Any]:
    """Process one batch and commit it; return its summary. Plain function: benchmarks and tests call it directly.

    ``check_commit=False`` skips the read of the batch's commit before the handler runs: the coordinator passes it
    for a batch it has just seen uncommitted in its listing, running for the first time (one store request fewer per
    batch). The create-if-absent commit still refuses a second commit, so the output stays exactly once; only the
    handler calls of a zombie from an earlier coordinator are repeated. ``read_range`` serves the slice (a shard
    reads its batches' bytes in one request). The batch's committed task manifest (ours, or the attempt that won) is
    appended to ``committed`` (a shard's commit log).

    ``halted``: asked before each item; once it says yes (the worker's Slurm job got SIGTERM), no further item
    starts, the items in flight get until ``grace_deadline()`` (``time.monotonic()``), and if any item is left
    without an outcome the batch saves a checkpoint and raises ``BatchHandedOn`` instead of committing. With
    ``check_commit`` the batch's latest checkpoint is read first and its items are not run again.
    """
    keys = Keys(cfg.job_id)
    if check_commit:
        winner = store.get_json(keys.task(spec.batch_id))
        if winner is not None:
            if committed is not None:
                committed.append(winner)
            return {**summary_of(winner), "already_committed": True}

    attempt = uuid.uuid4().hex[:12]
    handler = handler_for(cfg.handler, cfg.params)
    meter = BatchMeter(concurrent=is_concurrent(cfg, handler))  # the batch's clock, CPU and call latencies
    id_field = cfg.input.id_field
    uri = (spec.file or cfg.input.uri) if spec.source == "input" else store.uri(spec.source)
    if spec.chunk:  # a compressed input: the batch's bytes are in a chunk of the job's store
        uri, read_range = spec.chunk, ChunkReader(store)
    sliced = read_batch(store.open_uri, read_range or store.read_range, uri, cfg.input.format, spec, id_field,
                        cfg.input.encoding)
    if spec.digest and sliced.digest != spec.digest:
        raise InputChanged(f"{spec.batch_id}: input slice digest {sliced.digest} differs from the partitioned "
                           f"{spec.digest}{f' (file {spec.file})' if spec.file else ''}; the input changed while the "
                           f"job ran — submit it as a new job")
    if spec.input_identity and spec.source == "input":  # after the read: a rewrite during it is caught too
        identity = store.input_identity(uri)
        if identity != spec.input_identity:
            raise InputChanged(f"{spec.batch_id}: the input {uri} is now {identity}, but was {spec.input_identity} "
                               f"when it was partitioned; the input changed while the job ran — submit it as a new "
                               f"job")
    ctx = BatchContext(cfg.job_id, spec.batch_id, params=cfg.params, logger=logger, limiters=leasers_for(cfg))
    e = cfg.errors
    breaker = (CircuitBreaker(e.circuit_breaker.window, e.circuit_breaker.threshold, e.circuit_breaker.min_attempts,
                              ErrorPolicy.of(e).transient) if e.circuit_breaker.enabled else None)
    item_retries: Counter[str] = Counter()

    def on_retry(err: Any, attempt_no: int, wait: float) -> None:
        item_retries[err.error_class] += 1
        ctx.count("item_retry_wait_s", wait)

    resumed = checkpoints.latest(store, cfg.job_id, spec.batch_id, sliced.digest) if check_commit else None
    saved = resumed or checkpoints.Checkpoint(spec.batch_id, sliced.digest)
    todo = [entry for entry in sliced.items if entry[0] not in saved.done]
    run: ItemRun | BatchRun
    if is_batch_mode(cfg):  # one call for the batch; per-item outcomes all the same (slurmctl.batch_run)
        run = BatchRun(cfg, handler, ctx, meter, on_retry, sleep)
        outcomes = run.run(todo)
    else:
        run = ItemRun(cfg, handler, ctx, meter, breaker, on_retry, sleep, halted=halted,
                      grace_deadline=grace_deadline)
        outcomes = run.concurrently(todo) if run.concurrent else run.one_by_one(todo)

    # The checkpoint's outcomes first (their rows, failures and handler calls), then this attempt's.
    rows: list[dict[str, Any]] = list(saved.rows)
    lines: list[int] = list(saved.lines)  # each row's input line and its index within its item's output (dedup key)
    row_index: list[int] = list(saved.row_index)
    failed: list[dict[str, Any]] = list(saved.failed)
    deferred: list[dict[str, Any]] = []
    succeeded = saved.succeeded
    table = run.table() if isinstance(run, BatchRun) else None  # the rows, still Arrow (``BatchRun.table``)
    if table is not None and (saved.done or not table_fits_schema(cfg, store, table)):
        outcomes, table = run.as_rows(outcomes), None  # row by row: names the items whose rows do not fit
    elif table is None and not saved.done:
        table = fitting_table(cfg, store, todo, outcomes)
    if table is None:
        outcomes = check_schema(cfg, store, outcomes)
    if halted is not None and halted() and any(o is None for o in outcomes):
        hand_on(cfg, store, saved, todo, outcomes, breaker, meter, spec, logger)
    for (line, item), outcome in zip(todo, outcomes):
        if outcome is None:  # not started: the breaker had opened
            deferred.append({"id": item.get(id_field), "line": line, "item": item})
        elif outcome.ok and table is not None:
            succeeded += 1  # its rows are in ``table``
        elif outcome.ok:
            add_rows(rows, lines, row_index, line, outcome.result)
            succeeded += 1
        elif breaker is not None and breaker.open and outcome.error.transient:
            deferred.append({"id": item.get(id_field), "line": line, "item": item})
        else:
            failed.append(failure_record(spec, line, item, id_field, outcome))

    if breaker is not None and breaker.open:
        # Items that already failed with the class that tripped the breaker were victims of the same storm:
        # defer them too, rather than marking them failed.
        storm = [f for f in failed if f["error_class"] == breaker.tripped_by]
        failed = [f for f in failed if f["error_class"] != breaker.tripped_by]
        deferred += [{"id": f["id"], "line": f["line"], "item": f["item"]} for f in storm]

    manifest = TaskManifest(
        job_id=cfg.job_id, batch_id=spec.batch_id, task_id=spec.batch_id.replace("batch", "task", 1),
        group=spec.group, phase="process" if spec.source == "input" else "retry",
        # ``throttled`` says the batch left items to a retry round: a breaker that opened after every item had
        # started and succeeded (its window filled with 429s that were then retried) deferred nothing.
        status="throttled" if breaker is not None and breaker.open and deferred else "succeeded",
        input_digest=sliced.digest, started_at=meter.started_at, finished_at=meter.started_at, items=spec.records,
        items_succeeded=succeeded, items_failed=len(failed), items_deferred=len(deferred),
        items_rejected=len(sliced.rejects), rows_written=table.num_rows if table is not None else len(rows),
        retried_failed=sliced.previous.get("failed", 0), retried_deferred=sliced.previous.get("deferred", 0),
        checkpoint=saved.key, items_resumed=len(saved.done),
        retried_ids=[item[id_field] for _, item in sliced.items] if spec.source != "input" else [],
        retried_lines=[line for line, _ in sliced.items] if spec.source != "input" else [],
        error_classes=dict(Counter(f["error_class"] for f in failed)), tripped_by=breaker and breaker.tripped_by,
        host=socket.gethostname(), slurm_job_id=os.environ.get("SLURM_JOB_ID"), flow_run_id=run_ids[0],
        task_run_id=run_ids[1], attempt=attempt)
    written: list[str] = []
    if saved.done:  # the part keeps input order, as a batch run in one go writes it
        position = {line: i for i, (line, _) in enumerate(sliced.items)}
        order = sorted(range(len(rows)), key=lambda i: (position[lines[i]], row_index[i]))
        rows, lines, row_index = [rows[i] for i in order], [lines[i] for i in order], [row_index[i] for i in order]
    if table is None and rows:
        table = rows_table(rows, lines, row_index)
    if table is not None and table.num_rows:
        data, suffix = (table_to_sqlite(table), "sqlite") if cfg.part_format == "sqlite" else (
            table_to_parquet(table), "parquet")
        manifest.output = keys.batch_output(spec.batch_id, attempt, suffix)
        manifest.output_sha256 = sha256_bytes(data)
        store.put_bytes(manifest.output, data)
        written.append(manifest.output)
    if sliced.rejects:
        for r in sliced.rejects:
            r["batch_id"] = spec.batch_id
            if spec.file:
                r.update(describe_line(spec.file, r["line"], spec.line_base))
        manifest.rejects = keys.batch_rejects(spec.batch_id, attempt)
        data = jsonl_bytes(sliced.rejects)
        manifest.rejects_sha256 = sha256_bytes(data)
        store.put_bytes(manifest.rejects, data)
        written.append(manifest.rejects)
    if failed or deferred:
        manifest.retry = keys.batch_retry(spec.batch_id, attempt)
        store.put_json(manifest.retry, {"schema_version": 1, "kind": "retry", "job_id": cfg.job_id,
                                        "batch_id": spec.batch_id, "attempt": attempt, "failed": failed,
                                        "deferred": deferred, "tripped_by": manifest.tripped_by})
        written.append(manifest.retry)

    manifest.metrics = meter.metrics(spec.records, {
        **dict(ctx.metrics), **{f"item_retries_{k}": v for k, v in item_retries.items()}, **run.reached()},
        ctx.limiter_waiting_s)
    if saved.api_calls:
        manifest.metrics.api_calls = (manifest.metrics.api_calls or 0) + saved.api_calls
    held = False
    if isinstance(run, ItemRun):
        held = pace_advice.warn_loop_held(cfg.job_id, spec.batch_id, run.loop_held, logger)
        pace_advice.warn_fixed_concurrency(cfg.job_id, spec.batch_id, run, logger)
        pace_advice.warn_concurrency_cap(cfg.job_id, spec.batch_id, run.gate, logger)
        pace_advice.warn_memory_hold(cfg.job_id, spec.batch_id, run.gate, logger)
    pace_advice.warn_undeclared_throttling(cfg.job_id, spec.batch_id, bool(cfg.rate_limits), item_retries["throttle"],
                                           int(manifest.metrics.api_calls or 0), logger)
    if not held:  # a handler holding the loop makes its slots late: said above, with its own fix
        pace_advice.warn_late_slots(cfg.job_id, spec.batch_id, ctx, logger)
    manifest.finished_at = manifest.metrics.finished_at or now()
    return commit(store, keys.task(spec.batch_id), manifest.model_dump(mode="json"), written, committed)


def table_fits_schema(cfg: JobConfig, store: Store, table: Any) -> bool:
    """``check_schema`` for rows still in a table: True when every row fits the output's schema (declared, or
    recorded, recording the table's if the job has none yet); False: check the items row by row."""
    schema = output_schema.declared(cfg, store)
    strict = schema is not None
    if schema is None:
        schema = output_schema.recorded(store, cfg.job_id, lambda: output_schema.infer_table(table))
    return schema is None or output_schema.table_fits(table, schema, strict)


def add_rows(rows: list[dict[str, Any]], lines: list[int], row_index: list[int], line: int,
             result: list[dict[str, Any]]) -> None:
    """One item's rows, each with its input line and its index within the item's rows (the dedup key)."""
    rows.extend(result)
    lines.extend([line] * len(result))
    row_index.extend(range(len(result)))


def fitting_table(cfg: JobConfig, store: Store, todo: list[tuple[int, Any]], outcomes: list[Any]) -> Any:
    """The rows of the items that succeeded, as the part's table, when all of them fit the output's schema: one
    conversion of each column serves the check and the part. None when some may not (``check_schema`` then names
    the items, row by row) or no item returned rows."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    row_index: list[int] = []
    for (line, _), outcome in zip(todo, outcomes):
        if outcome is not None and outcome.ok:
            add_rows(rows, lines, row_index, line, outcome.result)
    if not rows:
        return None
    try:
        table = rows_table(rows, lines, row_index)
    except TypeError:  # a column of mixed types: some item's rows cannot fit
        return None
    return table if table_fits_schema(cfg, store, table) else None


def check_schema(cfg: JobConfig, store: Store, outcomes: list[Any]) -> list[Any]:
    """Items whose rows do not fit the output's schema (declared, or recorded from the first batch) fail with class
    ``schema`` (``slurmctl.output_schema``); the others keep their rows."""
    oks = [i for i, o in enumerate(outcomes) if o is not None and o.ok and o.result]
    if not oks:
        return outcomes
    items_rows = [outcomes[i].result for i in oks]
    schema = output_schema.declared(cfg, store)
    strict = schema is not None
    if schema is None:
        schema = output_schema.recorded(store, cfg.job_id,
                                        lambda: output_schema.infer([r for rows in items_rows for r in rows]))
    if schema is None:
        return outcomes
    bad = output_schema.violations(items_rows, schema, strict)
    if not bad:
        return outcomes
    outcomes = list(outcomes)
    for j, why in bad.items():
        i = oks[j]
        outcomes[i] = ItemOutcome(False, error=Classified("schema", False, "SchemaMismatch", why),
                                  attempts=outcomes[i].attempts)
    return outcomes


def failure_record(spec: BatchSpec, line: int, item: dict[str, Any], id_field: str, outcome: Any) -> dict[str, Any]:
    err = outcome.error
    return {"id": item.get(id_field), "line": line, "batch_id": spec.batch_id, "error_class": err.error_class,
            "error_type": err.error_type, "message": err.message, "status": err.status, "attempts": outcome.attempts,
            "item": item, **(describe_line(spec.file, line, spec.line_base) if spec.file else {})}


def hand_on(cfg: JobConfig, store: Store, saved: checkpoints.Checkpoint, todo: list[tuple[int, Any]],
            outcomes: list[Any], breaker: CircuitBreaker | None, meter: BatchMeter, spec: BatchSpec,
            logger: Any) -> None:
    """SIGTERM stopped the batch with items left: save the outcomes it has (the earlier checkpoint's and this
    attempt's) as its next checkpoint and raise ``BatchHandedOn``. A transient failure while the breaker is open is
    no outcome here: the next attempt runs that item again."""
    cp = checkpoints.Checkpoint(spec.batch_id, saved.input_digest, set(saved.done), saved.succeeded,
                                list(saved.rows), list(saved.lines), list(saved.row_index), list(saved.failed),
                                saved.api_calls + len(meter.latencies), saved.n)
    storm = breaker is not None and breaker.open
    for (line, item), outcome in zip(todo, outcomes):
        if outcome is None or (not outcome.ok and storm and outcome.error.transient):
            continue
        cp.done.add(line)
        if outcome.ok:
            cp.rows.extend(outcome.result)
            cp.lines.extend([line] * len(outcome.result))
            cp.row_index.extend(range(len(outcome.result)))
            cp.succeeded += 1
        else:
            cp.failed.append(failure_record(spec, line, item, cfg.input.id_field, outcome))
    new = len(cp.done) - len(saved.done)
    key = checkpoints.save(store, cfg.job_id, cp) if new else saved.key
    kept = len(cp.done) if key and new else len(saved.done)  # a lost race keeps the earlier checkpoint only
    where = f"checkpoint {key}" if kept else "no checkpoint"
    if new and key is None:
        where += " (another attempt saved one first: this attempt's items run again)"
    if logger is not None:
        logger.info("batch %s stopped by SIGTERM: %s of its %s items have an outcome (%s); the rest are handed on",
                    spec.batch_id, kept, spec.records, where)
    raise BatchHandedOn(f"{spec.batch_id}: SIGTERM; {kept} of its {spec.records} items saved ({where}), the rest "
                        f"not run")


def commit(store: Store, key: str, manifest: dict[str, Any], written: list[str],
           committed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the task manifest create-if-absent, last: the batch's commit. Return the committed batch's summary.

    A refusal is not proof that another attempt won: a conditional write whose response was lost (a 5xx after the
    write, a read timeout) is retried by botocore and refused by our own earlier write; on NFS a retransmitted link
    fails with EEXIST. So the winner's ``attempt`` is compared with ours before anything is deleted. A refusal with
    no readable winner raises ``CommitUnresolved`` (Prefect retries the task; nothing is cached).
    """
    if store.put_json(key, manifest, if_absent=True):
        if committed is not None:
            committed.append(manifest)
        return summary_of(manifest)
    winner = store.get_json(key)
    if winner is None:
        raise CommitUnresolved(f"{manifest['batch_id']}: the store refused the commit {store.uri(key)} as already "
                               f"present, but nothing can be read there; the batch will be retried")
    if committed is not None:
        committed.append(winner)
    if winner.get("attempt") == manifest["attempt"]:
        return summary_of(winner)  # our own write: the refusal answered a retry of it
    for part in written:  # another attempt committed first (a zombie, a re-run): ours is discarded
        store.delete(part)
    return {**summary_of(winner), "duplicate": True}


def checked_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary is folded into the job's counters and cached by Prefect: refuse one that describes no batch."""
    missing = [k for k in REQUIRED_SUMMARY_FIELDS if summary.get(k) is None]
    if missing:
        raise CommitUnresolved(f"batch summary without {', '.join(missing)}: {summary}")
    return summary
