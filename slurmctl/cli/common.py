"""What every ``slurmctl`` command shares: exit codes, error lines, the options naming a store, and a command's
``--help`` examples."""

from __future__ import annotations

import argparse
import sys
from typing import Any

# 0 the job completed (or the command did what it said); 1 it failed, or an action did not work; 2 bad config or
# arguments, or a refused request (nothing was done); 130 you stopped watching with Ctrl-C (the job keeps running).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DETACHED = 0, 1, 2, 130


def _err(msg: str) -> None:
    print(f"slurmctl: {msg}", file=sys.stderr)


def storage_args(p: Any) -> None:
    """``--storage``/``--endpoint-url``/``--region`` on the parser ``p`` of a command that reads a job's store."""
    p.add_argument("--storage", help="store URI (file://… or s3://bucket/prefix) if not the one submit recorded")
    p.add_argument("--endpoint-url", help="S3 endpoint for --storage (e.g. a moto server)")
    p.add_argument("--region", help="AWS region for --storage")


def storage_of(args: argparse.Namespace) -> Any:
    """The store ``--storage`` names (a ``StorageConfig``), or None: where ``submit`` recorded the job."""
    if not getattr(args, "storage", None):
        return None
    from slurmctl.config import StorageConfig

    return StorageConfig(uri=args.storage, endpoint_url=args.endpoint_url, region=args.region)


def storage_for(args: argparse.Namespace) -> Any:
    """Where the job ``args.job_id`` lives: ``--storage``, else where ``submit`` recorded it (``known_storage``)."""
    from slurmctl.config import known_storage

    return storage_of(args) or known_storage(args.job_id)


def job_and_store(args: argparse.Namespace) -> tuple[Any, Any]:
    """The job ``args.job_id`` names (its manifest, verified) and the store it lives in (``storage_for``;
    ``JobNotFound`` says where it looked)."""
    from slurmctl.books.store import load_job, reader_for

    store = reader_for(storage_for(args))
    return load_job(store, args.job_id), store


class ExamplesFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that an ``examples:`` epilog keeps its lines (one command per line)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def command(sub: Any, name: str, examples: list[str], **kwargs: Any) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` whose ``--help`` ends with ``examples`` (one command line each)."""
    return sub.add_parser(name, epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
                          formatter_class=kwargs.pop("formatter_class", ExamplesFormatter), **kwargs)
