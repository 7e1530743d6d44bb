"""The coordinator's heartbeat beats in every phase, so a healthy job is never shown stale and `resume` never starts
a second coordinator — even while the job sleeps through a retry cooldown with no batch running."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support.jobs import run_cli, wait_for, write_config, write_jsonl

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.heartbeat import Heartbeat, read_heartbeat
from slurmctl.books.manifests import Keys, parse_time
from slurmctl.books.status import status_view
from slurmctl.books.store import new_job_manifest
from slurmctl.config import parse_config
from slurmctl.control.liveness import coordinator_alive

# Mostly waiting on a job's retry cooldown: run beside the rest (scripts/test.sh)
pytestmark = pytest.mark.waits


def ago(seconds: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


# --- staleness ------------------------------------------------------------------------------------------------
def job_body(status: str = "running", updated_ago: float = 600) -> dict:
    return {"job_id": "j", "status": status, "phase": "retry", "counts": {}, "updated_at": ago(updated_ago)}


def test_a_job_is_stale_only_when_neither_its_manifest_nor_its_heartbeat_is_fresh():
    assert status_view(job_body())["stale"] is True  # manifest untouched for 10 min, no heartbeat
    beat = {"at": ago(1)}
    view = status_view(job_body(), None, beat)
    assert view["stale"] is False and view["heartbeat_at"] == beat["at"]  # a cooldown: only the heartbeat moves
    assert status_view(job_body(), None, {"at": ago(600)})["stale"] is True  # both old: the coordinator died
    assert status_view(job_body(updated_ago=1), None, {"at": ago(600)})["stale"] is False  # the newer one counts
    assert status_view(job_body(status="completed"), None, {"at": ago(600)})["stale"] is False
    assert status_view(job_body(updated_ago=1))["heartbeat_at"] is None


# --- the heartbeat thread ---------------------------------------------------------------------------------------
class FlakyStore:
    """A real local store whose writes fail while ``failing``; remembers which thread wrote each beat."""

    def __init__(self, store: LocalManifestStore):
        self.store, self.failing, self.writers = store, False, []

    def put_json(self, key: str, body: dict, **kw: Any) -> bool:
        if self.failing:
            raise ConnectionError("store unreachable")
        self.writers.append(threading.current_thread().name)
        return self.store.put_json(key, body, **kw)


def test_the_heartbeat_beats_survives_a_failing_store_and_stops_with_a_last_beat(tmp_path, caplog):
    store = LocalManifestStore(root=str(tmp_path))
    flaky = FlakyStore(store)
    with Heartbeat(flaky, "job-1", flow_run_id="run-1", interval_s=0.05) as heartbeat:
        first = read_heartbeat(store, "job-1")  # written at once
        assert {k: first[k] for k in ("kind", "job_id", "pid", "host", "flow_run_id")} == {
            "kind": "heartbeat", "job_id": "job-1", "pid": os.getpid(), "host": socket.gethostname(),
            "flow_run_id": "run-1"}
        assert store.get_json(Keys("job-1").heartbeat)["checksum"]  # a checksummed manifest like the others
        wait_for(lambda: parse_time(read_heartbeat(store, "job-1")["at"]) > parse_time(first["at"]), 10,
                   "the heartbeat to advance")

        flaky.failing = True
        wait_for(lambda: heartbeat.failures.failures >= 5, 10, "failed beats")
        assert heartbeat.running  # a failing write never stops the heartbeat (nor the run)
        flaky.failing = False
        beats = heartbeat.beats
        wait_for(lambda: heartbeat.beats > beats, 10, "beats after the store came back")
    assert not heartbeat.running
    assert flaky.writers[-1] == threading.current_thread().name  # the last beat, written on the way out
    warnings = [r for r in caplog.records if r.name == "slurmctl.books.heartbeat" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "store unreachable" in warnings[0].message  # once per outage, not per beat


# --- is the coordinator alive? ------------------------------------------------------------------------------------
@pytest.fixture
def running_job(tmp_path: Path) -> tuple[Any, LocalManifestStore]:
    cfg = parse_config({"job_id": "alive", "handler": "slurmctl.handlers.echo:handle", "input": {"uri": "in.jsonl"},
                        "storage": {"uri": f"file://{tmp_path}"}})
    job = new_job_manifest(cfg, None)
    # Submitted elsewhere, its manifest untouched for 10 minutes (a long cooldown): only the heartbeat tells.
    job.status, job.coordinator_host, job.coordinator_pid, job.updated_at = "running", "submit-host", 1, ago(600)
    return job, LocalManifestStore(root=str(tmp_path))


def beat(store: LocalManifestStore, host: str, pid: int, seconds_ago: float = 0) -> None:
    store.put_json(Keys("alive").heartbeat, {"schema_version": 1, "kind": "heartbeat", "job_id": "alive",
                                             "at": ago(seconds_ago), "pid": pid, "host": host})


def test_coordinator_alive_reads_the_heartbeat_for_its_host_pid_and_freshness(running_job):
    job, store = running_job
    assert not coordinator_alive(job, store)  # no heartbeat, stale manifest
    beat(store, "another-node", 4242)
    assert coordinator_alive(job, store)  # another host: fresh heartbeat
    beat(store, "another-node", 4242, seconds_ago=600)
    assert not coordinator_alive(job, store)

    here = socket.gethostname()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "slurmctl.cli.coordinator", "alive"])
    try:
        beat(store, here, proc.pid, seconds_ago=600)
        assert coordinator_alive(job, store)  # this host: its pid, whatever the clocks say
    finally:
        proc.kill()
        proc.wait()
    beat(store, here, proc.pid)
    assert not coordinator_alive(job, store)  # a dead pid on this host is certain
    beat(store, here, os.getpid())  # alive but not `slurmctl.cli.coordinator alive` (a deployment run): its heartbeat
    assert coordinator_alive(job, store)
    beat(store, here, os.getpid(), seconds_ago=600)
    assert not coordinator_alive(job, store)


# --- a real job, in its retry cooldown -------------------------------------------------------------------------
@pytest.mark.integration
def test_the_heartbeat_advances_while_the_job_waits_out_its_retry_cooldown(tmp_path, prefect_api, slurmctl_home):
    n, cooldown = 10, 15
    fail_file = tmp_path / "fail.json"  # the API throttles every item until the test lets it recover
    fail_file.write_text(json.dumps({str(i): "throttle" for i in range(n)}))
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    cfg = write_config(tmp_path / "job.yaml", job_id="cooldown-beat", handler="support.sample_handlers:counting",
                       input={"uri": "in.jsonl"}, batch_size=n, storage={"uri": "state"},
                       cluster={"kind": "local", "n_workers": 1}, params={"fail_file": str(fail_file)},
                       errors={"max_attempts": 1, "retry_cooldown_s": cooldown, "auto_retry_rounds": 1,
                               "circuit_breaker": {"window": 2, "min_attempts": 2, "threshold": 0.5}})
    submitted = run_cli("submit", str(cfg))
    assert submitted.returncode == 0, submitted.stderr
    store = LocalManifestStore(root=str(tmp_path / "state"))
    log = slurmctl_home / "logs" / "cooldown-beat.log"

    def job() -> dict:
        return store.get_json(Keys("cooldown-beat").job)

    wait_for(lambda: f"retry round 1 in {cooldown} s" in (log.read_text() if log.exists() else ""), 300,
               "the coordinator to start its retry cooldown")
    assert job()["counts"]["items_deferred"] == n  # every item deferred by the breaker: no batch runs now
    first = read_heartbeat(store, "cooldown-beat")
    later = wait_for(lambda: (b := read_heartbeat(store, "cooldown-beat")) and b["at"] != first["at"] and b, 10,
                       "the heartbeat to advance during the cooldown")
    assert parse_time(later["at"]) > parse_time(first["at"])
    assert job()["retry_rounds"] == []  # still cooling down when it beat
    view = json.loads(run_cli("status", "cooldown-beat", "--json").stdout)
    assert parse_time(view["heartbeat_at"]) >= parse_time(later["at"]) and view["stale"] is False

    fail_file.write_text("{}")  # the API recovers: the retry round finishes the job
    done = wait_for(lambda: job()["status"] in ("completed", "failed") and job(), 300, "the job to end")
    assert done["status"] == "completed", done["error"]
    assert done["counts"]["items_succeeded"] == n
