"""A job's coordinator leaves a spare for the next job (slurmctl.control.spare): it takes the next `submit` started with
the same environment, runs it like any coordinator, and `slurmctl server stop` ends one nobody took."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from support.jobs import assert_exactly_once, log_tail, run_cli, status, wait_for, write_config, write_jsonl

TOOK_THE_JOB = "imports done before the job came"  # the spare's first line in the job's log


def spares_ready(home: Path) -> list[int]:
    """The pids of the spares waiting for a job."""
    return [int(p.name.split(".")[1]) for p in (home / "spares").glob("*.ready")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def test_the_next_job_is_taken_by_a_spare_coordinator_and_server_stop_ends_one_left(
        tmp_path: Path, prefect_api: str, slurmctl_home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLURMCTL_SPARE_COORDINATOR", "1")
    write_jsonl(tmp_path / "users.jsonl", [{"id": i} for i in range(30)])
    cfg = write_config(tmp_path / "job.yaml", handler="slurmctl.handlers.echo:handle", input={"uri": "users.jsonl"},
                       batch_size=10, cluster={"kind": "local", "n_workers": 1}, storage={"uri": "file://./state"})

    def submit(job_id: str) -> str:
        result = run_cli("submit", str(cfg), "--wait", "--job-id", job_id)
        assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, job_id)
        assert_exactly_once(status(job_id), range(30))
        return (slurmctl_home / "logs" / f"{job_id}.log").read_text()

    assert TOOK_THE_JOB not in submit("first")  # no spare yet: a coordinator started from nothing
    first_spare = wait_for(lambda: spares_ready(slurmctl_home), 180, "the first job's spare to finish its imports")
    log = submit("second")
    assert TOOK_THE_JOB in log and f"spare pid {first_spare[0]}" in log
    assert not alive(first_spare[0])  # a coordinator runs one job

    # Another environment (a handler may read any variable): a spare made for this one does not take the job
    second_spare = wait_for(lambda: spares_ready(slurmctl_home), 180, "the second job's spare")
    shown = run_cli("server", "status", "--json")
    assert json.loads(shown.stdout)["spare_coordinators"] == second_spare, shown.stderr
    monkeypatch.setenv("SLURMCTL_TEST_HANDLER_SETTING", "other")
    assert TOOK_THE_JOB not in submit("third")
    assert second_spare[0] in spares_ready(slurmctl_home) and alive(second_spare[0])

    # one spare per environment: the third job's, which may still be importing, and the second's
    spares = wait_for(lambda: ready if len(ready := spares_ready(slurmctl_home)) == 2 else None, 180,
                      "the third job's spare")
    third_spare = next(pid for pid in spares if pid not in second_spare)
    os.kill(third_spare, signal.SIGTERM)  # an idle spare holds no job: a signal ends it, and it is no longer listed
    wait_for(lambda: not alive(third_spare) and spares_ready(slurmctl_home) == second_spare, 30,
             "the signalled spare to go")

    assert run_cli("server", "stop").returncode == 0
    wait_for(lambda: not any(alive(pid) for pid in spares), 30, "the spares to be stopped")
    assert spares_ready(slurmctl_home) == []


def test_a_spare_hands_over_once_and_leaves_when_idle_or_unlisted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The protocol alone (threads stand in for the spare): a claim gets the spare's pid and the spare the job; a
    second claim finds nothing; an unclaimed spare leaves after its idle time, or once it is no longer listed."""
    import socket
    import threading

    from slurmctl.control import spare

    monkeypatch.setenv("SLURMCTL_HOME", str(tmp_path))
    monkeypatch.setattr(spare, "CHECK_EVERY_S", 0.05)
    fp = spare.fingerprint({"A": "1"}, str(tmp_path), True)
    assert fp != spare.fingerprint({"A": "2"}, str(tmp_path), True) != spare.fingerprint({"A": "1"}, "/", True)

    def waiting(idle_s: float) -> tuple[threading.Thread, list]:
        monkeypatch.setenv("SLURMCTL_SPARE_IDLE_S", str(idle_s))
        spare.spares_dir().mkdir(parents=True, exist_ok=True)
        (spare.spares_dir() / f"{fp}.{os.getpid()}.starting").touch()  # as start_spare leaves it
        got: list = []
        thread = threading.Thread(target=lambda: got.append(spare.serve(fp)))
        thread.start()
        wait_for(lambda: spare.available(fp) or not thread.is_alive(), 10, "the spare to listen")
        return thread, got

    thread, got = waiting(30)
    adopted = spare.claim(fp, {"job_id": "j1"})
    thread.join(10)
    assert adopted is not None and adopted.pid == os.getpid() and got == [{"job_id": "j1"}]
    assert spare.claim(fp, {"job_id": "j2"}) is None and not spare.available(fp)

    thread, got = waiting(30)  # a command that gave up before the spare answered never says go: not its job
    marker = next(spare.spares_dir().glob("*.ready"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(marker.read_text())
        conn.sendall(json.dumps({"job_id": "j3"}).encode() + b"\n")
        assert conn.makefile("rb").readline().startswith(b"ok ")
    thread.join(10)
    assert got == [None]

    thread, got = waiting(0.3)  # nobody comes
    thread.join(10)
    assert got == [None] and not spare.available(fp)

    thread, got = waiting(30)
    for marker in spare.spares_dir().glob("*.ready"):  # what stop_all does before it kills the process
        marker.unlink()
    thread.join(10)
    assert got == [None] and not thread.is_alive()
