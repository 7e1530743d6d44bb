"""The coordinator process: runs the job flow for one job. Started by ``slurmctl submit`` / ``resume``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Iterator

from slurmctl.handler import ensure_import_path


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[None]:
    """Make sure Dask workers report to the same Prefect API as the flow.

    With no ``PREFECT_API_URL`` Prefect would start a private ephemeral server in *each* worker process, and their
    task runs would never reach the flow's database. So the coordinator starts the ephemeral server itself and
    exports its URL, which worker processes inherit. On a real cluster set ``PREFECT_API_URL`` to a server the
    compute nodes can reach.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurmctl.coordinator")
    parser.add_argument("job_id")
    parser.add_argument("--storage-json", required=True)
    parser.add_argument("--retry-errors", default="", help="comma-separated error classes for a retry round")
    args = parser.parse_args(argv)
    ensure_import_path()
    from flows.job import run_job

    try:
        with prefect_api_for_workers():
            run_job(args.job_id, json.loads(args.storage_json),
                    retry_errors=[c for c in args.retry_errors.split(",") if c] or None)
    except Exception as exc:  # the job manifest already records the failure; the log has the traceback
        print(f"job {args.job_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # guard required: Dask's process-based clusters spawn this module again
    sys.exit(main())
