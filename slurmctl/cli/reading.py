"""``slurmctl status`` and ``slurmctl analyze-errors``: a job's books, read from its manifests alone (no Prefect,
Dask or pandas imported: they answer in a fraction of a second)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slurmctl.cli.common import EXIT_OK, command, job_and_store, storage_args
from slurmctl.progress_display import phase_lines, speed_text


def add_parser(sub: Any) -> None:
    p = command(sub, "status", help="a job's status, from its manifests", examples=[
        "slurmctl status backfill-2025-04-12",
        "slurmctl status backfill-2025-04-12 --json | jq '{status, items_done, items_per_s, eta_s}'",
        "slurmctl status backfill-2025-04-12 --batches 10     # and its 10 slowest batches",
        "slurmctl status old-job --storage s3://team-bucket/runs --region eu-west-1"])
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--scan", action="store_true", help="recount from the task manifests instead of the job's counters")
    p.add_argument("--batches", type=int, metavar="N", help="also the N slowest committed batches, from their "
                   "metrics (reads every task manifest)")
    storage_args(p)
    p.set_defaults(func=cmd_status)
    p = command(sub, "analyze-errors", help="failed items by class, top messages, hot batches and hosts", examples=[
        "slurmctl analyze-errors backfill-2025-04-12", "slurmctl analyze-errors backfill-2025-04-12 --json --top 3"])
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--top", type=int, default=10)
    storage_args(p)
    p.set_defaults(func=cmd_analyze_errors)


def cmd_status(args: argparse.Namespace) -> int:
    from slurmctl.books.status import job_status

    job, store = job_and_store(args)
    view = job_status(store, job, scan=args.scan, batches=args.batches)
    if args.json:
        print(json.dumps(view))
        return EXIT_OK
    width = max(len(k) for k in view)
    for k, v in view.items():
        if v is not None and k not in ("items_per_s", "eta_s", "phases", "slowest_batches", "budget", "advice"):
            print(f"{k:<{width}}  {v}")
    if view.get("budget"):
        from slurmctl.books.budget import fmt

        print(f"{'budget':<{width}}  " + "; ".join(
            f"{key} {fmt(key, b['used'])}/{fmt(key, b['max'])} ({100 * b['share']:.0f} %)"
            for key, b in view["budget"].items()))
    print(f"{'speed':<{width}}  {speed_text(view)}")
    print("phases:\n" + "\n".join(phase_lines(view)))
    if view.get("slowest_batches"):
        print("slowest batches:     seconds  items  calls  p50 ms  p95 ms  waited s  cpu s  host (slurm job)")
        for b in view["slowest_batches"]:
            print(f"  {b['batch_id']:<16} {b['duration_s']:>8.1f} {b['items'] or 0:>6} {b['api_calls'] or 0:>6} "
                  f"{b['p50_ms'] or 0:>7.0f} {b['p95_ms'] or 0:>7.0f} {b['tokens_waited_s'] or 0:>9.1f} "
                  f"{b['cpu_s'] or 0:>6.1f}  {b['host']}" + (f" ({b['slurm_job_id']})" if b["slurm_job_id"] else ""))
    for advice in view.get("advice") or []:
        print(f"note: {advice}")
    if view["stale"]:
        print(f"\nno heartbeat for a while: the coordinator may have died; `slurmctl resume {args.job_id}`")
    return EXIT_OK


def cmd_analyze_errors(args: argparse.Namespace) -> int:
    from slurmctl.books.failures import analyze, committed_tasks, failure_state

    store = job_and_store(args)[1]
    report = analyze(args.job_id, failure_state(store, committed_tasks(store, args.job_id)), top=args.top)
    if args.json:
        print(json.dumps(report, default=str))
        return EXIT_OK
    print(f"job {args.job_id}: {report['items_failed']} items failed, {report['items_deferred']} deferred")
    if not report["classes"]:
        return EXIT_OK
    print("\nby class:")
    for cls, n in report["classes"].items():
        print(f"  {cls:<12} {n}")
    print("\ntop messages:")
    for m in report["top_messages"]:
        print(f"  {m['count']:>6}  [{m['error_class']}] {m['message'][:100]}  e.g. ids {m['example_ids']}")
    print("\nhot batches: " + ", ".join(f"{b} ({n})" for b, n in report["batches"].items()))
    print("hot hosts:   " + ", ".join(f"{h} ({n})" for h, n in report["hosts"].items()))
    transient = [c for c in report["classes"] if c in ("network", "timeout", "throttle", "server")]
    if transient:
        print(f"\nretry them with: slurmctl retry {args.job_id} --errors={','.join(transient)} --wait")
    return EXIT_OK
