"""``slurmctl gc``: remove completed jobs' intermediate objects (``slurmctl.books.gc`` says which, and what stays)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slurmctl.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _err, storage_args, storage_of
from slurmctl.config import StorageConfig, known_storage, known_stores


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "gc", help="remove completed jobs' intermediate objects (batch parts, commit logs, caches); --dry-run first",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Remove a completed job's intermediate objects: batch parts, commit logs, Prefect result records,\n"
                    "merge levels, checkpoints, input chunks. Manifests, the output, failures and rejects stay, so\n"
                    "status, list, analyze-errors and the output read the same; the output can no longer be\n"
                    "rebuilt (aggregate). A job that is not completed is refused: resume needs its parts.",
        epilog="examples:\n  slurmctl gc backfill-2025-04-12 --dry-run\n  slurmctl gc backfill-2025-04-12\n"
               "  slurmctl gc --older-than 30              # every completed job finished 30+ days ago\n"
               "  slurmctl gc --older-than 7 --storage s3://team-bucket/slurmctl --json")
    p.add_argument("job_ids", nargs="*", metavar="JOB", help="the jobs to collect (or --older-than)")
    p.add_argument("--older-than", type=float, metavar="DAYS",
                   help="collect every completed job of the store(s) that finished more than DAYS days ago")
    p.add_argument("--dry-run", action="store_true", help="say what would go and how many bytes; remove nothing")
    p.add_argument("--json", action="store_true", help="one JSON array, one object per job")
    storage_args(p)
    p.set_defaults(func=cmd_gc)


def _targets(args: argparse.Namespace) -> list[tuple[str, StorageConfig]]:
    given = storage_of(args)
    if args.job_ids:
        return [(j, given or known_storage(j)) for j in args.job_ids]
    from slurmctl.books.catalog import list_jobs
    from slurmctl.books.store import reader_for

    return [(row["job_id"], s) for s in ([given] if given else known_stores())
            for row in list_jobs(reader_for(s)) if row["status"] == "completed"]


def cmd_gc(args: argparse.Namespace) -> int:
    from slurmctl.books import gc
    from slurmctl.books.store import JobNotFound, reader_for

    if not args.job_ids and args.older_than is None:
        _err("name the jobs to collect, or --older-than DAYS for every completed job that old")
        return EXIT_USAGE
    views, code = [], EXIT_OK
    for job_id, storage in _targets(args):
        store = reader_for(storage)
        try:
            done = (gc.plan if args.dry_run else gc.collect)(store, job_id, args.older_than)
        except (gc.GcRefused, JobNotFound) as exc:
            if args.job_ids:  # asked for by name: say why not
                _err(str(exc))
                code = EXIT_FAILED
            continue
        views.append({**done.view(), "removed": not args.dry_run})
    if args.json:
        print(json.dumps(views))
        return code
    for v in views:
        folders = ", ".join(f"{f} {d['objects']} ({_mb(d['bytes'])})" for f, d in v["by_folder"].items())
        print(f"{'removed' if v['removed'] else 'would remove'} {v['objects']} objects ({_mb(v['bytes'])}) of job "
              f"{v['job_id']}{': ' + folders if folders else ''}")
    if not views and not args.job_ids:
        print(f"no completed job finished more than {args.older_than:g} days ago")
    return code


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
