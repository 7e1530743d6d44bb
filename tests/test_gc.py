"""`slurmctl gc`: a completed job's intermediate objects go; everything its readers need stays (one real job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.jobs import cli_status, log_tail, run_cli, status, write_config, write_jsonl

import slurmctl
from slurmctl.books.store import load_job, save_job
from slurmctl.storage import open_store

pytestmark = pytest.mark.integration

N = 40


def objects_under(root: Path) -> dict[str, int]:
    """Files per top folder of a job (``outputs``, ``tasks``, ...; a file at the top counts as itself)."""
    found: dict[str, int] = {}
    for p in root.rglob("*"):
        if p.is_file():
            top = p.relative_to(root).parts[0]
            found[top] = found.get(top, 0) + 1
    return found


def test_gc_removes_a_completed_jobs_intermediates_and_its_books_still_read_the_same(tmp_path, prefect_api,
                                                                                       slurmctl_home):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "name": f"u{i}"} for i in range(N)] + ["{torn"])
    cfg = write_config(tmp_path / "job.yaml", job_id="collectable", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "in.jsonl"}, batch_size=10, cluster={"kind": "local", "n_workers": 1},
                       storage={"uri": "file://./state"})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "collectable")
    root = tmp_path / "state" / "jobs" / "collectable"
    before = objects_under(root)
    assert {"outputs", "commits", "cache", "rejects", "runs"} <= set(before), before  # what a run leaves behind
    views = {"status": status("collectable"), "scan": cli_status("collectable", "--scan"),
             "errors": slurmctl.job("collectable").errors(), "output": slurmctl.job("collectable").to_pandas()}

    dry = run_cli("gc", "collectable", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    [plan] = json.loads(dry.stdout)
    assert plan["removed"] is False and plan["objects"] == sum(before[f] for f in ("outputs", "commits", "cache",
                                                                                   "rejects", "runs"))
    assert plan["bytes"] > 0 and objects_under(root) == before  # a dry run removes nothing

    done = run_cli("gc", "collectable")
    assert done.returncode == 0, done.stderr
    assert f"removed {plan['objects']} objects" in done.stdout
    after = objects_under(root)
    assert not {"outputs", "commits", "cache", "rejects", "aggregate", "checkpoints", "runs"} & set(after), after
    assert {"tasks", "output", "job.json", "result.json", "plan.jsonl", "rejects.jsonl", "gc.json"} <= set(after)
    # Every reader sees the same books: status (and its scan of the task manifests), the errors, the output.
    assert status("collectable") == views["status"]
    assert cli_status("collectable", "--scan") == views["scan"]
    assert slurmctl.job("collectable").errors() == views["errors"]
    assert slurmctl.job("collectable").to_pandas().equals(views["output"])
    # Its output cannot be rebuilt now: resume says it is final, aggregate refuses; neither changes the job.
    resumed = run_cli("resume", "collectable")
    assert resumed.returncode == 0 and "its output is final" in resumed.stdout, resumed.stderr
    again = run_cli("aggregate", "collectable")
    assert again.returncode == 2 and "cannot be aggregated again" in again.stderr
    assert status("collectable")["status"] == "completed" and objects_under(root) == after


def test_gc_refuses_a_job_that_is_not_completed_and_older_than_skips_recent_ones(tmp_path, slurmctl_home):
    from test_api import completed_job

    from slurmctl.config import StorageConfig

    storage = StorageConfig(uri=f"file://{tmp_path}/state")
    completed_job(storage, "recent")
    completed_job(storage, "live")
    store = open_store(storage.uri)
    job = load_job(store, "live")
    job.status = "running"
    save_job(store, job)
    store.put_bytes("jobs/live/outputs/batch-000000.a1.parquet", b"rows")

    refused = run_cli("gc", "live", "--storage", storage.uri)
    assert refused.returncode == 1 and "job live is running: only a completed job's" in refused.stderr
    assert store.exists("jobs/live/outputs/batch-000000.a1.parquet")
    none = run_cli("gc", "--older-than", "1", "--storage", storage.uri)  # "recent" finished just now
    assert none.returncode == 0 and "no completed job finished more than 1 days ago" in none.stdout, none.stderr
    assert run_cli("gc", "--storage", storage.uri).returncode == 2  # neither jobs nor --older-than: nothing chosen
