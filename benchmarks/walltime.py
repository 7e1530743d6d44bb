"""Walltime: a job longer than its Slurm worker jobs' walltime, against the same job with walltime to spare.

    bash scripts/slurm.sh up
    .venv/bin/python benchmarks/walltime.py --json

Each cell runs ``--items`` items of ``--sleep-s`` each (default 3,600 x 0.1 s: 6 min of handler time, 3 min on the
2 Slurm worker jobs of ``cores: 1``) with ``slurmctl submit --wait``, once per ``--walltimes`` (default 1 minute,
Slurm's smallest, and 1 hour). Reported per cell: the job's wall time and items/s, how many items the handler saw
twice (its calls file), whether the output holds every item once, the worker jobs that ran batches, the
retirements and worker-loss requeues the job counted, the worker jobs Slurm killed at their time limit (their logs),
and the core-seconds the workers held against the handler's busy seconds (the idle core time), and the most worker jobs
alive at once (a replacement starts before its predecessor retires; the test Slurm lets jobs share cores,
``OverSubscribe=FORCE:4``). From the task manifests: each replacement's *lead* (its predecessor's last batch end
minus its own first batch start: positive when it was already working as its predecessor left) and the longest
stretch of the run with no batch running anywhere (a dip of throughput to zero). ``ratio``: the short walltime's items/s over the long one's (target >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from support.jobs import output_ids, write_config, write_jsonl  # noqa: E402
from support.sample_handlers import calls  # noqa: E402
from support.servers import benchmark_env, start_prefect_server, stop  # noqa: E402


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def replacement_leads(tasks: list[dict], initial: int) -> list[float]:
    """Per replacement worker job, its predecessor's last batch end minus its own first batch start: each job after
    the first ``initial`` (by first batch) replaces the earliest-ending job not yet replaced that started before it."""
    spans: dict[str, list[float]] = {}
    for t in tasks:
        a, b = _t(t["started_at"]), _t(t["finished_at"])
        lo, hi = spans.get(t.get("slurm_job_id") or "?", [a, b])
        spans[t.get("slurm_job_id") or "?"] = [min(lo, a), max(hi, b)]
    jobs = sorted(spans.values())
    waiting, leads = [], []
    for i, (start, end) in enumerate(jobs):
        if i >= initial and waiting:
            predecessor = min((w for w in waiting if w[0] < start), key=lambda w: w[1], default=None)
            if predecessor is not None:
                waiting.remove(predecessor)
                leads.append(round(predecessor[1] - start, 1))
        waiting.append((start, end))
    return leads


def longest_idle_s(tasks: list[dict]) -> float:
    """The longest stretch between the first batch's start and the last batch's end with no batch running."""
    spans = sorted((_t(t["started_at"]), _t(t["finished_at"])) for t in tasks)
    gap, reach = 0.0, spans[0][1] if spans else 0.0
    for a, b in spans[1:]:
        gap = max(gap, a - reach)
        reach = max(reach, b)
    return round(gap, 1)


def run_cell(args: argparse.Namespace, env: dict, tmp: Path, walltime: str) -> dict:
    job_id = f"wall-{walltime.replace(':', '')}-{os.urandom(2).hex()}"
    folder = tmp / job_id
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", [{"id": i} for i in range(args.items)])
    calls_file = folder / "calls"
    cfg = write_config(folder / "job.yaml", job_id=job_id, handler="support.sample_handlers:counting",
                       input={"uri": "in.jsonl"}, batch_size=args.batch_size, storage={"uri": "state"},
                       params={"calls_file": str(calls_file), "sleep_s": args.sleep_s},
                       cluster={"kind": "slurm", "queue": "debug", "cores": 1, "processes": 1, "memory": "1GB",
                                "walltime": walltime, "min_jobs": args.jobs, "max_jobs": args.jobs,
                                **({} if args.replace_ahead_s is None else {"replace_ahead_s": args.replace_ahead_s})})
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "slurmctl.cli", "submit", str(cfg), "--wait"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    view = json.loads(subprocess.run([sys.executable, "-m", "slurmctl.cli", "status", job_id, "--json"], cwd=folder,
                                     env=env, capture_output=True, text=True, timeout=300).stdout or "{}")
    handled = Counter(item for _, item in calls(str(calls_file)))
    tasks = [json.loads(p.read_text()) for p in (folder / "state/jobs" / job_id / "tasks").glob("batch-*.json")]
    logs = Path(env["SLURMCTL_HOME"]) / "logs" / job_id
    killed = sorted(p.name for p in logs.glob("*") if "DUE TO TIME LIMIT" in p.read_text(errors="replace"))
    # Worker jobs at once, from their logs' first and last lines (the replacements overlap their predecessors).
    spans = []
    for err in logs.glob("*.err"):
        stamps = re.findall(r"^\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d)", err.read_text(errors="replace"), flags=re.M)
        if stamps:
            secs = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in stamps]
            spans.append((min(secs), max(secs)))
    at_once = max((sum(1 for a, b in spans if a <= t <= b) for t, _ in spans), default=0)
    ids = output_ids(view) if view.get("status") == "completed" else []
    busy = args.items * args.sleep_s
    job = json.loads((folder / "state/jobs" / job_id / "job.json").read_text())
    out = {"walltime": walltime, "items": args.items, "job_exit": done.returncode, "status": view.get("status"),
           "job_seconds": round(wall, 1), "items_per_s": round(args.items / wall, 1),
           "items_handled_twice": sum(1 for c in handled.values() if c > 1),
           "output_exact": sorted(ids) == list(range(args.items)),
           "worker_jobs_used": len({t.get("slurm_job_id") for t in tasks}), "worker_jobs_at_once_max": at_once,
           "replacement_lead_s": replacement_leads(tasks, args.jobs), "longest_idle_s": longest_idle_s(tasks),
           "worker_retirements": view.get("worker_retirements"),
           "worker_loss_requeues": view.get("worker_loss_requeues"),
           "killed_at_time_limit": len(killed) // 2 if killed else 0,  # each job's .out and .err say so
           "core_seconds": round(job.get("core_seconds", 0.0), 1), "busy_core_seconds": round(busy, 1),
           "idle_core_seconds": round(job.get("core_seconds", 0.0) - busy, 1)}
    if done.returncode != 0:
        out["stderr"] = done.stderr[-1500:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=3600)
    p.add_argument("--sleep-s", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="Slurm worker jobs (min_jobs = max_jobs)")
    p.add_argument("--walltimes", nargs="+", default=["00:01:00", "01:00:00"])
    p.add_argument("--replace-ahead-s", type=float, default=None,
                   help="cluster.replace_ahead_s (default: the config's, 30 s; 0: replace a worker once it has gone)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-walltime-"))
    env = benchmark_env(tmp, ROOT)
    cells = []
    server = start_prefect_server(env, tmp / "prefect-home")
    try:
        for walltime in args.walltimes:
            cell = run_cell(args, env, tmp, walltime)
            cells.append(cell)
            print(json.dumps(cell), file=sys.stderr, flush=True)
    finally:
        stop(server)
    out = {"workers": f"{args.jobs} Slurm worker jobs of cores: 1", "replace_ahead_s": args.replace_ahead_s,
           "cells": cells}
    if len(cells) >= 2 and cells[-1]["items_per_s"]:
        out["ratio"] = round(cells[0]["items_per_s"] / cells[-1]["items_per_s"], 3)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
