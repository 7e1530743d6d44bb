"""A job's processes end when the job does, even when Prefect's API will not take the coordinator's last logs.

The one-record jobs of tests/test_server.py (the embedded default as a new user gets it) hold the rest: the
coordinator exits soon after the job's last state write, and `submit --wait` returns once it has
(``support.processes.assert_ended_with_its_coordinator``; how soon end to end is benchmarks/latency.py's)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.chaos_api import ChaosApi
from support.jobs import ROOT

pytestmark = pytest.mark.integration

# Run in its own process, as the coordinator: one run log waits to be sent to an API that never takes it.
_UNREACHABLE_API_SCRIPT = textwrap.dedent("""
    import datetime, sys, uuid
    from prefect.logging.handlers import APILogWorker
    from slurmctl.cli.coordinator import flush_prefect

    APILogWorker.instance().send({"name": "prefect.flow_runs", "level": 20, "message": "the last log",
                                  "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                  "flow_run_id": str(uuid.uuid4()), "task_run_id": None})
    print("flushed" if flush_prefect(timeout=1.0) else "gave up", flush=True)
""")


def test_logs_an_unreachable_api_never_takes_do_not_keep_the_coordinator_alive(tmp_path: Path):
    # A Prefect API that answers every request with 503: Prefect's client retries a log batch with exponential
    # backoff for over a minute, and the exit-time drain would wait for it (it took 118 s without the give-up).
    with ChaosApi(rate_503=1.0) as api:
        env = {**os.environ, "PREFECT_API_URL": f"{api.url}/api", "PREFECT_HOME": str(tmp_path / "prefect-home"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        try:
            proc = subprocess.run([sys.executable, "-c", _UNREACHABLE_API_SCRIPT], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the process was still alive 60 s after it gave up its logs")
        assert api.requests > 0  # the log was really offered to the API
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "gave up", proc.stdout + proc.stderr
