"""The hierarchical aggregation subflow against a one-pass ``pyarrow.dataset.write_dataset`` over the same files.

    .venv/bin/python benchmarks/aggregate.py --parts 10000 --rows-per-part 100 --json

Set-up (not timed): a job in a local store (temporary directory, ``file://``) whose batches are all committed, as
the process phase leaves them: the input (JSONL, one item a line) and its ``plan.jsonl`` (``records.partition``,
``--rows-per-part`` items a batch), and for every batch a Parquet output of rows ``{"id", "name", "score"}`` with
the bookkeeping columns ``_slurmctl_line`` / ``_slurmctl_row``, its committed task manifest and, per shard, a commit
log (shards cut as the process phase cuts them). The parts are written by a pool of processes.

Then, in this order:

* the product, timed from the flow call to its return: the ``aggregate`` flow (``flows/aggregate.py``) on the
  task runner ``flows/job.py`` gives it (``aggregate_runner``: on the embedded default, ``--workers`` threads of the
  coordinator; with ``--cluster``, a LocalCluster of ``--workers`` processes through ``DaskTaskRunner``, as on a
  Slurm cluster, its start-up included), reporting to the local persistent Prefect server
  (``prefect_api_for_workers``: started if needed, left running). Its ``result.json`` and output file
  are checked: every row, each id once. On the embedded default this process is set up first as a coordinator of
  the job has itself by its aggregation (not timed): the imports it does before its job (``import_for_jobs``) and
  its workers' template started and ready, so the merges run in ``--workers`` processes forked from it
  (``slurmctl.procpool``; their start is timed). ``--no-fork-workers``: the flow alone, merges in the threads.
* the baseline, after the product, in a fresh process of its own (so neither's memory is charged to the other):
  ``pyarrow.dataset.write_dataset(pyarrow.dataset.dataset(<the part files>), out_dir)``, one pass, timed.

Peak RSS: a thread samples VmRSS of this process (the coordinator) and VmRSS/VmHWM of every descendant (the Dask
worker processes) every 0.2 s during the product run only; ``peak_rss_mb`` is the largest of any one process.

Prints one JSON object: parts, rows, seconds, baseline_seconds, ratio_vs_baseline (baseline_seconds / seconds),
peak_rss_mb, plus levels, hash_partitions, merges_per_level, task_runs, per-process peaks, the CPU seconds of the
coordinator, the workers and the Prefect server during the run (``cpu_s``) and a time breakdown of the flow run
taken from its task runs in Prefect and the cluster's start and shutdown (``phases_s``). Targets:
ratio_vs_baseline >= 0.8, peak_rss_mb <= 512. ``--max-task-runs N`` sets the job's ``max_task_runs`` (the
aggregation's task runs per level follow from it).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

TARGET_RATIO = 0.8
TARGET_RSS_MB = 512
SAMPLE_EVERY_S = 0.2


# --- set-up ---------------------------------------------------------------------------------------------------------
def write_shard(root: str, job_id: str, specs: list[dict[str, Any]]) -> list[str]:
    """Commit the batches of one shard as ``run_shard`` does: each batch's output part and task manifest, then the
    shard's commit log. Returns the part files' paths. Runs in a pool process."""
    import uuid

    from slurmctl.blocks.manifest_store import LocalManifestStore
    from slurmctl.books.manifests import Keys, TaskManifest, now
    from slurmctl.storage import sha256_bytes
    from slurmctl.tasks.process_batch import rows_to_parquet

    store, keys = LocalManifestStore(root=root), Keys(job_id)
    committed, paths = [], []
    for spec in specs:
        first_id = spec["first_line"] - 1  # make_input: line n holds id n - 1
        ids = range(first_id, first_id + spec["records"])
        rows = [{"id": i, "name": f"user-{i}", "score": i % 97} for i in ids]
        data = rows_to_parquet(rows, [i + 1 for i in ids], [0] * len(rows))
        attempt = uuid.uuid4().hex[:12]
        at = now()
        manifest = TaskManifest(job_id=job_id, batch_id=spec["batch_id"],
                                task_id=spec["batch_id"].replace("batch", "task", 1), group=spec["group"],
                                status="succeeded", input_digest=spec["digest"], started_at=at, finished_at=at,
                                items=spec["records"], items_succeeded=spec["records"], rows_written=len(rows),
                                output=keys.batch_output(spec["batch_id"], attempt),
                                output_sha256=sha256_bytes(data), attempt=attempt).model_dump(mode="json")
        store.put_bytes(manifest["output"], data)
        assert store.put_json(keys.task(spec["batch_id"]), manifest, if_absent=True)
        committed.append(manifest)
        paths.append(store.local_path(manifest["output"]))
    store.put_json(keys.commit_log(specs[0]["batch_id"], uuid.uuid4().hex[:12]),
                   {"schema_version": 1, "kind": "commit_log", "job_id": job_id, "tasks": committed})
    return paths


def make_job(work: Path, parts: int, rows_per_part: int, workers: int,
             max_task_runs: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """A job whose every batch is committed; returns its config and its part files (in batch order)."""
    from benchmarks.overhead import make_input
    from slurmctl.books.admission import create_job
    from slurmctl.books.manifests import Keys
    from slurmctl.books.shards import Budget, shard_count, worker_slots
    from slurmctl.books.store import store_for, update_job
    from slurmctl.config import parse_config
    from slurmctl.records import partition

    job_id = f"aggregate-bench-{parts}x{rows_per_part}"
    make_input(work / "input.jsonl", parts * rows_per_part)
    cfg = parse_config({"job_id": job_id, "handler": "slurmctl.handlers.echo:handle",
                        "input": {"uri": str(work / "input.jsonl"), "format": "jsonl"}, "batch_size": rows_per_part,
                        "cluster": {"kind": "local", "n_workers": workers},
                        "storage": {"uri": f"file://{work / 'state'}"},
                        **({"max_task_runs": max_task_runs} if max_task_runs else {})})
    store, keys = store_for(cfg.storage), Keys(job_id)
    job = create_job(cfg, None)
    with open(cfg.input.uri, "rb") as f:
        plan = partition(f, "jsonl", cfg.batch_size)
    assert len(plan.batches) == parts and plan.records == parts * rows_per_part, (len(plan.batches), plan.records)
    store.put_bytes(keys.plan, b"".join(json.dumps(b.to_dict()).encode() + b"\n" for b in plan.batches))
    counts = job.counts.model_copy(update={"batches_total": parts, "items_total": plan.records})
    update_job(store, job_id, counts=counts, status="running", phase="aggregate")

    shards = shard_count(parts, worker_slots(cfg), Budget.of(cfg).process)
    size = math.ceil(parts / shards)
    specs = [b.to_dict() for b in plan.batches]
    chunks = [specs[i:i + size] for i in range(0, parts, size)]
    root = str(work / "state")
    with multiprocessing.get_context("spawn").Pool(max(1, os.cpu_count() or 1)) as pool:
        paths = [p for shard in pool.starmap(write_shard, [(root, job_id, c) for c in chunks]) for p in shard]
    return cfg.model_dump(mode="json"), paths


# --- peak RSS -------------------------------------------------------------------------------------------------------
def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in fields:
                    out[name] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


class RssSampler(threading.Thread):
    """VmRSS of this process, and the peak (VmHWM, VmRSS) of every descendant, every ``SAMPLE_EVERY_S``; and the
    CPU seconds this process, its descendants and the local Prefect server spend meanwhile (2 cores are shared)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.me = psutil.Process()
        self.stop_event = threading.Event()
        self.coordinator_kb = 0
        self.children_kb: dict[int, int] = defaultdict(int)
        self.children_cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.server = [p for p in psutil.process_iter(["cmdline"])
                       if "prefect server start" in " ".join(p.info["cmdline"] or [])]
        self.cpu0 = self._cpu(self.me), sum(self._cpu(p, tree=True) for p in self.server)
        # descendants already running (the workers' template): only what they spend from now on is counted
        self.children_cpu0 = {p.pid: self._cpu(p) for p in self.me.children(recursive=True)}
        self.cpu: dict[str, float] = {}

    @staticmethod
    def _cpu(p: Any, tree: bool = False) -> float:
        try:
            procs = [p, *p.children(recursive=True)] if tree else [p]
            return sum(t.user + t.system for t in (q.cpu_times() for q in procs))
        except psutil.Error:
            return 0.0

    def sample(self) -> None:
        self.coordinator_kb = max(self.coordinator_kb, _status_kb(self.me.pid, ("VmRSS",)).get("VmRSS", 0))
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            if p.pid not in self.names:
                try:
                    self.names[p.pid] = " ".join(p.cmdline())[:160]
                except psutil.Error:
                    self.names[p.pid] = "?"
            if "prefect server" in self.names[p.pid]:
                continue  # the persistent server is not part of the aggregation (it is started detached anyway)
            kb = _status_kb(p.pid, ("VmRSS", "VmHWM"))
            self.children_kb[p.pid] = max(self.children_kb[p.pid], *kb.values(), 0)
            self.children_cpu[p.pid] = max(self.children_cpu.get(p.pid, 0.0), self._cpu(p))

    def run(self) -> None:
        while not self.stop_event.wait(SAMPLE_EVERY_S):
            self.sample()

    def finish(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()
        self.cpu = {"coordinator": self._cpu(self.me) - self.cpu0[0],
                    "workers": sum(v - self.children_cpu0.get(pid, 0.0) for pid, v in self.children_cpu.items()),
                    "prefect_server": sum(self._cpu(p, tree=True) for p in self.server) - self.cpu0[1]}

    def workers_mb(self) -> list[float]:
        return sorted((round(kb / 1024, 1) for pid, kb in self.children_kb.items()
                       if "resource_tracker" not in self.names.get(pid, "") and kb), reverse=True)


# --- the product ----------------------------------------------------------------------------------------------------
MARKS: dict[str, float] = {}  # wall-clock times of the task runner's cluster start-up and shutdown


def timed_runner(runner: Any) -> Any:
    """``runner`` (``flows.runners.task_runner_for``'s DaskTaskRunner), unchanged but for noting when its cluster
    starts (prefect-dask starts it at the first submit) and when it is shut down (``MARKS``)."""
    base = type(runner)

    class Timed(base):  # type: ignore[misc, valid-type]
        @property
        def client(self) -> Any:
            MARKS.setdefault("cluster_start", time.time())
            client = base.client.fget(self)
            MARKS.setdefault("cluster_ready", time.time())
            return client

        def __exit__(self, *args: object) -> None:
            MARKS["shutdown_start"] = time.time()
            try:
                super().__exit__(*args)
            finally:
                MARKS["shutdown_end"] = time.time()

    runner.__class__ = Timed  # duplicate() keeps type(self)
    return runner


def template_ready() -> None:
    """Start this process's workers' template as a coordinator does (``flows/local_workers.py``) and wait until its
    imports are done: one process forked from it."""
    import multiprocessing

    from slurmctl.flows import local_workers

    local_workers.allow()
    local_workers.prestart()
    local_workers.warm()
    child = multiprocessing.get_context("forkserver").Process(target=os.getpid)
    child.start()
    child.join()


def run_product(config: dict[str, Any], cluster: bool = False, fork_workers: bool = True) -> dict[str, Any]:
    import dask
    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    from slurmctl.cli.coordinator import import_for_jobs, prefect_api_for_workers
    from slurmctl.config import parse_config
    from slurmctl.flows.aggregate import aggregate_phase, aggregate_runner
    from slurmctl.flows.job import dask_settings
    from slurmctl.flows.runners import task_runner_for

    cfg = parse_config(config)
    out: dict[str, Any] = {}
    import_for_jobs()  # as the coordinator does before its job comes (pandas: pyarrow imports it in the first merge)
    with prefect_api_for_workers():
        if fork_workers and not cluster:
            template_ready()
        api = PREFECT_API_URL.value()
        # as flows/job.py chooses it (the embedded default: the coordinator's threads), or the cluster (--cluster)
        runner = (task_runner_for(cfg.cluster, job_id=cfg.job_id) if cluster
                  else aggregate_runner(cfg, 2 * cfg.aggregate.fan_in))
        flow = aggregate_phase.with_options(
            task_runner=timed_runner(runner) if isinstance(runner, DaskTaskRunner) else runner)
        sampler = RssSampler()  # after the server is up: its CPU is counted too
        sampler.sample()
        sampler.start()
        MARKS.clear()
        called = time.time()
        t0 = time.perf_counter()
        try:
            with dask.config.set(dask_settings(cfg)):
                state = flow(cfg.job_id, config, return_state=True)
            result = state.result()
        finally:
            seconds = time.perf_counter() - t0
            returned = time.time()
            sampler.finish()
    out.update(seconds=seconds, result=result, api=api, flow_run_id=str(state.state_details.flow_run_id),
               called=called, returned=returned, marks=dict(MARKS), coordinator_kb=sampler.coordinator_kb,
               workers_mb=sampler.workers_mb(), cpu_s=sampler.cpu)
    return out


def _ts(value: str | None) -> float | None:
    import datetime as dt

    return dt.datetime.fromisoformat(value).timestamp() if value else None


def flow_breakdown(api: str, product: dict[str, Any], workers: int) -> dict[str, Any]:
    """Task runs of the flow run and where its time went, in order: the flow run's start, the books check and the
    plan (flow start to the cluster's start: prefect-dask starts it at the first submit), the cluster's start-up,
    each level's span (first start to last end of its task runs; ``*_task_seconds``: their summed durations;
    ``*_idle_worker_s``: span x workers - task seconds, the workers' time between task runs), the final layout,
    then the rest of the flow (row check, publish, rejects, result.json, cleanup), the cluster's shutdown, and the
    flow's return."""
    import httpx

    flow_run_id, called, returned, marks = (product["flow_run_id"], product["called"], product["returned"],
                                            product["marks"])
    with httpx.Client(base_url=api, timeout=60) as c:
        runs: list[dict[str, Any]] = []
        for _ in range(60):  # task run states arrive as events: wait until all have ended
            runs, offset = [], 0
            while True:
                page = c.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}},
                                                         "limit": 200, "offset": offset}).json()
                runs += page
                if len(page) < 200:
                    break
                offset += 200
            if runs and all(r.get("end_time") for r in runs):
                break
            time.sleep(0.5)
        flow_run = c.get(f"/flow_runs/{flow_run_id}").json()
    spans: dict[str, list[float]] = {}
    busy: dict[str, float] = defaultdict(float)
    states: dict[str, int] = defaultdict(int)
    runs_in: dict[str, int] = defaultdict(int)
    for r in runs:
        name = r["name"]
        group = "final_layout" if name.startswith("write-output") else (
            name.split("merge-", 1)[1].split("-", 1)[0] if name.startswith("merge-") else name)
        start, end = _ts(r.get("start_time")), _ts(r.get("end_time"))
        states[(r.get("state") or {}).get("name", "none")] += 1
        if start is None or end is None:
            continue
        lo, hi = spans.get(group, [start, end])
        spans[group] = [min(lo, start), max(hi, end)]
        busy[group] += end - start
        runs_in[group] += 1
    phases: dict[str, float] = {}
    flow_start = _ts(flow_run.get("start_time")) or called
    phases["call_to_flow_start"] = flow_start - called
    if "cluster_start" in marks:
        phases["books_and_plan"] = marks["cluster_start"] - flow_start
        phases["cluster_start"] = marks["cluster_ready"] - marks["cluster_start"]
    previous = marks.get("cluster_ready", flow_start)
    for group in sorted(spans, key=lambda g: spans[g][0]):
        lo, hi = spans[group]
        phases[f"gap_before_{group}"] = lo - previous
        phases[f"{group}_span"] = hi - lo
        phases[f"{group}_task_seconds"] = busy[group]
        if runs_in[group] >= workers:
            phases[f"{group}_idle_worker_s"] = (hi - lo) * workers - busy[group]
        previous = hi
    if "shutdown_start" in marks:
        phases["check_publish_result"] = marks["shutdown_start"] - previous
        phases["cluster_shutdown"] = marks["shutdown_end"] - marks["shutdown_start"]
        previous = marks["shutdown_end"]
    phases["to_return"] = returned - previous
    return {"task_runs": len(runs), "task_run_states": dict(states),
            "phases_s": {k: round(v, 2) for k, v in phases.items()}}


def check_output(store_root: Path, job_id: str, rows: int) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq

    from slurmctl.config import parse_config

    result = json.loads((store_root / "jobs" / job_id / "result.json").read_text())
    assert result["rows"] == rows, f"result.json says {result['rows']} rows, expected {rows}"
    assert result["output"].startswith("file://"), result["output"]
    path = result["output"][len("file://"):]
    table = pq.read_table(path)
    assert table.num_rows == rows, f"{table.num_rows} rows in {path}, expected {rows}"
    ids = np.sort(table.column("id").to_numpy())
    assert np.array_equal(ids, np.arange(rows)), "the output does not hold each id exactly once"
    assert not any(c.startswith("_slurmctl_") for c in table.column_names), table.column_names
    from slurmctl.books.aggregation import plan_aggregation
    from slurmctl.books.failures import committed_tasks
    from slurmctl.books.store import load_job, store_for

    store = store_for({"uri": f"file://{store_root}"})
    cfg = parse_config(load_job(store, job_id).config)
    plan = plan_aggregation(job_id, committed_tasks(store, job_id), cfg.aggregate, cfg.input.id_field)
    assert plan.plan_id == result["plan_id"], (plan.plan_id, result["plan_id"])
    return {**result, "merges_per_level": [len(level) for level in plan.levels]}


# --- the baseline ---------------------------------------------------------------------------------------------------
def run_baseline(paths: list[str], out_dir: str) -> dict[str, Any]:
    """One pass of pyarrow's dataset writer over the part files; runs in a fresh process. Returns its seconds,
    the rows it wrote and the process's peak RSS."""
    import pyarrow.dataset as ds

    t0 = time.perf_counter()
    ds.write_dataset(ds.dataset(paths, format="parquet"), out_dir, format="parquet")
    seconds = time.perf_counter() - t0
    rows = ds.dataset(out_dir, format="parquet").count_rows()
    return {"seconds": seconds, "rows": rows,
            "peak_rss_mb": round(_status_kb(os.getpid(), ("VmHWM",)).get("VmHWM", 0) / 1024, 1),
            "files": len(os.listdir(out_dir))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--rows-per-part", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-task-runs", type=int, default=None,
                        help="the job's max_task_runs (default: the config's); the aggregation gets a twentieth")
    parser.add_argument("--cluster", action="store_true",
                        help="merge on a LocalCluster of --workers processes (as on Slurm) instead of the "
                             "coordinator's threads (what a job on the embedded default does)")
    parser.add_argument("--no-fork-workers", action="store_true",
                        help="run the flow without a workers' template: the merges in the coordinator's threads")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    rows = args.parts * args.rows_per_part

    tmp = Path(tempfile.mkdtemp(prefix="slurmctl-aggbench-"))
    try:
        t0 = time.perf_counter()
        config, paths = make_job(tmp, args.parts, args.rows_per_part, args.workers, args.max_task_runs)
        setup = time.perf_counter() - t0
        product = run_product(config, args.cluster, fork_workers=not args.no_fork_workers)
        result = check_output(tmp / "state", config["job_id"], rows)
        details = flow_breakdown(product["api"], product, args.workers)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            baseline = pool.apply(run_baseline, (paths, str(tmp / "baseline")))
        assert baseline["rows"] == rows, baseline
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    coordinator_mb = round(product["coordinator_kb"] / 1024, 1)
    peak = max([coordinator_mb, *product["workers_mb"]])
    seconds = product["seconds"]
    out = {"parts": args.parts, "rows": rows, "seconds": round(seconds, 2),
           "baseline_seconds": round(baseline["seconds"], 2),
           "ratio_vs_baseline": round(baseline["seconds"] / seconds, 3), "peak_rss_mb": peak,
           "coordinator_peak_rss_mb": coordinator_mb, "worker_peak_rss_mb": product["workers_mb"],
           "baseline_peak_rss_mb": baseline["peak_rss_mb"], "workers": args.workers,
           "fork_workers": not args.no_fork_workers and not args.cluster,
           "runner": "LocalCluster" if args.cluster else "coordinator threads",
           "max_task_runs": config["max_task_runs"],
           "levels": result["layout"].get("levels"), "hash_partitions": result["layout"].get("hash_partitions"),
           "fan_in": result["layout"].get("fan_in"),
           "merges_per_level": result["merges_per_level"], "task_runs": details["task_runs"],
           "task_run_states": details["task_run_states"], "phases_s": details["phases_s"],
           "cpu_s": {k: round(v, 1) for k, v in product["cpu_s"].items()},
           "setup_seconds": round(setup, 1),
           "targets_met": {"throughput": baseline["seconds"] / seconds >= TARGET_RATIO,
                           "peak_rss": peak <= TARGET_RSS_MB}}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":  # required: LocalCluster and the set-up pool spawn processes
    main()
