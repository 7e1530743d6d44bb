"""``slurmctl``: submit a job, watch it, check its status, resume it.

Exit codes: 0 the job completed; 1 it failed (or its coordinator died, or an action did not work); 2 bad config or
arguments, or a refused request (nothing was done); 130 you stopped watching with Ctrl-C (the job keeps running).

The job's coordinator (the Prefect flow) runs in its own process, so closing the terminal or Ctrl-C while watching
does not stop the job; ``--wait`` just follows its progress from the job manifest, exactly as ``status`` does.

One module per command group, each over the library the Python API uses too (``slurmctl.control``,
``slurmctl.books``): ``submitting`` (submit, iam-policy), ``reading`` (status, analyze-errors), ``listing`` (list),
``operating`` (resume, retry, aggregate, cancel, pause, rate), ``collect`` (gc), ``alerts``, ``capacity``,
``server``.
"""

from __future__ import annotations

import argparse
import re
import sys

from slurmctl.cli import alerts, capacity, collect, listing, operating, reading, server, submitting
from slurmctl.cli.common import EXIT_USAGE, _err
from slurmctl.config import JOB_ID_PATTERN
from slurmctl.control.errors import ControlError
from slurmctl.safe_keys import UnsafeKey, name_problem

GROUPS = (submitting, reading, listing, operating, collect, alerts, capacity, server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurmctl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def job_id_problem(job_id: str | None) -> str | None:
    """Why a job id given on the command line cannot be one (it names files and store keys), or None."""
    if job_id is None or re.fullmatch(JOB_ID_PATTERN, job_id):
        return None
    why = name_problem(job_id) or f"must match {JOB_ID_PATTERN} (lower-case letters, digits and '-')"
    return f"{job_id[:200]!r} is not a job id: it {why}; `slurmctl submit` prints the id of each job it starts"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad arguments
    bad_id = job_id_problem(getattr(args, "job_id", None))
    if bad_id:
        _err(bad_id)
        return EXIT_USAGE
    try:
        return args.func(args)
    except ControlError as exc:  # refused (2) or did not work (1): the message says what to do
        _err(str(exc))
        return exc.exit_code
    except UnsafeKey as exc:  # a key that would leave the job's prefix: refused before any read or write
        _err(str(exc))
        return EXIT_USAGE
    except Exception as exc:
        # Imported here, not before the command: the books' store module is not needed by `server status`.
        from slurmctl.books.store import JobNotFound, JobTooNew

        if isinstance(exc, JobNotFound):
            _err(f"{exc}; pass --storage URI if the job lives elsewhere")
            return EXIT_USAGE
        if isinstance(exc, JobTooNew):  # a job another release wrote: say which to use, no traceback
            _err(str(exc))
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
