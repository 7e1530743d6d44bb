"""The embedded default end to end: a real `slurmctl submit --wait` on a LocalCluster with a real Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.jobs import cli_status, log_tail, run_cli, status, write_config, write_jsonl
from support.prefect_runs import job_artifacts, job_flow_run_names, settled_task_runs

import slurmctl

pytestmark = pytest.mark.integration


def test_echo_job_end_to_end(tmp_path: Path, prefect_api: str, slurmctl_home: Path):
    records = [{"id": i, "name": f"u{i}"} for i in range(1, 1001)]
    records.insert(500, "{oops")  # line 501
    records.insert(800, {"name": "anonymous"})  # line 801
    write_jsonl(tmp_path / "users.jsonl", records)
    cfg = write_config(tmp_path / "job.yaml", job_id="echo-e2e", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "users.jsonl", "id_field": "id"}, batch_size=100,
                       cluster={"kind": "local", "n_workers": 2}, storage={"uri": "file://./state"})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "echo-e2e")

    view = status("echo-e2e")
    assert cli_status("echo-e2e") == view  # the command prints the view the tests compute in-process
    assert view["status"] == "completed" and view["phase"] == "done"
    assert view["batches_total"] == view["batches_done"] == 11 and view["batches_failed"] == 0
    assert (view["items_total"], view["items_succeeded"], view["items_failed"], view["items_rejected"]) == (
        1002, 1000, 0, 2)
    assert view["output"].startswith("file://") and view["started_at"] and view["updated_at"]

    # The output holds every good input id exactly once, with the id column preserved.
    table = pq.read_table(view["output"][len("file://"):])
    assert sorted(table.column("id").to_pylist()) == list(range(1, 1001))
    # The same output from Python, found by job id alone as `slurmctl status` finds it, its sha256 checked.
    assert sorted(slurmctl.job("echo-e2e").to_pandas()["id"]) == list(range(1, 1001))
    assert set(table.column_names) == {"id", "name"}

    store = tmp_path / "state" / "jobs" / "echo-e2e"
    rejects = [json.loads(line) for line in (store / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [(501, "invalid JSON"),
                                                                        (801, "missing id field 'id'")]
    result_manifest = json.loads((store / "result.json").read_text())
    assert result_manifest["rows"] == 1000 and result_manifest["outputs"][0]["sha256"].startswith("sha256:")

    # The same counts come from a scan of the task manifests alone.
    scanned = status("echo-e2e", "--scan")
    assert {k: scanned[k] for k in ("batches_done", "items_succeeded", "items_rejected")} == {
        "batches_done": 11, "items_succeeded": 1000, "items_rejected": 2}

    # Every task run (a shard: a run of batches) is recorded, Completed, in the Prefect database the run used; each
    # batch names the one that committed it. 11 batches on 2 worker threads: 4 waves of 2 shards.
    tasks = [json.loads(p.read_text()) for p in sorted((store / "tasks").glob("batch-*.json"))]
    assert len(tasks) == 11 and all(t["status"] == "succeeded" and t["slurm_job_id"] is None for t in tasks)
    runs = settled_task_runs(prefect_api, {t["flow_run_id"] for t in tasks}, 8)
    shard_runs = {str(r.id): r for r in runs if r.name.startswith("batch-")}
    assert len(shard_runs) == 8 and all(r.state.is_completed() for r in shard_runs.values())
    assert {t["task_run_id"] for t in tasks} == set(shard_runs)
    assert shard_runs[tasks[0]["task_run_id"]].name == "batch-000000..000001 (2)"

    # The runs are named after the job, so the UI's run list says which job each is.
    assert job_flow_run_names(prefect_api, view["flow_run_id"]) == [
        "echo-e2e", "echo-e2e / partition", "echo-e2e / process", "echo-e2e / aggregate"]

    # The job's flow run carries its progress, a status table and, at the end, a summary.
    arts = job_artifacts(prefect_api, view["flow_run_id"])
    assert arts["echo-e2e-progress"].data == 100.0
    assert "11 of 11 batches" in arts["echo-e2e-progress"].description
    assert arts["echo-e2e-progress"].description.endswith(", 1 in flight per worker")  # a sync handler's default
    status_table = arts["echo-e2e-status"].data
    assert "| status | completed |" in status_table and "| rejected | 2 |" in status_table
    assert "| in flight (per worker, peak) | 1 |" in status_table
    summary = arts["echo-e2e-summary"].data
    assert "echo-e2e: completed" in summary and view["output"] in summary and "| output rows | 1,000 |" in summary
    assert "| process |" in summary and "| aggregate |" in summary  # time per phase
    assert "echo-e2e-errors" not in arts  # nothing failed

    # Submitting the same job id again is refused; resume of a completed job is a no-op.
    again = run_cli("submit", str(cfg))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert run_cli("resume", "echo-e2e", "--wait").returncode == 0


def test_http_handler_job_counts_api_requests_and_records_failures(tmp_path: Path, prefect_api: str,
                                                                   slurmctl_home: Path, item_api):
    url, api = item_api
    write_jsonl(tmp_path / "items.jsonl", [{"id": i} for i in range(-2, 40)])  # ids -2, -1 get 404s
    cfg = write_config(tmp_path / "job.yaml", job_id="http-e2e", handler="slurmctl.handlers.http_json:handle",
                       input={"uri": "items.jsonl"}, batch_size=10, storage={"uri": "state"},
                       params={"base_url": url})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr
    view = status("http-e2e")
    assert (view["items_total"], view["items_succeeded"], view["items_failed"]) == (42, 40, 2)
    assert api.requests == 42
    [errors] = [a for k, a in job_artifacts(prefect_api, view["flow_run_id"]).items() if k == "http-e2e-errors"]
    rows = json.loads(errors.data)  # the UI's errors table: by class and message, with example ids
    assert {r["error_class"] for r in rows} == {"not_found"} and sum(r["count"] for r in rows) == 2
    assert sorted(int(i) for r in rows for i in r["example_ids"].split(", ")) == [-2, -1]

    store = tmp_path / "state" / "jobs" / "http-e2e"
    table = pq.read_table(view["output"][len("file://"):])
    assert sorted(zip(table.column("id").to_pylist(), table.column("value").to_pylist())) == [
        (i, 2 * i) for i in range(40)]
    failures = [json.loads(line) for line in (store / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == [-2, -1]
    assert all(f["error_type"] == "HTTPError" and "404" in f["message"] for f in failures)
    metrics = [json.loads(p.read_text())["metrics"] for p in (store / "tasks").glob("batch-*.json")]
    assert sum(m.get("api_requests", 0) for m in metrics) == 42  # every request, the two 404s included


def test_status_of_unknown_job_says_where_it_looked(tmp_path: Path, slurmctl_home: Path):
    result = run_cli("status", "no-such-job", "--storage", f"file://{tmp_path}")
    assert result.returncode == 2 and "no job 'no-such-job'" in result.stderr and "--storage" in result.stderr
