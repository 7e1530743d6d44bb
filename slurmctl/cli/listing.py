"""``slurmctl list``: the jobs in a store, newest first, with status and progress (``slurmctl.books.catalog``).

Without ``--storage`` it lists every store this machine submitted jobs to (the pointers ``submit`` leaves in
``$SLURMCTL_HOME/jobs``) and the default store (``$SLURMCTL_STORAGE``, else ``./.slurmctl``): the jobs
``slurmctl status JOB`` would find. Like ``status``, it reads manifests only, and imports neither Prefect nor Dask.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from slurmctl.cli.common import EXIT_FAILED, EXIT_OK, _err, storage_args, storage_of
from slurmctl.config import StorageConfig, known_stores


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "list", help="the jobs in a store, newest first, with status and progress",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The jobs in a store, newest submission first, from their job manifests: status, phase, batches "
                    "and items done.\nWithout --storage: every store jobs were submitted to from this machine, and "
                    "the default one\n($SLURMCTL_STORAGE, else ./.slurmctl).",
        epilog="examples:\n  slurmctl list\n  slurmctl list --storage s3://team-bucket/slurmctl --limit 10\n"
               "  slurmctl list --json | jq '.[] | select(.status == \"failed\") | .job_id'")
    p.add_argument("--json", action="store_true", help="one JSON array of jobs")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="the newest N jobs (default 50; 0: all)")
    storage_args(p)
    p.set_defaults(func=cmd_list)


def stores_to_list(args: argparse.Namespace) -> list[StorageConfig]:
    if args.storage:
        return [storage_of(args)]
    return known_stores()


def cmd_list(args: argparse.Namespace) -> int:
    from slurmctl.books.catalog import jobs_in

    failed: list[str] = []

    def unreachable(storage: StorageConfig, exc: Exception) -> None:  # the other stores are still listed
        _err(f"cannot list {storage.uri}: {type(exc).__name__}: {exc}")
        failed.append(storage.uri)

    stores = stores_to_list(args)
    jobs = jobs_in(stores, on_error=unreachable)
    code = EXIT_FAILED if failed else EXIT_OK
    jobs = jobs[:args.limit] if args.limit > 0 else jobs
    if args.json:
        print(json.dumps(jobs))
        return code
    if not jobs:
        where = ", ".join(s.uri for s in stores) or "no store (nothing submitted from here; pass --storage URI)"
        print(f"no jobs in {where}")
        return code
    print(table(jobs, many_stores=len(stores) > 1))
    return code


def table(jobs: list[dict[str, Any]], many_stores: bool = False) -> str:
    head = ["JOB", "STATUS", "PHASE", "BATCHES", "DONE", "ITEMS OK", "FAILED", "SUBMITTED"] + (
        ["STORE"] if many_stores else [])
    lines = [head]
    for j in jobs:
        total, done = j.get("batches_total") or 0, j.get("batches_done") or 0
        lines.append([j["job_id"], j["status"], j.get("phase") or "", f"{done}/{total}",
                      f"{100 * done / total:.0f} %" if total else "", str(j.get("items_succeeded", "")),
                      str(j.get("items_failed", "")), (j.get("submitted_at") or "")[:19].replace("T", " ")]
                     + ([j["store"]] if many_stores else []))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)
