"""A job's processes end when the job does: the coordinator exits, and `submit --wait` returns once it has, with every
Prefect log sent before the coordinator's temporary Prefect server stops (how soon is benchmarks/latency.py's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from support.chaos_api import ChaosApi
from support.jobs import ROOT, run_cli, write_config, write_jsonl

pytestmark = pytest.mark.integration

# The requirement itself (issue 8) is a speed target: a one-record job is over, processes and all, 5 s after its
# manifest says so. Targets are measured by benchmarks/latency.py (its `exit` phase, cold and warm, against
# `exit_target_s`), never by a wall-clock bound here: on a loaded 2-core CI machine the same code took 1.4 s one run
# and 5.3 s another. What this test holds is the cause the target was missed by (before: `submit --wait` gave up
# waiting after 60 s; the coordinator lived 78 s, retrying logs to its stopped server): `submit --wait` returns only
# once the coordinator has exited, without giving up on it, and no log was left for a stopped server.


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie has exited: it only waits to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_one_record_job_on_the_embedded_default_ends_with_its_coordinator(
        tmp_path: Path, slurmctl_home: Path, monkeypatch: pytest.MonkeyPatch):
    # The embedded default as a new user gets it: no Prefect server configured, so the coordinator starts its own
    # temporary one (a fresh PREFECT_HOME: a new database) and stops it at the end.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    write_jsonl(tmp_path / "one.jsonl", [{"id": 1, "name": "u1"}])
    cfg = write_config(tmp_path / "job.yaml", job_id="one-record", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "one.jsonl", "id_field": "id"}, cluster={"kind": "local", "n_workers": 1},
                       storage={"uri": "file://./state"})

    result = run_cli("submit", str(cfg), "--wait")
    returned = time.time()
    coordinator_log = (slurmctl_home / "logs" / "one-record.log").read_text()
    assert result.returncode == 0, result.stderr + coordinator_log[-5000:]

    job = json.loads((tmp_path / "state" / "jobs" / "one-record" / "job.json").read_text())
    assert job["status"] == "completed"
    finished_at = datetime.fromisoformat(job["finished_at"]).timestamp()  # UTC, ms precision
    # The coordinator had exited when `submit --wait` returned: it waited for it, and did not give up on it.
    assert not pid_alive(job["coordinator_pid"]), "submit --wait returned while the coordinator was still running"
    assert returned > finished_at
    assert "not waiting for it" not in result.stderr, result.stderr[-2000:]
    # Every log reached the temporary server before it stopped: nothing was left retrying a dead one.
    assert "Error logging to API" not in coordinator_log, coordinator_log[-3000:]


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
