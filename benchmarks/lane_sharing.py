"""How a rate limit's lanes are shared by processes that do not know how many they are (issue 22).

    .venv/bin/python benchmarks/lane_sharing.py --backend local --procs 1 8 64 --rate 40
    .venv/bin/python benchmarks/lane_sharing.py --backend dynamodb --procs 8 --jobs 2 --rate 40

Each of ``--procs`` processes spends one limit through its own ``Leaser`` with ``--threads`` threads taking tokens as
fast as they are granted (``--slow N``: N of them do ``--work-ms`` of work per token, so they can spend less than a
fair share). No process is told how many share the limit (``LimitSpec.workers`` unset) unless ``--hint``: then each
is told its own job's count (``--jobs`` splits the processes into jobs on the same key, which is what
``rate_limits.<name>.key`` does), and the other jobs are still a surprise. No API here: a token is a granted slot.

The state is in SQLite (``local``, the embedded default) or DynamoDB on a moto server with signals in S3 on the same
server (``dynamodb``). Processes are forked once all are ready, so 64 start within a second on 2 cores.

Prints one JSON object per process count: ``utilisation`` (tokens/s in the steady part ÷ rate), ``fairness`` (the
fewest tokens a fast process got ÷ the most), ``backend_calls_per_token`` (lease, release and throttle calls in the
steady part ÷ its tokens), ``signal_reads_per_s``, and every process's steady tokens.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from support.servers import free_port, moto_command, wait_http  # noqa: E402

from slurmctl.blocks.manifest_store import store_from_uri  # noqa: E402
from slurmctl.blocks.rate_limiter import limiter_from_config  # noqa: E402
from slurmctl.ratelimit.lanes import LimitSpec  # noqa: E402
from slurmctl.ratelimit.leaser import Leaser  # noqa: E402


def backend_for(args: argparse.Namespace, where: dict):
    if args.backend == "local":
        return limiter_from_config("local", path=where["path"])
    signals = store_from_uri("s3://lane-signals/job", endpoint_url=where["endpoint"], region="us-east-1")
    return limiter_from_config("dynamodb", table="lane-limits", endpoint_url=where["endpoint"], region="us-east-1",
                               signals=signals)


def spend(args: argparse.Namespace, where: dict, index: int, workers_hint: int | None, work_s: float,
          start: tuple, out: str) -> None:
    """One process: ``--threads`` threads spending tokens for ``--seconds``; token times and backend-call samples."""
    from prefect_aws.credentials import _get_client_cached

    _get_client_cached.cache_clear()  # forked: the parent's boto3 clients (and their sockets) are not ours
    spec = LimitSpec(per_second=args.rate, burst=5, workers=workers_hint)
    backend = backend_for(args, where)
    backend.read("shared")  # clients made before the clock runs (a boto3 client costs ~0.3 s of CPU; 64 of them ...)
    backend.signal("shared")
    leaser = Leaser(backend, "shared", spec)
    ready, at = start
    ready.put(index)
    while at.value == 0:
        time.sleep(0.01)
    begin = at.value
    while time.time() < begin:
        time.sleep(0.005)
    stamps: list[float] = []
    calls: list[tuple[float, int, int]] = []
    stop = begin + args.seconds

    def run() -> None:
        while time.time() < stop:
            leaser.acquire()
            stamps.append(time.time())
            if work_s:
                time.sleep(work_s)

    threads = [threading.Thread(target=run) for _ in range(args.threads)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        calls.append((time.time(), leaser.backend_calls, leaser.signal_calls))
        time.sleep(0.5)
    calls.append((time.time(), leaser.backend_calls, leaser.signal_calls))
    with open(out, "w") as f:
        json.dump({"stamps": stamps, "calls": calls, "slow": bool(work_s)}, f)


def run(args: argparse.Namespace, procs: int, where: dict, tmp: Path) -> dict:
    ctx = multiprocessing.get_context("fork")  # imports done once, in the parent: 64 processes start at once
    ready, at = ctx.Queue(), ctx.Value("d", 0.0)
    per_job = max(1, procs // args.jobs)
    children = []
    for i in range(procs):
        hint = (per_job if args.hint else None)
        work_s = args.work_ms / 1000 if i < args.slow else 0.0
        children.append(ctx.Process(target=spend, args=(args, where, i, hint, work_s, (ready, at),
                                                        str(tmp / f"{procs}-{i}.json"))))
    for c in children:
        c.start()
    for _ in children:
        ready.get(timeout=300)
    at.value = begin = time.time() + 0.5
    for c in children:
        c.join(args.seconds + 120)
    results = [json.loads((tmp / f"{procs}-{i}.json").read_text()) for i in range(procs)]
    lo, hi = begin + args.warmup, begin + args.seconds
    steady = [sum(1 for t in r["stamps"] if lo <= t < hi) for r in results]
    fast = [n for n, r in zip(steady, results) if not r["slow"]] or steady

    def calls_at(r: dict, t: float) -> tuple[int, int]:
        last = (0, 0)
        for when, backend_calls, signal_calls in r["calls"]:
            if when > t:
                break
            last = (backend_calls, signal_calls)
        return last

    backend_calls = sum(calls_at(r, hi)[0] - calls_at(r, lo)[0] for r in results)
    signal_reads = sum(calls_at(r, hi)[1] - calls_at(r, lo)[1] for r in results)
    return {"backend": args.backend, "rate": args.rate, "procs": procs, "jobs": args.jobs, "threads": args.threads,
            "hint": args.hint, "slow": args.slow, "work_ms": args.work_ms, "steady_s": hi - lo,
            "utilisation": round(sum(steady) / (hi - lo) / args.rate, 3),
            "fairness": round(min(fast) / max(1, max(fast)), 2),
            "backend_calls_per_token": round(backend_calls / max(1, sum(steady)), 4),
            "signal_reads_per_s": round(signal_reads / (hi - lo), 1),
            "tokens_per_process": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("local", "dynamodb"), default="local")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--jobs", type=int, default=1, help="split the processes into this many jobs on one key")
    parser.add_argument("--hint", action="store_true", help="tell each process its own job's process count")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slow", type=int, default=0, help="this many processes do --work-ms per token")
    parser.add_argument("--work-ms", type=float, default=0)
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--warmup", type=float, default=15, help="seconds left out at the start (lanes shared out)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slurmctl-lanes-"))
    moto = None
    where: dict = {}
    try:
        if args.backend == "dynamodb":
            port = free_port()
            moto = subprocess.Popen(moto_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_DEFAULT_REGION="us-east-1")
            where["endpoint"] = f"http://127.0.0.1:{port}"
            wait_http(where["endpoint"] + "/moto-api/", 60)
            import boto3

            boto3.client("s3", endpoint_url=where["endpoint"], region_name="us-east-1").create_bucket(
                Bucket="lane-signals")
        for procs in args.procs:
            where["path"] = str(tmp / f"limits-{procs}.sqlite")
            key_backend = backend_for(args, where)
            if args.backend == "dynamodb":
                key_backend.ensure_table()
                # a fresh limit per run: delete the previous run's item
                key_backend._client().delete_item(TableName="lane-limits", Key={"key": {"S": "shared"}})
            print(json.dumps(run(args, procs, where, tmp)), flush=True)
    finally:
        if moto is not None:
            moto.terminate()


if __name__ == "__main__":
    main()
