"""How fast the commands that only read a job's books answer: ``slurmctl status JOB`` as a user runs it.

    .venv/bin/python benchmarks/status.py --json

A job is written into a local store and into an S3 store on a moto server (its job manifest with counters, a
heartbeat and ``--batches`` committed task manifests), then ``slurmctl status JOB --storage URI`` runs ``--runs``
times in a fresh process each (the real command, Python start-up and imports included) for each store; and
``status --scan`` (every task manifest read) once. Prints one JSON object: per store, the median and each run's
seconds, against issue 25's targets (0.5 s local, 1 s S3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.servers import free_port, moto_command, wait_http  # noqa: E402

from slurmctl.books.heartbeat import Heartbeat  # noqa: E402
from slurmctl.books.manifests import Keys, TaskManifest, now  # noqa: E402
from slurmctl.books.store import new_job_manifest  # noqa: E402
from slurmctl.config import parse_config  # noqa: E402
from slurmctl.storage import open_store  # noqa: E402

TARGETS = {"local": 0.5, "s3": 1.0}
BIN = Path(sys.executable).parent


def slurmctl() -> list[str]:
    exe = BIN / "slurmctl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "slurmctl.cli"]


def write_job(uri: str, job_id: str, batches: int, endpoint: str | None) -> None:
    cfg = parse_config({"job_id": job_id, "handler": "slurmctl.handlers.echo:handle",
                        "input": {"uri": "users.jsonl"}, "storage": {"uri": uri, "endpoint_url": endpoint,
                                                                  "region": "us-east-1" if endpoint else None}})
    store = open_store(uri, endpoint_url=endpoint, region="us-east-1" if endpoint else None)
    if endpoint:
        store.ensure_bucket()
    job = new_job_manifest(cfg, None)
    job.status, job.phase = "running", "process"
    job.counts.batches_total = job.counts.batches_done = batches
    job.counts.items_total = job.counts.items_succeeded = batches * 100
    store.put_json(Keys(job_id).job, job.model_dump(mode="json"))
    Heartbeat(store, job_id).beat()
    for i in range(batches):
        batch = f"batch-{i:06d}"
        store.put_json(Keys(job_id).task(batch), TaskManifest(
            job_id=job_id, batch_id=batch, task_id=batch, status="succeeded", started_at=now(),
            finished_at=now(), items=100, items_succeeded=100).model_dump(mode="json"))


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200, help="committed task manifests (read by --scan)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slurmctl-status-"))
    env = {**os.environ, "SLURMCTL_HOME": str(tmp / "home"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    port = free_port()
    moto = subprocess.Popen(moto_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    out: dict = {"batches": args.batches}
    try:
        wait_http(endpoint + "/moto-api/", 60)
        for name, uri, where in (("local", f"file://{tmp}/state", ()),
                                 ("s3", "s3://status-bench/runs", ("--endpoint-url", endpoint, "--region",
                                                                   "us-east-1"))):
            write_job(uri, "bench", args.batches, endpoint if where else None)
            cmd = [*slurmctl(), "status", "bench", "--storage", uri, *where]
            runs = [timed(cmd, env) for _ in range(args.runs)]
            median = statistics.median(runs)
            out[name] = {"seconds": round(median, 3), "runs": [round(r, 3) for r in runs],
                         "target_s": TARGETS[name], "met": median <= TARGETS[name],
                         "scan_seconds": round(timed([*cmd, "--scan"], env), 3)}
    finally:
        moto.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
