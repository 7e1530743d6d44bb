"""Rate limits in real jobs: a strict API whose bucket is exactly the declared limit, across workers, threads and
request latencies, on the embedded default (SQLite limiter) or DynamoDB + S3 on a moto server.

    .venv/bin/python benchmarks/rate_limited_job.py --backend local --json
    .venv/bin/python benchmarks/rate_limited_job.py --backend dynamodb --workers 2 16 --latency-ms 1 300 --json

For each cell (worker processes x threads per worker x request latency) one job is submitted with ``slurmctl submit
--wait`` (a local cluster of that shape; one Prefect server shared by every job of the run), against a ChaosApi whose
own token bucket is ``--rate``/s with capacity ``--burst`` (429 above it), the limit declared with the same numbers.
Each request takes ``latency`` at the API. A cell's job has about ``--seconds`` of work at the rate it can reach,
``min(rate, concurrency / latency)``, in whole rounds of batches (every thread busy to the end).

Per cell it prints the expected rate, the achieved rate in steady state (1 s buckets counted at the API, the first and
last 2 s left out), ``utilisation`` (achieved / expected), the 429 count and share, backend calls per token (DynamoDB
calls on that backend; every lease, refused attempt, release and throttle report counted by the workers), and the
worst hand-out lateness the limiter reported. With ``--prefect`` the 16-worker cells run again with each request
gated by Prefect's own ``rate_limit()`` (a global concurrency limit with ``slot_decay_per_second`` = rate) instead.
With ``--unlimited`` the cells below the rate (where concurrency, not the limit, sets the pace) run again without any
limiter: the job's own ceiling on this machine (per-batch task overhead, CPU), to read the limiter's share of a miss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from support.chaos_api import ChaosApi  # noqa: E402
from support.jobs import write_config  # noqa: E402
from support.rates import steady_buckets  # noqa: E402
from support.servers import BIN, benchmark_env, free_port, moto_command, start_prefect_server, stop, wait_http  # noqa: E402


def run_cell(args: argparse.Namespace, env: dict, tmp: Path, workers: int, threads: int, latency_ms: float,
             backend: dict, prefect_limit: str | None = None, unlimited: bool = False) -> dict:
    concurrency = workers * threads
    expected = min(args.rate, concurrency / (latency_ms / 1000))
    # Whole rounds of batches (three when they fit): every thread finishes at about the same time (a last round
    # with a single batch would measure the job's tail, not the limiter). 8 to 25 items a batch, as a user might set.
    items = int(min(args.max_items, max(8 * concurrency, round(args.seconds * expected))))
    batch = max(8, min(25, items // (concurrency * 3)))
    items = batch * concurrency * max(1, items // (batch * concurrency))
    job_id = f"b{workers}x{threads}-{int(latency_ms)}ms-{os.urandom(2).hex()}" + ("-prefect" if prefect_limit else "") \
        + ("-unlimited" if unlimited else "")
    folder = tmp / job_id
    folder.mkdir()
    (folder / "in.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(items)))
    with ChaosApi(max_per_second=args.rate, burst=args.burst, latency_s=latency_ms / 1000) as api:
        params = {"base_url": api.url}
        if prefect_limit:
            handler, params["prefect_limit"] = "prefect_limited:handle", prefect_limit
        elif unlimited:
            handler = "slurmctl.handlers.http_json:handle"
        else:
            handler, params["limit"] = "slurmctl.handlers.http_json:handle", "api"
        cfg = write_config(folder / "job.yaml", job_id=job_id, handler=handler, input={"uri": "in.jsonl"},
                           batch_size=batch, params=params,
                           cluster={"kind": "local", "n_workers": workers, "threads_per_worker": threads},
                           rate_limits={"api": {"per_second": args.rate, "burst": args.burst}},
                           errors={"max_attempts": 10}, **(backend or {"storage": {"uri": "state"}}))
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "slurmctl.cli", "submit", str(cfg), "--wait"], cwd=folder,
                              env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
        stats, arrivals = api.stats(), api.arrivals()
    steady = steady_buckets(arrivals)
    achieved = sum(steady) / len(steady) if steady else 0.0
    out = {"workers": workers, "threads": threads, "latency_ms": latency_ms, "items": items, "batch_size": batch,
           "limiter": "prefect rate_limit()" if prefect_limit else "none" if unlimited else "slurmctl",
           "job_exit": done.returncode,
           "job_seconds": round(wall, 1), "expected_per_s": round(expected, 2), "achieved_per_s": round(achieved, 2),
           "utilisation": round(achieved / expected, 3), "steady_seconds": len(steady),
           "requests": stats["requests"], "responses_429": stats["over_limit"],
           "share_429": round(stats["over_limit"] / max(1, stats["requests"]), 5)}
    if done.returncode != 0:
        out["stderr"] = done.stderr[-1500:]
    metrics = job_metrics(folder, backend, job_id)
    if metrics and not prefect_limit and not unlimited:
        tokens = metrics.get("ratelimit_api_tokens", 0)
        out["backend_calls_per_token"] = round(metrics.get("ratelimit_api_backend_calls", 0) / max(1, tokens), 4)
        out["late_ms_max"] = metrics.get("ratelimit_api_late_ms_max", 0)
        out["expired_slots"] = metrics.get("ratelimit_api_expired", 0)
    return out


def job_metrics(folder: Path, backend: dict, job_id: str) -> dict:
    """The batches' metrics summed (``*_max`` as the max), read through the job's own store."""
    from slurmctl.blocks.manifest_store import store_from_uri

    storage = backend.get("storage") or {"uri": str(folder / "state")}
    store = store_from_uri(storage["uri"], endpoint_url=storage.get("endpoint_url"), region=storage.get("region"))
    total: dict = {}
    for key in store.list_keys(f"jobs/{job_id}/tasks/"):
        body = store.get_json(key) or {}
        for name, value in (body.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                total[name] = max(total.get(name, 0), value) if name.endswith("_max") else total.get(name, 0) + value
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["local", "dynamodb"], default="local")
    p.add_argument("--rate", type=float, default=40)
    p.add_argument("--burst", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 16])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    p.add_argument("--latency-ms", type=float, nargs="+", default=[1, 300])
    p.add_argument("--seconds", type=float, default=15, help="work per cell at its expected rate")
    p.add_argument("--max-items", type=int, default=800)
    p.add_argument("--prefect", action="store_true", help="also run the 16-worker cells with Prefect's rate_limit()")
    p.add_argument("--unlimited", action="store_true", help="run the cells below the rate again without the "
                   "limiter: the job's own ceiling (batch overheads, the machine), to compare utilisation with")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-limited-job-"))
    env = benchmark_env(tmp, ROOT)
    procs = []
    try:
        procs.append(start_prefect_server(env, tmp / "prefect-home"))
        backend: dict = {}
        if args.backend == "dynamodb":
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
            moto_port = free_port()
            procs.append(subprocess.Popen(moto_command(moto_port),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoint = f"http://127.0.0.1:{moto_port}"
            wait_http(endpoint + "/moto-api/", 60)
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            backend = {"storage": {"uri": "s3://bench/runs", "endpoint_url": endpoint, "region": "us-east-1"},
                       "rate_limiter": {"kind": "dynamodb", "table": "bench-limits", "endpoint_url": endpoint,
                                        "region": "us-east-1"}}
            env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        cells = []
        for workers in args.workers:
            for threads in args.threads:
                for latency in args.latency_ms:
                    cell = run_cell(args, env, tmp, workers, threads, latency, backend)
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr, flush=True)
                    if args.unlimited and cell["expected_per_s"] < args.rate:
                        cell = run_cell(args, env, tmp, workers, threads, latency, backend, unlimited=True)
                        cells.append(cell)
                        print(json.dumps(cell), file=sys.stderr, flush=True)
                    if args.prefect and workers == 16:
                        limit = f"bench-{threads}-{int(latency)}"
                        subprocess.run([str(BIN / "prefect"), "gcl", "create", limit, "--limit", str(int(args.rate)),
                                        "--slot-decay-per-second", str(args.rate)], env=env, check=True,
                                       capture_output=True)
                        cell = run_cell(args, env, tmp, workers, threads, latency, backend, prefect_limit=limit)
                        cells.append(cell)
                        print(json.dumps(cell), file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            stop(proc)
    out = {"backend": args.backend, "rate": args.rate, "burst": args.burst, "api_bucket": [args.rate, args.burst],
           "cells": cells}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
