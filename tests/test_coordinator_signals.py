"""A coordinator told to stop by a signal (SIGTERM from Slurm or an admin, Ctrl-C, a closed session) stops cleanly:
the batch running commits, nothing new starts, the job says ``stopped`` with how to continue it, its flow run ends
Cancelled (not Crashed, not left Running), and ``slurmctl resume`` finishes it with every item exactly once. A second
signal exits at once and the books stay consistent."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from support.jobs import (
    assert_exactly_once,
    committed_tasks,
    held_job,
    job_manifest,
    log_tail,
    run_cli,
    status,
    wait_for,
)
from support.prefect_runs import job_flow_run_states, job_task_run_states
from support.processes import pid_alive
from support.sample_handlers import calls

from slurmctl.flows import stop

# What the coordinator logs once it acted on the first signal: no shard submitted, the workers told to start no batch.
STOPPING = "stop signal: no new batch starts"


def test_the_first_signal_is_a_stop_request_and_the_second_ends_the_run(monkeypatch):
    monkeypatch.setenv("SLURMCTL_STOP_GRACE_S", "7")
    heard, last = [], []
    before = signal.getsignal(signal.SIGINT)
    with stop.on_signals():
        undo = stop.listen(heard.append, last.append)
        with stop.on_signals():  # a phase inside the job flow: nested scopes
            os.kill(os.getpid(), signal.SIGTERM)
            request = stop.requested()
            assert request is not None and request.signal == "SIGTERM" and heard == [request]
            assert 6 < request.deadline - time.monotonic() <= 7 and request.reason == "stopped by SIGTERM"
            with pytest.raises(KeyboardInterrupt):  # not the coordinator process: a second signal interrupts
                os.kill(os.getpid(), signal.SIGINT)
            assert last == [request]
        undo()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers ours replaced are back
    with stop.on_signals():  # the next run starts with no stop requested
        assert stop.requested() is None  # what the coordinator says (its log) when the first signal lands


def test_a_signal_while_the_coordinator_starts_is_kept_and_becomes_its_stop_request():
    before = {name: signal.getsignal(getattr(signal, name)) for name in stop.SIGNALS}
    try:
        stop.hold()
        os.kill(os.getpid(), signal.SIGTERM)  # during the coordinator's imports: kept, not fatal
        assert stop.requested() is None
        with stop.on_signals():  # the first scope (the job flow's start) takes it as the stop request
            assert stop.requested() is not None and stop.requested().signal == "SIGTERM"
        with stop.on_signals():  # once only
            assert stop.requested() is None
    finally:
        for name, handler in before.items():
            signal.signal(getattr(signal, name), handler)


def catches(pid: int, signum: int) -> bool:
    """Has the process installed a handler for ``signum``? (``SigCgt`` in /proc)"""
    status_text = open(f"/proc/{pid}/status").read()
    mask = int(next(line.split()[1] for line in status_text.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (signum - 1)))


def test_a_coordinator_signalled_during_its_imports_is_not_killed_by_it(tmp_path):
    import subprocess
    import sys

    # --standby: it imports everything, then waits for `go`; the closed stdin (a refused submit) ends it there.
    proc = subprocess.Popen([sys.executable, "-m", "slurmctl.cli.coordinator", "no-such-job", "--standby",
                             "--storage-json", f'{{"uri": "file://{tmp_path}/state"}}'], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: catches(proc.pid, signal.SIGTERM), 30, "the coordinator to hold signals", interval=0.01)
        os.kill(proc.pid, signal.SIGTERM)  # Prefect, Dask and pyarrow are still being imported
        _, err = proc.communicate("", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "SIGTERM while starting" in err, (proc.returncode, err[-2000:])


def test_a_stop_that_overruns_its_bound_is_recorded_and_the_coordinator_exits(tmp_path):
    """The coordinator's stop waits on Prefect's API (the flow run's state, the last logs): with the API gone it would
    sit in the client's retries for minutes. After the grace plus ``CLOSE_S`` it records the stop and exits."""
    import subprocess
    import sys
    import textwrap

    words = tmp_path / "last-words"
    script = textwrap.dedent(f"""
        import os, signal, time
        from slurmctl.flows import stop
        stop.exit_on_second, stop.CLOSE_S = True, 0.5
        stop.listen(lambda request: None, lambda request: open({str(words)!r}, "w").write(request.how))
        with stop.on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the flow's close, stuck on an unreachable API
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "SLURMCTL_STOP_GRACE_S": "1"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 30, done.stderr
    assert "still stopping 1.5 s after SIGTERM" in done.stderr and words.read_text() == "1.5 s later, its stop " \
        "unfinished"


def held_and_signalled(tmp_path, job_id: str, home) -> tuple[int, object]:
    """Submit a held job (item 25, in its third batch, waits for ``release``) and SIGTERM its coordinator once the
    batch holds; return the coordinator's pid and the release file, once it has stopped starting batches."""
    cfg, marker, release = held_job(tmp_path, job_id, 60)
    assert run_cli("submit", str(cfg)).returncode == 0
    wait_for(marker.exists, 240, "the job to hold in its third batch")
    pid = job_manifest(tmp_path / "state", job_id)["coordinator_pid"]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: STOPPING in log_tail(home, job_id), 60, "the coordinator to stop starting batches")
    return pid, release


def test_sigterm_lets_the_running_batch_commit_then_the_job_is_stopped_and_resume_finishes_it(
        tmp_path, prefect_api, slurmctl_home):
    pid, release = held_and_signalled(tmp_path, "stop-term", slurmctl_home)
    try:
        # Within its grace the coordinator waits for the batch running; it neither exits nor starts another.
        assert pid_alive(pid) and status("stop-term")["status"] == "running"
    finally:
        release.touch()
    wait_for(lambda: not pid_alive(pid), 90, "the coordinator to exit by itself")
    view = status("stop-term")
    assert view["status"] == "stopped", log_tail(slurmctl_home, "stop-term")
    assert "stopped by SIGTERM" in view["error"] and "slurmctl resume stop-term" in view["error"]
    # The batch that was running committed within the grace; nothing after it started.
    assert set(committed_tasks(tmp_path / "state", "stop-term")) == {"batch-000000", "batch-000001", "batch-000002"}
    assert max(i for _, i in calls(str(tmp_path / "calls"))) < 30
    states = job_flow_run_states(prefect_api, view["flow_run_id"])
    assert states["stop-term"] == "CANCELLED" and states["stop-term / process"] == "CANCELLED", states
    # The shard that stopped after its batch ended Cancelled, like its pass: not Failed, not left Running.
    shard_states = job_task_run_states(prefect_api, view["flow_run_id"])
    assert "CANCELLED" in shard_states and not {"FAILED", "RUNNING", "PENDING"} & set(shard_states), shard_states

    assert run_cli("resume", "stop-term", "--wait").returncode == 0, log_tail(slurmctl_home, "stop-term")
    view = status("stop-term")
    assert view["status"] == "completed" and view["batches_done"] == 6
    assert_exactly_once(view, range(60))
    assert not any(i < 30 for _, i in calls(str(tmp_path / "calls"))[30:])  # committed batches never ran again


def test_a_second_signal_exits_at_once_with_its_workers_and_consistent_books(tmp_path, prefect_api, slurmctl_home):
    pid, release = held_and_signalled(tmp_path, "stop-twice", slurmctl_home)
    worker = int((tmp_path / "held").read_text())  # the worker process holding batch 2
    # Frozen, the worker cannot notice by itself that its coordinator is gone (Dask's watch on its nanny's pipe): only
    # the coordinator's kill ends it. Left alive, it would commit the held batch once released, after the `stopped`.
    os.kill(worker, signal.SIGSTOP)
    os.kill(pid, signal.SIGINT)  # the held batch never finishes: only the second signal ends the coordinator
    try:
        wait_for(lambda: not pid_alive(pid), 30, "the coordinator to exit on the second signal")
        assert not pid_alive(worker), "the coordinator exited and left its local worker behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        release.touch()
    view = status("stop-twice")
    assert view["status"] == "stopped" and "exited at once on a second signal" in view["error"], view
    assert set(committed_tasks(tmp_path / "state", "stop-twice")) == {"batch-000000", "batch-000001"}
    assert run_cli("resume", "stop-twice", "--wait").returncode == 0, log_tail(slurmctl_home, "stop-twice")
    view = status("stop-twice")
    assert view["status"] == "completed"
    assert_exactly_once(view, range(60))
