"""The local Prefect server of the embedded default: started on first use, reused by the next job, served with its UI,
stopped by `slurmctl server stop` — all through the real `slurmctl` command, with no PREFECT_API_URL set. The
one-record jobs that start and reuse it are also where a job's processes are seen to end with it
(``support.processes``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from support.jobs import ROOT, TESTS, job_manifest, run_cli, wait_for, write_config, write_jsonl
from support.prefect_runs import flow_run_state
from support.processes import assert_ended_with_its_coordinator, pid_alive
from support.servers import free_port

# Mostly waiting on Prefect servers starting and stopping: run beside the rest (scripts/test.sh)
pytestmark = [pytest.mark.integration, pytest.mark.waits]

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, str]:
    with _no_proxy.open(url, timeout=10) as resp:
        return resp.status, resp.read().decode(errors="replace")


def servers_of(home: Path) -> list[int]:
    """The live ``prefect server start`` processes whose PREFECT_HOME is ``home``'s (found in /proc)."""
    found = []
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"server" in cmdline and b"start" in cmdline and pid_alive(pid)
                and f"PREFECT_HOME={home / 'prefect'}".encode() in environ):
            found.append(pid)
    return found


def server_record(home: Path) -> dict[str, Any] | None:
    path = home / "server.json"
    return json.loads(path.read_text()) if path.exists() else None


def server_status() -> tuple[int, dict[str, Any]]:
    result = run_cli("server", "status", "--json")
    return result.returncode, json.loads(result.stdout)


def task_runs_in(api_url: str) -> list[Any]:
    """Every task run the server at ``api_url`` recorded (this test's server holds only this test's jobs)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(limit=200)

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


@pytest.fixture
def no_prefect_api(slurmctl_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The embedded default as a new user gets it: no PREFECT_API_URL, a fresh SLURMCTL_HOME. Whatever server the
    test leaves recorded there is stopped afterwards, whatever happened (no server outlives the test)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    try:
        yield slurmctl_home
    finally:
        run_cli("server", "stop", timeout=120)
        # A server the record does not name (code that started a second one) is killed too.
        for pid in servers_of(slurmctl_home):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def port_4200_taken() -> Iterator[None]:
    """Port 4200 (the server's first choice) is busy, as it may be on a CI machine: hold it if nobody does."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 4200))
        sock.listen()
    except OSError:
        pass  # somebody else holds it already: just as good
    try:
        yield
    finally:
        sock.close()


def one_record_job(tmp_path: Path, job_id: str) -> Path:
    write_jsonl(tmp_path / f"{job_id}.jsonl", [{"id": 1, "name": "u1"}])
    return write_config(tmp_path / f"{job_id}.yaml", job_id=job_id, handler="slurmctl.handlers.echo:handle",
                        input={"uri": f"{job_id}.jsonl"}, cluster={"kind": "local", "n_workers": 1},
                        storage={"uri": "state"})


def test_local_server_starts_on_first_use_outlives_the_job_and_is_reused(
        tmp_path: Path, no_prefect_api: Path, port_4200_taken: None):
    home = no_prefect_api
    assert server_record(home) is None

    # First use: `submit` starts the server (4200 is taken, so another port) and the job reports to it. The job's
    # processes end when it does (support/processes.py): the coordinator, not the server.
    first = run_cli("submit", str(one_record_job(tmp_path, "first")), "--wait")
    assert_ended_with_its_coordinator(first, time.time(), home, tmp_path / "state", "first")
    record = server_record(home)
    assert record is not None, first.stderr
    port, api = record["port"], record["api_url"]
    assert port != 4200 and api == f"http://127.0.0.1:{port}/api"
    assert (home / "prefect" / "prefect.db").exists() and (home / "logs" / "prefect-server.log").exists()
    run_1 = job_manifest(tmp_path / "state", "first")["flow_run_id"]
    assert f"Prefect UI: http://127.0.0.1:{port}/runs/flow-run/{run_1}" in first.stderr
    # The job is over, its coordinator gone, and the server still answers, with the job's runs recorded.
    code, view = server_status()
    assert code == 0 and view["running"] and view["healthy"] and view["pid"] == record["pid"], view
    assert view["url"] == api and view["ui_url"] == f"http://127.0.0.1:{port}"
    assert not pid_alive(job_manifest(tmp_path / "state", "first")["coordinator_pid"])
    assert flow_run_state(api, run_1) == "COMPLETED"
    # The Dask worker reported its task run to the same server (workers inherit the coordinator's PREFECT_API_URL).
    assert any(r.state.is_completed() for r in task_runs_in(api)), "no completed task run in the local server"

    # A second job reuses the very same server process; both flow runs are there.
    second = run_cli("submit", str(one_record_job(tmp_path, "second")), "--wait")
    assert_ended_with_its_coordinator(second, time.time(), home, tmp_path / "state", "second")
    assert "starting the local Prefect server" not in second.stderr
    assert server_record(home)["pid"] == record["pid"] and servers_of(home) == [record["pid"]]
    run_2 = job_manifest(tmp_path / "state", "second")["flow_run_id"]
    assert run_2 != run_1
    assert (flow_run_state(api, run_1), flow_run_state(api, run_2)) == ("COMPLETED", "COMPLETED")

    # It is a full server: the UI is served, and it calls this server's API (not port 4200).
    status, page = get(f"http://127.0.0.1:{port}/")
    assert status == 200 and "<html" in page.lower()
    assert json.loads(get(f"http://127.0.0.1:{port}/ui-settings")[1])["api_url"] == api

    # `slurmctl server stop` stops it: the process is gone, and status says so.
    stopped = run_cli("server", "stop")
    assert stopped.returncode == 0 and f"pid {record['pid']}" in stopped.stderr, stopped.stderr
    assert not pid_alive(record["pid"]) and servers_of(home) == []
    assert server_record(home) is None
    code, view = server_status()
    assert code == 1 and not view["running"] and not view["healthy"] and view["url"] is None


def test_server_start_on_a_port_is_idempotent_and_concurrent_starts_start_one(no_prefect_api: Path):
    home = no_prefect_api
    port = free_port()
    # Two at once: the lock makes one start it and the other find it.
    procs = [subprocess.Popen([sys.executable, "-m", "slurmctl.cli", "server", "start", "--port", str(port)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(TESTS)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == [f"http://127.0.0.1:{port}/api"] * 2
    assert sorted("started" in o[1] and "already running" not in o[1] for o in outs) == [False, True], outs
    record = server_record(home)
    assert servers_of(home) == [record["pid"]]

    again = run_cli("server", "start")
    assert again.returncode == 0 and again.stdout.strip() == record["api_url"] and "already running" in again.stderr
    other = run_cli("server", "start", "--port", str(free_port()))
    assert other.returncode == 1 and f"already runs on port {port}" in other.stderr, other.stderr
    assert server_record(home)["pid"] == record["pid"]

    assert run_cli("server", "stop").returncode == 0
    wait_for(lambda: not pid_alive(record["pid"]), 5, "the stopped server's process to be gone")
    assert "no local Prefect server is running" in run_cli("server", "stop").stderr


