"""Exactly once under failure, end to end: resume after the coordinator is SIGKILLed, a worker SIGKILLed mid-batch,
re-submits that never call the handler twice, and retry rounds by error class. Real Prefect server, real processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import run_cli, write_config, write_jsonl
from support.sample_handlers import calls

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def job_manifest(store: Path, job_id: str) -> dict:
    return json.loads((store / "jobs" / job_id / "job.json").read_text())


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def output_ids(view: dict) -> list:
    return pq.read_table(view["output"][len("file://"):]).column("id").to_pylist()


def status(job_id: str) -> dict:
    result = run_cli("status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def make_job(tmp_path: Path, job_id: str, n: int, batch_size: int, **params) -> Path:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    return write_config(tmp_path / "job.yaml", job_id=job_id, handler="support.sample_handlers:counting",
                        input={"uri": "in.jsonl"}, batch_size=batch_size, storage={"uri": "state"},
                        max_in_flight=4, batch_retries=0,
                        params={"calls_file": str(tmp_path / "calls"), **params},
                        errors={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "retry_cooldown_s": 0.5})


def log_tail(home: Path, job_id: str) -> str:
    path = home / "logs" / f"{job_id}.log"
    return path.read_text()[-6000:] if path.exists() else ""


def test_resume_and_resubmit_never_call_the_handler_for_committed_batches(tmp_path, prefect_api, slurmctl_home):
    cfg = make_job(tmp_path, "no-rerun", 200, 20)
    assert run_cli("submit", str(cfg), "--wait").returncode == 0, log_tail(slurmctl_home, "no-rerun")
    assert len(calls(str(tmp_path / "calls"))) == 200
    # Resume a completed job, forcing it through every phase again: every batch is committed, so nothing runs.
    result = run_cli("resume", "no-rerun", "--force", "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "no-rerun")
    assert len(calls(str(tmp_path / "calls"))) == 200
    assert sorted(output_ids(status("no-rerun"))) == list(range(200))
    # The batch results are persisted in the job's manifest store (Prefect result storage / cache records).
    assert len(list((tmp_path / "state/jobs/no-rerun/cache").iterdir())) == 10


def test_coordinator_sigkill_then_resume_finishes_exactly_once(tmp_path, prefect_api, slurmctl_home):
    n, batch_size, max_in_flight = 400, 10, 4
    cfg = make_job(tmp_path, "kill-coord", n, batch_size, sleep_s=0.02)
    assert run_cli("submit", str(cfg)).returncode == 0
    store = tmp_path / "state"
    job = wait_for(lambda: (j := job_manifest(store, "kill-coord"))["counts"]["batches_done"] >= 8 and j, 240,
                   "8 committed batches")
    os.kill(job["coordinator_pid"], signal.SIGKILL)
    committed_at_kill = len(list((store / "jobs/kill-coord/tasks").glob("batch-*.json")))

    result = run_cli("resume", "kill-coord", "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "kill-coord")
    view = status("kill-coord")
    assert view["status"] == "completed" and view["items_succeeded"] == n
    ids = output_ids(view)
    assert sorted(ids) == list(range(n)) and len(ids) == len(set(ids))  # every item exactly once
    handler_calls = len(calls(str(tmp_path / "calls")))
    assert n <= handler_calls <= n + max_in_flight * batch_size, (handler_calls, committed_at_kill)


def test_worker_sigkill_mid_batch_reruns_the_batch_without_spending_retries(tmp_path, prefect_api, slurmctl_home):
    n = 200
    cfg = make_job(tmp_path, "kill-worker", n, 20, sleep_s=0.05)  # batch_retries: 0 — a counted retry would fail
    assert run_cli("submit", str(cfg)).returncode == 0
    calls_file = str(tmp_path / "calls")
    victim = wait_for(lambda: len(c := calls(calls_file)) >= 30 and c[-1][0], 240, "a worker mid-batch")
    os.kill(victim, signal.SIGKILL)

    view = wait_for(lambda: (v := status("kill-worker"))["status"] in ("completed", "failed") and v, 300,
                    "the job to end")
    assert view["status"] == "completed", view["error"] + log_tail(slurmctl_home, "kill-worker")
    ids = output_ids(view)
    assert sorted(ids) == list(range(n)) and len(ids) == len(set(ids))
    tasks = [json.loads(p.read_text()) for p in (tmp_path / "state/jobs/kill-worker/tasks").glob("batch-*.json")]
    assert len(tasks) == 10 and victim in {pid for pid, _ in calls(calls_file)}


def test_retry_by_error_class_and_analyze_errors(tmp_path, prefect_api, slurmctl_home):
    fail_file = tmp_path / "fail.json"
    fail_file.write_text(json.dumps({"3": "network", "14": "network", "27": "not_found", "33": "server"}))
    cfg = make_job(tmp_path, "retry-cls", 60, 10, fail_file=str(fail_file))
    assert run_cli("submit", str(cfg), "--wait").returncode == 0, log_tail(slurmctl_home, "retry-cls")
    view = status("retry-cls")
    assert (view["items_succeeded"], view["items_failed"]) == (56, 4)

    report = json.loads(run_cli("analyze-errors", "retry-cls", "--json").stdout)
    assert report["classes"] == {"network": 2, "not_found": 1, "server": 1}
    assert {m["error_class"]: m["count"] for m in report["top_messages"]}["network"] == 2
    assert sorted(sum((m["example_ids"] for m in report["top_messages"]), [])) == [3, 14, 27, 33]
    human = run_cli("analyze-errors", "retry-cls")
    assert "retry them with: slurmctl retry retry-cls --errors=" in human.stdout

    fail_file.write_text(json.dumps({"27": "not_found"}))  # the API recovered; 27 really does not exist
    before = len(calls(str(tmp_path / "calls")))
    result = run_cli("retry", "retry-cls", "--errors=network,server", "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "retry-cls")
    assert len(calls(str(tmp_path / "calls"))) - before == 3  # only the 3 items of those classes ran again
    view = status("retry-cls")
    assert (view["items_succeeded"], view["items_failed"], view["status"]) == (59, 1, "completed")
    ids = output_ids(view)
    assert sorted(ids) == [i for i in range(60) if i != 27] and len(ids) == len(set(ids))
    failures = [json.loads(line) for line in (tmp_path / "state/jobs/retry-cls/failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["error_class"]) for f in failures] == [(27, "not_found")]
    job = job_manifest(tmp_path / "state", "retry-cls")
    assert [(r["round"], r["classes"], r["items"]) for r in job["retry_rounds"]] == [(1, ["network", "server"], 3)]
