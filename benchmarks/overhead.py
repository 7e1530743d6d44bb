"""Overhead of slurmctl over raw dask.distributed for a no-op (echo) job on the embedded default.

    .venv/bin/python benchmarks/overhead.py --items 1000000 --batch-size 1000 --json

Runs, in one process and on the same generated JSONL input:

* the product: the ``slurmctl-job`` flow (partition -> process on a 2-worker LocalCluster through
  ``DaskTaskRunner`` -> aggregate), with manifests in a local store and Prefect recording every task run, run as
  ``slurmctl submit``'s coordinator runs it: the workers' template (``flows/local_workers.py``) and the job's cluster
  are started when the timed run starts, beside the flow's start-up (``--no-fork-workers``: the flow alone, its
  process phase starting a cluster of freshly spawned workers, as a notebook calling the flow does);
* the baseline: the same partitioning, the same per-batch slice reads, handler calls and Parquet writes through
  ``client.map`` on an identical LocalCluster, and the same final merge, without Prefect or manifests.

Prints one JSON object: items, seconds, items_per_s, baseline_seconds, ratio (+ a few details).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def make_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for start in range(0, n, 10_000):
            f.write("".join(f'{{"id": {i}, "name": "user-{i}", "score": {i % 97}}}\n'
                            for i in range(start, min(n, start + 10_000))))


def baseline_batch(uri: str, spec: dict, out_dir: str) -> dict:
    """What one batch costs without Prefect or manifests: read the slice, call the handler, write Parquet. Returns
    what the merge needs to verify the part (key, sha256, rows), as a task manifest would."""
    from slurmctl.blocks.manifest_store import LocalManifestStore
    from slurmctl.handlers.echo import handle
    from slurmctl.records import BatchSpec, read_batch
    from slurmctl.storage import sha256_bytes
    from slurmctl.tasks.process_batch import rows_to_parquet

    store = LocalManifestStore(root=out_dir)
    spec_ = BatchSpec.from_dict(spec)
    sliced = read_batch(store.open_uri, store.read_range, uri, "jsonl", spec_, "id")
    rows = [handle(item, None) for _, item in sliced.items]
    data = rows_to_parquet(rows)
    key = f"outputs/{spec_.batch_id}.parquet"
    store.put_bytes(key, data)
    return {"batch_id": spec_.batch_id, "output": key, "output_sha256": sha256_bytes(data), "rows_written": len(rows)}


def run_baseline(uri: str, batch_size: int, work: Path, workers: int) -> float:
    from distributed import Client, LocalCluster

    from slurmctl.blocks.manifest_store import LocalManifestStore
    from slurmctl.config import AggregateConfig
    from slurmctl.records import partition
    from slurmctl.tasks.merge import merge_all

    t0 = time.perf_counter()  # cluster start-up counts on both sides: the product starts its cluster per run
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: sys.path.insert(0, str(ROOT)))
        with open(uri, "rb") as f:
            plan = partition(f, "jsonl", batch_size)
        futures = client.map(baseline_batch, [uri] * len(plan.batches), [b.to_dict() for b in plan.batches],
                             [str(work)] * len(plan.batches), pure=False)
        parts = client.gather(futures)
        rows = sum(p["rows_written"] for p in parts)
        store = LocalManifestStore(root=str(work))
        merge_all(store, "baseline", parts, AggregateConfig())  # the same merge tree, without Prefect
        elapsed = time.perf_counter() - t0
    assert rows == plan.records, (rows, plan.records)
    return elapsed


def run_product(uri: str, batch_size: int, work: Path, workers: int,
                fork_workers: bool = True) -> tuple[float, dict]:
    from slurmctl.books.admission import create_job
    from slurmctl.books.store import store_for
    from slurmctl.cli.coordinator import import_for_jobs, prefect_api_for_workers
    from slurmctl.config import parse_config
    from slurmctl.flows.job import run_job

    cfg = parse_config({"job_id": "overhead-bench", "handler": "slurmctl.handlers.echo:handle",
                        "input": {"uri": uri, "format": "jsonl"}, "batch_size": batch_size,
                        "cluster": {"kind": "local", "n_workers": workers},
                        "storage": {"uri": f"file://{work}"}, "max_in_flight": 4 * workers})
    store = store_for(cfg.storage)
    create_job(cfg, None)
    if fork_workers:
        import_for_jobs()  # as a coordinator does before its job comes (the baseline's imports are not timed either)
    with prefect_api_for_workers():
        t0 = time.perf_counter()
        if fork_workers:  # what `slurmctl submit`'s coordinator does first for a job on a local cluster
            from slurmctl.flows import local_workers
            from slurmctl.flows.job import start_cluster_early

            local_workers.allow()
            local_workers.prestart()
            local_workers.warm()
            start_cluster_early(cfg.job_id, cfg.storage.model_dump())
        run_job(job_id=cfg.job_id, storage=cfg.storage.model_dump())
        elapsed = time.perf_counter() - t0
    return elapsed, store.get_json("jobs/overhead-bench/result.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-fork-workers", action="store_true",
                        help="run the flow without the coordinator's workers' template and early cluster")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="slurmctl-bench-"))
    try:
        uri = str(tmp / "input.jsonl")
        make_input(Path(uri), args.items)
        baseline = run_baseline(uri, args.batch_size, tmp / "baseline", args.workers)
        seconds, result = run_product(uri, args.batch_size, tmp / "product", args.workers,
                                      fork_workers=not args.no_fork_workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert result["rows"] == args.items, result
    out = {"items": args.items, "batch_size": args.batch_size, "batches": result["batches"],
           "workers": args.workers, "seconds": round(seconds, 2), "items_per_s": round(args.items / seconds),
           "baseline_seconds": round(baseline, 2), "baseline_items_per_s": round(args.items / baseline),
           "ratio": round(seconds / baseline, 2), "fork_workers": not args.no_fork_workers}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":  # required: LocalCluster spawns worker processes
    main()
