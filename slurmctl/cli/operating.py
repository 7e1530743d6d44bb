"""``slurmctl resume|retry|aggregate|cancel|pause|rate``: make a job go again, stop it, or slow it down. Each
parses its arguments, calls ``slurmctl.control`` (what the Python API's ``Job`` calls too) and prints; a refused
request or a failed action arrives as a ``ControlError`` that ``slurmctl.cli.root`` prints with its exit code."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from slurmctl.cli.common import EXIT_OK, EXIT_USAGE, _err, command, job_and_store, storage_args, storage_for
from slurmctl.cli.watching import flow_run_link, watch


def add_parser(sub: Any) -> None:
    p = command(
        sub, "resume", help="make a paused, stopped or failed job go again; committed batches are not re-run",
        description="Make a job go again: unpause its rate limits, or start a coordinator for a job that stopped "
                    "(failed, cancelled, stopped by a signal, its coordinator dead, paused at its budget). Committed "
                    "batches are not run again. Example: slurmctl resume geocode-2025-04-12 "
                    "--raise-budget max_api_calls=200000 --wait",
        examples=["slurmctl resume backfill-2025-04-12 --wait",
                  "slurmctl resume backfill-2025-04-12 --force         # re-aggregate a completed job",
                  "slurmctl resume backfill-2025-04-12 --raise-budget max_api_calls=250000,max_usd=400"])
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--force", action="store_true", help="run even if the job completed (re-aggregates)")
    p.add_argument("--raise-budget", action="append", metavar="KEY=VALUE",
                   help="new budget limit (max_api_calls, max_core_hours, max_usd; none removes it), recorded in the "
                        "job manifest; repeatable. A job paused at its budget needs it")
    storage_args(p)
    p.set_defaults(func=cmd_resume)
    p = command(sub, "retry", help="a retry round over the items that failed with the given error classes",
                examples=["slurmctl retry backfill-2025-04-12 --errors network,throttle --wait"])
    p.add_argument("job_id")
    p.add_argument("--errors", required=True, help="comma-separated classes, e.g. network,throttle,server")
    p.add_argument("--wait", action="store_true")
    storage_args(p)
    p.set_defaults(func=cmd_retry)
    p = command(
        sub, "aggregate", help="merge the committed batch outputs into the job's dataset again (e.g. after a retry)",
        description="Run the aggregation alone: every planned batch must be committed (else it names the missing "
                    "ones; `slurmctl resume` runs them). Finished merges of an interrupted aggregation are kept.",
        examples=["slurmctl aggregate backfill-2025-04-12 --wait"])
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="follow it until it ends; exit 0 if the job completed")
    storage_args(p)
    p.set_defaults(func=cmd_aggregate)
    p = command(
        sub, "cancel", help="stop a running job: its Dask cluster and Slurm jobs; committed batches are kept",
        description="Cancel a job's current run, as cancelling its flow run in the Prefect UI does: the coordinator "
                    "stops between batches, the Dask cluster is closed, every Slurm job of the job is cancelled, and "
                    "the job manifest says cancelled. `slurmctl resume JOB` continues it later.",
        examples=["slurmctl cancel backfill-2025-04-12", "slurmctl cancel backfill-2025-04-12 --no-wait"])
    p.add_argument("job_id")
    p.add_argument("--no-wait", action="store_true", help="ask, and return without waiting for the job to stop")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for it to stop (default 120)")
    storage_args(p)
    p.set_defaults(func=cmd_cancel)
    p = command(sub, "pause", help="stop workers taking rate-limit tokens (in-flight requests finish)",
                examples=["slurmctl pause backfill-2025-04-12                   # then: slurmctl resume "
                          "backfill-2025-04-12"])
    p.add_argument("job_id")
    storage_args(p)
    p.set_defaults(func=cmd_pause)
    p = command(sub, "rate", help="change a rate limit while the job runs",
                examples=["slurmctl rate backfill-2025-04-12 --limit geo --per-second 5"])
    p.add_argument("job_id")
    p.add_argument("--limit", required=True, help="the limit's name in the job config's rate_limits")
    p.add_argument("--per-second", type=float, required=True)
    storage_args(p)
    p.set_defaults(func=cmd_rate)


def restart(args: argparse.Namespace, retry_errors: list[str] | None = None, aggregate_only: bool = False) -> int:
    from slurmctl.control.restart import restart as go

    r = go(args.job_id, storage_for(args), retry_errors=retry_errors,
           aggregate_only=aggregate_only, force=getattr(args, "force", False),
           raise_budget=getattr(args, "raise_budget", None))
    if not r.follow:  # nothing to start: the answer is the message
        print(r.message)
        return EXIT_OK
    if r.message:
        print(r.message, file=sys.stderr)
    if not args.wait:
        if r.server and r.proc is not None:
            print(f"Prefect UI: {r.server['ui_url']}/runs", file=sys.stderr)
        return EXIT_OK
    announce = flow_run_link(r.server, r.previous_run) if r.proc is not None else None
    return watch(r.job_id, r.storage, r.proc, r.log, announce=announce)


def cmd_resume(args: argparse.Namespace) -> int:
    return restart(args)


def cmd_retry(args: argparse.Namespace) -> int:
    from slurmctl.control.restart import error_classes

    classes = error_classes(args.errors)
    if not classes:
        _err("--errors: give one or more error classes, e.g. --errors=network,throttle")
        return EXIT_USAGE
    return restart(args, classes)


def cmd_aggregate(args: argparse.Namespace) -> int:
    return restart(args, aggregate_only=True)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Ask the job's run to stop; unless ``--no-wait``, wait until the manifest says so and no Slurm job is left."""
    from slurmctl.control.cancel import cancel

    print(cancel(*job_and_store(args), wait=not args.no_wait, timeout=args.timeout), file=sys.stderr)
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    from slurmctl.control.limits import pause

    names = pause(*job_and_store(args))
    print(f"paused {args.job_id}: workers take no more tokens of {', '.join(names)} (in-flight requests finish; "
          f"batches wait). `slurmctl resume {args.job_id}` continues", file=sys.stderr)
    return EXIT_OK


def cmd_rate(args: argparse.Namespace) -> int:
    from slurmctl.control.limits import set_rate

    target = set_rate(job_and_store(args)[0], args.limit, args.per_second)
    print(f"{args.job_id}: limit {args.limit} now {target:g}/s (workers see the change at their next signal "
          f"check and switch after a grace of about 1.5 s)", file=sys.stderr)
    return EXIT_OK
