"""`slurmctl list`: the jobs in a store, newest first, with status and progress, from their manifests alone."""

from __future__ import annotations

import json

import pytest
from support.jobs import run_cli

from slurmctl.books.manifests import Keys
from slurmctl.books.store import new_job_manifest
from slurmctl.config import StorageConfig, parse_config
from slurmctl.storage import open_store


def add_job(uri: str, job_id: str, submitted_at: str, status: str = "completed", done: int = 4, **where) -> None:
    cfg = parse_config({"job_id": job_id, "handler": "slurmctl.handlers.echo:handle", "input": {"uri": "in.jsonl"},
                        "storage": {"uri": uri, **where}})
    job = new_job_manifest(cfg, None)
    job.status, job.submitted_at = status, submitted_at
    job.counts.batches_total, job.counts.batches_done, job.counts.items_succeeded = 4, done, 10 * done
    open_store(uri, **where).put_json(Keys(job_id).job, job.model_dump(mode="json"))


def listed(*args: str) -> list[dict]:
    result = run_cli("list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_list_shows_a_stores_jobs_newest_first_and_an_unreadable_one_with_its_error(tmp_path, slurmctl_home):
    uri = f"file://{tmp_path}/state"
    add_job(uri, "backfill-2026-11-30", "2026-11-30T01:00:00.000Z")
    add_job(uri, "backfill-2026-12-01", "2026-12-01T01:00:00.000Z", status="running", done=1)
    add_job(uri, "backfill-2026-11-29", "2026-11-29T01:00:00.000Z", status="failed", done=2)
    store = open_store(uri)
    store.put_bytes("jobs/torn/job.json", b'{"job_id": "torn"')  # a manifest cut short: listed, not hidden
    store.put_bytes("jobs/no-manifest/outputs/x.parquet", b"rows")  # no job manifest: not a job

    jobs = listed("--storage", uri)
    assert [j["job_id"] for j in jobs] == ["backfill-2026-12-01", "backfill-2026-11-30", "backfill-2026-11-29",
                                           "torn"]
    assert [j["status"] for j in jobs] == ["running", "completed", "failed", "unreadable"]
    assert (jobs[0]["batches_done"], jobs[0]["batches_total"], jobs[0]["items_succeeded"]) == (1, 4, 10)
    assert "ManifestCorrupt" in jobs[-1]["error"] and jobs[-1]["store"] == f"{uri}/jobs/torn"
    assert [j["job_id"] for j in listed("--storage", uri, "--limit", "2")] == ["backfill-2026-12-01",
                                                                               "backfill-2026-11-30"]
    shown = run_cli("list", "--storage", uri).stdout.splitlines()
    assert shown[0].split() == ["JOB", "STATUS", "PHASE", "BATCHES", "DONE", "ITEMS", "OK", "FAILED", "SUBMITTED"]
    assert shown[1].split()[:5] == ["backfill-2026-12-01", "running", "submitted", "1/4", "25"]


@pytest.mark.integration
def test_list_without_a_store_lists_every_store_this_machine_submitted_to(tmp_path, slurmctl_home, moto_endpoint,
                                                                         s3_bucket):
    from slurmctl.control.launch import remember

    local, s3 = f"file://{tmp_path}/state", f"s3://{s3_bucket}/team"
    add_job(local, "here", "2026-12-01T00:00:00.000Z")
    add_job(s3, "there", "2026-12-02T00:00:00.000Z", endpoint_url=moto_endpoint, region="us-east-1")
    remember("here", StorageConfig(uri=local))
    remember("there", StorageConfig(uri=s3, endpoint_url=moto_endpoint, region="us-east-1"))

    jobs = listed()
    assert [(j["job_id"], j["store"]) for j in jobs] == [("there", f"{s3}/jobs/there"), ("here", f"{local}/jobs/here")]
    table = run_cli("list").stdout
    assert "STORE" in table.splitlines()[0] and f"{s3}/jobs/there" in table
