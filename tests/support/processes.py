"""A job's processes end when the job does: what a test checks after ``slurmctl submit --wait`` returned.

The requirement (issue 8) is a speed target: a one-record job is over, processes and all, 5 s after its manifest
says so. The end-to-end figure (to `submit --wait`'s return) is benchmarks/latency.py's (its `exit` phase, cold and
warm, against `exit_target_s`): on a loaded 2-core CI machine the same code took 1.4 s one run and 5.3 s another,
most of it in the CLI's own start-up and exit. What ``assert_ended_with_its_coordinator`` holds is the coordinator's
part, the one that regressed (before: the coordinator lived 78 s after finished_at, retrying logs to a stopped
server, and `submit --wait` gave up waiting for it after 60 s), read off the coordinator's own clock: the exit line
it writes last (slurmctl.cli.coordinator.EXIT_LINE, after every exit-time drain) is within COORDINATOR_EXIT_BOUND_S
of the job's last state write (the manifest's ``updated_at``, written by the same process), measured at 1.2-1.3 s at
load 4-6. Nothing it does after that write may be a retry of log or event delivery; `submit --wait` returns only
once it has exited, without giving up on it. The bound is what the code guarantees, not the 5 s target: after that
write the flow's final state goes to the API and the log and event flush is cut off at FLUSH_TIMEOUT_S (5 s), so
15 s holds on any machine, and the regression it guards against (60-78 s) fails it.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

COORDINATOR_EXIT_BOUND_S = 15.0
EXIT_LINE = re.compile(r"^slurmctl coordinator exit: job (?P<job>\S+) pid (?P<pid>\d+) at (?P<at>\S+)$")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie has exited: it only waits to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def assert_ended_with_its_coordinator(result: subprocess.CompletedProcess, returned: float, home: Path,
                                      store: Path, job_id: str) -> None:
    """``submit --wait`` (``result``, which returned at ``returned``, a time.time()) ended a completed job whose
    coordinator had exited, soon after its last state write, with every log and event delivered. ``home``: the
    SLURMCTL_HOME of the job; ``store``: its local store's root."""
    coordinator_log = (home / "logs" / f"{job_id}.log").read_text()
    assert result.returncode == 0, result.stderr + coordinator_log[-5000:]
    job = json.loads((store / "jobs" / job_id / "job.json").read_text())
    assert job["status"] == "completed"
    finished_at = datetime.fromisoformat(job["finished_at"]).timestamp()  # UTC, ms precision
    # The coordinator had exited when `submit --wait` returned: it waited for it, and did not give up on it.
    assert not pid_alive(job["coordinator_pid"]), "submit --wait returned while the coordinator was still running"
    assert returned > finished_at
    assert "not waiting for it" not in result.stderr, result.stderr[-2000:]
    # Every log and event reached the server: nothing was left retrying, nothing given up.
    for retrying in ("Error logging to API", "All connection attempts failed", "did not take the last logs"):
        assert retrying not in coordinator_log, coordinator_log[-3000:]
    # The coordinator's last line is its exit, soon after its last write of the job manifest (its own clock).
    last = coordinator_log.rstrip("\n").rsplit("\n", 1)[-1]
    exit_line = EXIT_LINE.match(last)
    assert exit_line, f"the coordinator's log does not end with its exit line:\n{coordinator_log[-3000:]}"
    assert (exit_line["job"], int(exit_line["pid"])) == (job_id, job["coordinator_pid"])
    exited = datetime.fromisoformat(exit_line["at"]).timestamp()
    last_write = datetime.fromisoformat(job["updated_at"]).timestamp()
    assert finished_at <= last_write <= exited, (job["finished_at"], job["updated_at"], exit_line["at"])
    assert exited - last_write < COORDINATOR_EXIT_BOUND_S, (
        f"the coordinator exited {exited - last_write:.1f} s after its last state write\n{coordinator_log[-3000:]}")
