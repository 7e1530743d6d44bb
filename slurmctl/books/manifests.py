"""Manifests: the source of truth for what a job is, what each batch did, and what the job produced.

All manifests are JSON with ``schema_version`` and a ``checksum`` (added by ``ManifestStore.put_json``). Layout of a
job under the store root::

    jobs/<job_id>/job.json                 JobManifest: config, phase, status, counters
    jobs/<job_id>/heartbeat.json           the coordinator's heartbeat (at, pid, host), every 2 s in every phase
    jobs/<job_id>/control.json             operator intent: {"paused": true} (written by pause/resume only)
    jobs/<job_id>/plan.jsonl               one BatchSpec per line (written once by partition)
    jobs/<job_id>/tasks/<batch_id>.json    TaskManifest of the committed attempt: written create-if-absent, it *is*
                                           the batch's commit (exactly one attempt wins)
    jobs/<job_id>/tasks/<batch_id>.failed.json  the last failure of a batch that has not committed
    jobs/<job_id>/outputs/<batch_id>.<attempt>.parquet  an attempt's rows (.sqlite with part_format: sqlite;
                                           only the committed one is ever read)
    jobs/<job_id>/rejects/<batch_id>.<attempt>.jsonl malformed records of that batch (line, reason, raw)
    jobs/<job_id>/retry/<batch_id>.<attempt>.json  retry manifest: failed items (id, line, class, message,
                                           attempts, the item) and items deferred by the circuit breaker
    jobs/<job_id>/retry/round-NN.plan.jsonl  the items a retry round takes (its batches are slices of it)
    jobs/<job_id>/retry/round-NN.batches.jsonl  that round's batch specs
    jobs/<job_id>/commits/<batch_id>.<attempt>.json  a shard's commit log: copies of the task manifests it
                                           committed (<batch_id> = its first batch); the tasks/ listing stays the truth
    jobs/<job_id>/cache/<batch_id>-<hash>  Prefect result records of shard tasks (the task cache; <batch_id> = the
                                           shard's first batch)
    jobs/<job_id>/aggregate/<plan_id>/     the aggregation's merges while it runs: L<level>/<n>.json (manifest),
                                           <n>.done, <n>-b<partition>.parquet, final/ (books.aggregation)
    jobs/<job_id>/output/data.parquet      the final dataset (or output/part-NNNNN.parquet, output/<col>=<v>/...)
    jobs/<job_id>/rejects.jsonl            all rejects, merged by aggregate
    jobs/<job_id>/result.json              ResultManifest: final outputs, row counts, sha256
    jobs/<job_id>/gc.json                  what `slurmctl gc` removed of a completed job, and when (books.gc)
"""

from __future__ import annotations

import datetime as _dt
import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slurmctl.safe_keys import check_name

SCHEMA_VERSION = 1
#: The task manifest's schema. 2: ``metrics`` is a ``BatchMetrics`` (items, handler calls, latency percentiles, time
#: blocked on rate limits, CPU, peak RSS, host, Slurm job, times) beside the batch's counters. A version-1 manifest
#: still loads: its ``metrics`` holds the counters alone and the typed fields read as None.
TASK_SCHEMA_VERSION = 2
#: The job manifest's schema. 2 (slurmctl 0.2): handlers are named by their module in the one ``slurmctl`` package.
#: 3: the budget — status ``paused`` (the job stopped itself at a budget limit), ``counts.api_calls``,
#: ``core_seconds``, ``budget_changes`` and ``budget_projection``; an earlier release cannot read a paused job, so
#: it is refused with the upgrade message rather than misread. ``slurmctl.books.store.load_job`` upgrades versions 1
#: and 2 on read (their new fields start at zero) and refuses a newer one. 4: status ``stopped`` (its coordinator was
#: stopped by a signal: SIGTERM from Slurm or an admin, Ctrl-C; resume continues it); nothing else changed.
JOB_SCHEMA_VERSION = 4

JobStatus = Literal["pending", "running", "completed", "failed", "cancelled", "paused", "stopped"]
Phase = Literal["submitted", "partition", "process", "retry", "aggregate", "done"]
BatchStatus = Literal["succeeded", "throttled", "failed"]
# The statuses of a job whose run has ended (``paused``: it stopped itself at a budget limit; ``stopped``: a signal
# stopped its coordinator; resume continues either).
TERMINAL_STATUSES = ("completed", "failed", "cancelled", "paused", "stopped")
STALE_AFTER_S = 120  # a running job whose heartbeat is older than this is reported as stale


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(s: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


class Keys:
    """Where each manifest and file of one job lives in the store.

    Every part taken from outside (the job id, batch ids, attempts) is checked to be one safe name
    (``slurmctl.safe_keys``): a key built here cannot leave ``jobs/<job_id>/``.
    """

    def __init__(self, job_id: str):
        self.job_id = check_name(job_id, "job id")
        self.root = f"jobs/{job_id}/"

    @property
    def job(self) -> str:
        return self.root + "job.json"

    @property
    def control(self) -> str:
        """Operator intent (paused) — written by the CLI, never by the coordinator, so neither overwrites the other."""
        return self.root + "control.json"

    @property
    def cancel(self) -> str:
        """A request to cancel the job's current run (``slurmctl cancel``): written by the CLI, read by the
        coordinator (``flows/cancel.py``), which ignores one older than its own run."""
        return self.root + "cancel.json"

    @property
    def heartbeat(self) -> str:
        """Written by the coordinator's heartbeat thread only (``slurmctl.books.heartbeat``): one writer per object."""
        return self.root + "heartbeat.json"

    @property
    def plan(self) -> str:
        return self.root + "plan.jsonl"

    @property
    def tasks_prefix(self) -> str:
        return self.root + "tasks/"

    def task(self, batch_id: str) -> str:
        return f"{self.root}tasks/{_batch(batch_id)}.json"

    def failed_task(self, batch_id: str) -> str:
        return f"{self.root}tasks/{_batch(batch_id)}.failed.json"

    def shard_run(self, task_run_id: str) -> str:
        """Noted when a shard's task run starts executing (``books.checkpoints.ran_before``)."""
        return f"{self.root}runs/{task_run_id}.json"

    @staticmethod
    def committed_batch(key: str) -> str | None:
        """The batch id a key under tasks/ commits, or None for failure records."""
        name = key.rsplit("/", 1)[-1]
        return None if name.endswith(".failed.json") or not name.endswith(".json") else name[: -len(".json")]

    @property
    def commit_logs_prefix(self) -> str:
        return self.root + "commits/"

    def commit_log(self, first_batch_id: str, attempt: str) -> str:
        """Copies of the task manifests one shard committed, written once at its end (``books.failures``)."""
        return f"{self.root}commits/{_batch(first_batch_id)}.{_attempt(attempt)}.json"

    def batch_output(self, batch_id: str, attempt: str, suffix: str = "parquet") -> str:
        return f"{self.root}outputs/{_batch(batch_id)}.{_attempt(attempt)}.{suffix}"

    def batch_rejects(self, batch_id: str, attempt: str) -> str:
        return f"{self.root}rejects/{_batch(batch_id)}.{_attempt(attempt)}.jsonl"

    def batch_retry(self, batch_id: str, attempt: str) -> str:
        return f"{self.root}retry/{_batch(batch_id)}.{_attempt(attempt)}.json"

    @property
    def output_schema(self) -> str:
        """The output's types as the first batch with rows recorded them (``slurmctl.output_schema``)."""
        return f"{self.root}output_schema.json"

    @property
    def input_files(self) -> str:
        """An input of many files: the listing partition used (``books.input_files``)."""
        return f"{self.root}input/files.jsonl"

    def input_chunk(self, n: int) -> str:
        """A compressed input's records, re-cut at partition into zstd chunks (``books.input_chunks``)."""
        return f"{self.root}input/chunk-{n:06d}.zst"

    @property
    def checkpoints_prefix(self) -> str:
        """What batches stopped by SIGTERM had done (``books.checkpoints``): ``checkpoints/<batch>/NNNN.json`` and
        their rows ``checkpoints/<batch>/<attempt>.parquet``."""
        return self.root + "checkpoints/"

    def checkpoint(self, batch_id: str, n: int) -> str:
        return f"{self.root}checkpoints/{_batch(batch_id)}/{n:04d}.json"

    def checkpoint_rows(self, batch_id: str, attempt: str) -> str:
        return f"{self.root}checkpoints/{_batch(batch_id)}/{_attempt(attempt)}.parquet"

    def retry_plan(self, round_no: int) -> str:
        return f"{self.root}retry/round-{round_no:02d}.plan.jsonl"

    def retry_batches(self, round_no: int) -> str:
        """The batch specs of retry round ``round_no`` (slices of its plan), written once with the plan."""
        return f"{self.root}retry/round-{round_no:02d}.batches.jsonl"

    @property
    def cache_prefix(self) -> str:
        """Prefect result records of shard tasks (the task cache), ``cache/<first batch_id>-<hash>``."""
        return self.root + "cache/"

    @property
    def aggregate_prefix(self) -> str:
        """Merge plans' intermediate files, manifests and ``.done`` markers (``books.aggregation``)."""
        return self.root + "aggregate/"

    @property
    def output_prefix(self) -> str:
        return self.root + "output/"

    @property
    def output(self) -> str:
        return self.root + "output/data.parquet"

    @property
    def rejects(self) -> str:
        return self.root + "rejects.jsonl"

    @property
    def failures(self) -> str:
        return self.root + "failures.jsonl"

    @property
    def result(self) -> str:
        return self.root + "result.json"

    @property
    def gc(self) -> str:
        return self.root + "gc.json"


def _batch(batch_id: str) -> str:
    return check_name(batch_id, "batch id")


def _attempt(attempt: str) -> str:
    return check_name(attempt, "attempt id")


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION


class Counts(BaseModel):
    """Item and batch counters; the job manifest carries the coordinator's running totals."""

    batches_total: int = 0
    batches_done: int = 0
    batches_failed: int = 0
    items_total: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    items_deferred: int = 0
    items_rejected: int = 0
    rows_written: int = 0
    duplicates: int = 0  # output rows dropped by the aggregation's deduplication (set when it completes)
    # item occurrences (counted in items_succeeded) whose rows were replaced by a later occurrence of the same id
    # in the input: the output holds one item per id (set when the aggregation completes)
    duplicate_items: int = 0
    api_calls: int = 0  # handler calls of the committed batches, retries included (their metrics.api_calls)
    # the most items in flight at once in one worker process, over the committed batches (their metrics'
    # in_flight_max; 0 before concurrency was measured, 1 for a sync handler run one item at a time)
    in_flight_max: int = 0
    # rate-limit slots the committed batches' calls took or let pass late (all declared limits), and the late ones:
    # passed unused because their caller came later than the allowance, a worker too busy (``slurmctl.pace_advice``)
    limit_slots: int = 0
    limit_slots_late: int = 0
    # the most calls in flight a declared limit needed in one worker process while max_concurrency, or a fixed
    # concurrency (items run one at a time, or concurrency: N), held it lower (their metrics' concurrency_needed;
    # 0: never)
    concurrency_needed: int = 0
    # seconds an async handler held its worker's event loop (it calls something blocking), over the committed
    # batches (their metrics' loop_held_s; ``slurmctl.loop_watch``)
    loop_held_s: float = 0.0

    def plus(self, delta: "Counts") -> "Counts":
        """These counts with ``delta``'s progress added (totals stay these)."""
        return Counts(batches_total=self.batches_total, items_total=self.items_total, **{
            k: getattr(self, k) + getattr(delta, k) for k in (
                "batches_done", "batches_failed", "items_succeeded", "items_failed", "items_deferred",
                "items_rejected", "rows_written", "api_calls", "limit_slots", "limit_slots_late")},
            **{k: max(getattr(self, k), getattr(delta, k)) for k in ("in_flight_max", "concurrency_needed")},
            loop_held_s=round(self.loop_held_s + delta.loop_held_s, 3))

    def add(self, summary: dict[str, Any]) -> None:
        """Fold one committed batch's summary in. A retry batch takes items out of failed/deferred."""
        self.batches_done += 1
        self.items_succeeded += summary.get("items_succeeded") or 0
        self.items_failed += (summary.get("items_failed") or 0) - (summary.get("retried_failed") or 0)
        self.items_deferred += (summary.get("items_deferred") or 0) - (summary.get("retried_deferred") or 0)
        self.items_rejected += summary.get("items_rejected") or 0
        self.rows_written += summary.get("rows_written") or 0
        self.api_calls += api_calls_of(summary)
        self.in_flight_max = max(self.in_flight_max, in_flight_of(summary))
        slots, late = limit_slots_of(summary)
        self.limit_slots += slots
        self.limit_slots_late += late
        self.concurrency_needed = max(self.concurrency_needed, concurrency_needed_of(summary))
        self.loop_held_s = round(self.loop_held_s + loop_held_of(summary), 3)


class JobManifest(_Manifest):
    schema_version: int = JOB_SCHEMA_VERSION
    kind: Literal["job"] = "job"
    job_id: str
    handler: str
    input: dict[str, Any]
    batch_size: int
    cluster: dict[str, Any]
    storage: str
    config: dict[str, Any] = Field(description="The validated config, so resume needs nothing else.")
    config_file: str | None = None
    status: JobStatus = "pending"
    phase: Phase = "submitted"
    counts: Counts = Field(default_factory=Counts)
    submitted_at: str = Field(default_factory=now)
    started_at: str | None = None
    updated_at: str = Field(default_factory=now)
    finished_at: str | None = None
    error: str | None = None
    retry_rounds: list[dict[str, Any]] = Field(default_factory=list)
    worker_loss_requeues: int = 0  # batches queued again because their worker died (all phases and coordinators)
    worker_retirements: int = 0  # shards handed back by workers retiring before their walltime (planned, not lost)
    worker_preemptions: int = 0  # shards handed back by workers that got SIGTERM (scancel, preemption): not lost
    coordinator_restarts: int = 0  # continuations by a new coordinator Slurm job (cluster.coordinator.on: slurm)
    coordinator_slurm_job: str | None = None  # the Slurm job the coordinator runs (or waits to run) in, if any
    handler_version: str | None = None
    coordinator_host: str = Field(default_factory=socket.gethostname)
    coordinator_pid: int | None = None
    flow_run_id: str | None = None
    output: str | None = None
    # When each phase this run entered started and ended, and how many items were done as it started (the base of
    # its items/s): ``{"process": {"started_at", "finished_at", "items_at_start"}}`` (``books.store.update_job``).
    phase_times: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Core-seconds the job's Dask workers held while batches ran (their cores x the time they were up, all runs):
    # the budget's core-hours (``slurmctl.books.budget``). Measured by the coordinator, saved with the counters.
    core_seconds: float = 0.0
    # Each ``slurmctl resume --raise-budget``: ``{"at", "by", "changes": {key: {"from", "to"}}}``; the budget in
    # force is ``config["budget"]``.
    budget_changes: list[dict[str, Any]] = Field(default_factory=list)
    # What admission projected the job to spend (``slurmctl.books.budget.Projection.as_dict``), None without one.
    budget_projection: dict[str, Any] | None = None


class Latency(BaseModel):
    """Percentiles of one batch's handler calls, in milliseconds (nearest rank over every call)."""

    p50: float | None = None
    p95: float | None = None
    max: float | None = None


class BatchMetrics(BaseModel):
    """What one batch cost, measured by the worker that ran it (``slurmctl.batch_metrics.BatchMeter``).

    Beside these typed fields it keeps the batch's free counters: the handler's ``ctx.count`` ones and the rate
    limiter's ``ratelimit_<name>_*`` (``extra="allow"``); a counter named like a typed field is overwritten by it.
    Every field is optional: manifests written before these fields existed load with None.
    """

    model_config = ConfigDict(extra="allow")
    items: int | None = None  # the batch's records (its rejects and items deferred by the breaker included)
    api_calls: int | None = None  # handler calls, retries included
    latency_ms: Latency | None = None  # of those calls, without the time they were blocked on a rate limit
    # time blocked acquiring rate-limit tokens (sleeps, pauses, lock, backend): with items in flight together, the
    # time during which at least one of them was (so at most the batch's duration)
    tokens_waited_s: float | None = None
    cpu_s: float | None = None  # CPU time of the thread that ran the batch (batches of a process run in threads)
    peak_rss_mb: float | None = None  # the worker *process's* peak resident memory so far (ru_maxrss), not the batch's
    host: str | None = None
    slurm_job_id: str | None = None  # SLURM_JOB_ID of the worker, None outside Slurm
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None


class TaskManifest(_Manifest):
    schema_version: int = TASK_SCHEMA_VERSION
    kind: Literal["task"] = "task"
    job_id: str
    batch_id: str
    task_id: str
    phase: str = "process"
    group: str = "initial_batch"
    status: BatchStatus
    input_digest: str | None = None
    started_at: str
    finished_at: str
    items: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    items_deferred: int = 0
    items_rejected: int = 0
    rows_written: int = 0
    retried_failed: int = 0  # retry batches: how many of its items were failed / deferred before
    retried_deferred: int = 0
    retried_ids: list[Any] = Field(default_factory=list)
    retried_lines: list[int] = Field(default_factory=list)  # input lines of those items (ids may repeat in an input)
    error_classes: dict[str, int] = Field(default_factory=dict)
    tripped_by: str | None = None
    output: str | None = None
    output_sha256: str | None = None
    rejects: str | None = None
    rejects_sha256: str | None = None
    retry: str | None = None
    # A batch run again after a SIGTERM stopped it mid-way: the checkpoint it took its first items' outcomes from,
    # and how many (their rows are in ``output``, their calls in ``metrics.api_calls``).
    checkpoint: str | None = None
    items_resumed: int = 0
    metrics: BatchMetrics | None = None
    error: str | None = None
    attempt: str | None = None
    host: str = Field(default_factory=socket.gethostname)
    slurm_job_id: str | None = None
    flow_run_id: str | None = None
    task_run_id: str | None = None


class OutputFile(BaseModel):
    uri: str
    rows: int
    bytes: int
    sha256: str


class OutputPart(OutputFile):
    """One file of the job's dataset, and its lineage: which batches' rows it holds (ranges in commit order)."""

    partition: str | None = None  # "column=value" of a partitioned layout
    batches: list[list[str]] = Field(default_factory=list)  # [[first batch id, last batch id], ...]


class ResultManifest(_Manifest):
    """The completion manifest. 2: ``output``, ``duplicates``, ``rows_written``, lineage per file, the layout."""

    schema_version: int = 2
    kind: Literal["result"] = "result"
    job_id: str
    output: str | None = None  # the dataset: the one file, or the output/ prefix of a multi-file layout
    outputs: list[OutputPart]
    rejects: OutputFile | None = None
    failures: OutputFile | None = None
    rows: int
    rows_written: int | None = None  # by the committed batches; rows = rows_written - duplicates
    duplicates: int = 0
    duplicate_items: int = 0  # item occurrences superseded by a later occurrence of their id (Counts')
    plan_id: str | None = None
    layout: dict[str, Any] = Field(default_factory=dict)
    items_total: int | None = None  # None in result manifests written before the books were checked
    items_succeeded: int
    items_failed: int
    items_rejected: int
    batches: int
    created_at: str = Field(default_factory=now)


def _summary_or_metric(summary: dict[str, Any], key: str) -> Any:
    """A committed batch's ``key``: from its summary (what a shard returns), or from a task manifest's ``metrics``;
    None when neither has it (a manifest written before it was measured)."""
    value = summary.get(key)
    return (summary.get("metrics") or {}).get(key) if value is None else value


def in_flight_of(summary: dict[str, Any]) -> int:
    """The most items a committed batch's worker process had in flight while it ran (``in_flight_max``; 1: one at
    a time, or not measured)."""
    return int(_summary_or_metric(summary, "in_flight_max") or 1)


def limit_slots_of(summary: dict[str, Any]) -> tuple[int, int]:
    """A committed batch's rate-limit slots (taken, or passed late) and the late ones: its summary's
    ``limit_slots`` and ``limit_slots_late``, or a task manifest's ``ratelimit_<name>_tokens`` and
    ``ratelimit_<name>_late`` metrics summed over its limits."""
    if "limit_slots" in summary:
        return int(summary["limit_slots"] or 0), int(summary.get("limit_slots_late") or 0)
    metrics = summary.get("metrics") or {}
    counted = [(k, v) for k, v in metrics.items() if k.startswith("ratelimit_") and isinstance(v, (int, float))]
    tokens = sum(v for k, v in counted if k.endswith("_tokens"))
    late = sum(v for k, v in counted if k.endswith("_late"))
    return int(tokens + late), int(late)


def concurrency_needed_of(summary: dict[str, Any]) -> int:
    """The calls in flight a declared limit needed in the batch's worker process while ``max_concurrency``, or a
    fixed concurrency (one at a time, ``concurrency: N``), held it lower (``concurrency_needed``; 0: not held)."""
    return int(_summary_or_metric(summary, "concurrency_needed") or 0)


def loop_held_of(summary: dict[str, Any]) -> float:
    """The seconds a committed batch's async handler held its worker's event loop (``loop_held_s``; 0: never)."""
    return float(_summary_or_metric(summary, "loop_held_s") or 0)


def api_calls_of(summary: dict[str, Any]) -> int:
    """A committed batch's handler calls (``api_calls``; 0 for a manifest written before metrics were recorded)."""
    return int(_summary_or_metric(summary, "api_calls") or 0)


METRIC_COUNTS = ("api_calls", "in_flight_max", "limit_slots", "limit_slots_late", "concurrency_needed", "loop_held_s")


def metric_counts(tasks: list[dict[str, Any]]) -> dict[str, float]:
    """The counts the committed batches' metrics make (``METRIC_COUNTS``), folded as the coordinator folds them
    (``Counts.add``). The aggregation sets them from the task manifests it read, beside the books' item counts."""
    folded = Counts()
    for t in tasks:
        folded.add(t)
    return {k: getattr(folded, k) for k in METRIC_COUNTS}


def counts_from_tasks(tasks: list[dict[str, Any]], batches_total: int, items_total: int) -> Counts:
    """Recount from task manifests alone (``slurmctl status --scan``, and resume)."""
    c = Counts(batches_total=batches_total, items_total=items_total)
    for t in tasks:
        if t["status"] in ("succeeded", "throttled"):
            c.add(t)
        else:
            c.batches_failed += 1
    return c
