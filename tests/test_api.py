"""slurmctl from Python: find jobs and read their books as a notebook would (``slurmctl.api``)."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import run_cli

import slurmctl
from slurmctl.books.manifests import Keys, ResultManifest, TaskManifest, now
from slurmctl.books.store import load_job, new_job_manifest, save_job
from slurmctl.config import StorageConfig, parse_config
from slurmctl.storage import open_store, sha256_bytes


def completed_job(storage: StorageConfig, job_id: str = "nb") -> None:
    """A finished job's books, as a run leaves them: its manifest, one output file and its result manifest, and a
    committed batch whose retry manifest lists one failed and one deferred item."""
    cfg = parse_config({"job_id": job_id, "handler": "slurmctl.handlers.echo:handle", "input": {"uri": "in.jsonl"},
                        "storage": storage.model_dump()})
    store = open_store(storage.uri, endpoint_url=storage.endpoint_url, region=storage.region)
    if storage.uri.startswith("s3://"):
        store.ensure_bucket()
    keys = Keys(job_id)
    job = new_job_manifest(cfg, None)
    job.status, job.phase = "completed", "done"
    job.counts.items_total, job.counts.items_succeeded, job.counts.items_failed = 5, 3, 1
    store.put_json(keys.job, job.model_dump(mode="json"))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]}), sink)
    data = sink.getvalue().to_pybytes()
    store.put_bytes(keys.output_prefix + "data.parquet", data)
    store.put_json(keys.result, ResultManifest(
        job_id=job_id, output=store.uri(keys.output_prefix + "data.parquet"), rows=3, items_succeeded=3,
        items_failed=1, items_rejected=0, batches=1,
        outputs=[{"uri": store.uri(keys.output_prefix + "data.parquet"), "rows": 3, "bytes": len(data),
                  "sha256": sha256_bytes(data)}]).model_dump(mode="json"))
    retry = keys.root + "retry/batch-000000.a1.json"
    store.put_json(retry, {"failed": [{"id": 4, "line": 4, "error_class": "http_4xx", "message": "404 Not Found"}],
                           "deferred": [{"id": 5, "line": 5, "error_class": "throttle", "message": "429"}]})
    store.put_json(keys.task("batch-000000"), TaskManifest(
        job_id=job_id, batch_id="batch-000000", task_id="batch-000000", status="succeeded", started_at=now(),
        finished_at=now(), items=5, items_succeeded=3, items_failed=1, items_deferred=1, retry=retry,
        error_classes={"http_4xx": 1, "throttle": 1}).model_dump(mode="json"))


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_a_notebook_finds_a_job_and_reads_its_status_output_and_failures(request, tmp_path, slurmctl_home, backend):
    if backend == "local":
        storage = StorageConfig(uri=f"file://{tmp_path}/state")
    else:
        storage = StorageConfig(uri=f"s3://{request.getfixturevalue('s3_bucket')}/team",
                                endpoint_url=request.getfixturevalue("moto_endpoint"), region="us-east-1")
    completed_job(storage)

    job = slurmctl.job("nb", storage)
    cli = run_cli("status", "nb", "--json", "--storage", storage.uri, *(
        ["--endpoint-url", storage.endpoint_url, "--region", "us-east-1"] if storage.endpoint_url else []))
    import json

    assert {k: v for k, v in job.status().items() if k != "updated_ago_s"} == {
        k: v for k, v in json.loads(cli.stdout).items() if k != "updated_ago_s"}
    assert job.wait(timeout=5)["status"] == "completed"
    assert job.to_pandas().to_dict("list") == {"id": [1, 2, 3], "name": ["a", "b", "c"]}
    assert job.output().count_rows() == 3
    failures = job.failures()
    assert failures[["line", "id", "state", "error_class"]].values.tolist() == [
        [4, 4, "failed", "http_4xx"], [5, 5, "deferred", "throttle"]]
    assert job.errors()["classes"] == {"http_4xx": 1, "throttle": 1}
    assert [j["job_id"] for j in slurmctl.jobs(storage)] == ["nb"]


def test_output_is_verified_against_the_result_manifest_and_missing_jobs_say_where_they_were_looked_for(
        tmp_path, slurmctl_home):
    storage = StorageConfig(uri=f"file://{tmp_path}/state")
    completed_job(storage)
    with pytest.raises(slurmctl.JobNotFound, match=f"no job 'other' in file://{tmp_path}/state/jobs"):
        slurmctl.job("other", storage)
    path = tmp_path / "state" / "jobs" / "nb" / "output" / "data.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "name": ["a", "b", "X"]}), path)  # rewritten behind the books
    job = slurmctl.job("nb", storage.uri)
    with pytest.raises(slurmctl.ManifestCorrupt, match="data.parquet: sha256 differs"):
        job.to_pandas()
    assert job.to_pandas(verify=False)["name"].tolist() == ["a", "b", "X"]  # asked for: read as it is


def test_wait_returns_when_the_job_ends_and_times_out_while_it_runs(tmp_path, slurmctl_home):
    storage = StorageConfig(uri=f"file://{tmp_path}/state")
    completed_job(storage)
    store = open_store(storage.uri)
    job = load_job(store, "nb")
    job.status = "running"
    save_job(store, job)
    handle = slurmctl.job("nb", storage)
    with pytest.raises(TimeoutError, match="job nb is still running after 0.5 s"):
        handle.wait(timeout=0.5)

    def finish() -> None:
        time.sleep(0.5)
        job.status = "failed"
        save_job(store, job)

    threading.Thread(target=finish).start()
    assert handle.wait(timeout=60)["status"] == "failed"


def test_wait_shows_progress_when_asked(tmp_path, slurmctl_home, capsys):
    storage = StorageConfig(uri=f"file://{tmp_path}/state")
    completed_job(storage)
    job = slurmctl.job("nb", storage)
    assert job.wait(progress=False)["status"] == "completed"
    assert capsys.readouterr().err == ""  # not a terminal, not a notebook: nothing unless asked
    job.wait(progress=True)
    shown = capsys.readouterr().err
    assert "done" in shown and "batches 0/0 failed 0, items failed 1" in shown, shown  # the bar, at 80 columns


@pytest.mark.integration
def test_submit_cancel_resume_from_python_then_read_the_output(tmp_path, prefect_api, slurmctl_home, monkeypatch):
    from support.jobs import TESTS, wait_for, write_jsonl
    from support.sample_handlers import calls

    monkeypatch.chdir(tmp_path)  # an inline config's relative paths are the working directory's
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the coordinator and its workers import the test handler
    marker, release = tmp_path / "held", tmp_path / "release"
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "name": f"u{i}"} for i in range(30)])
    config = {"job_id": "from-python", "handler": "support.sample_handlers:counting", "input": {"uri": "in.jsonl"},
              "batch_size": 10, "cluster": {"kind": "local", "n_workers": 1}, "storage": {"uri": "file://./state"},
              "params": {"calls_file": str(tmp_path / "calls"),
                         "hold": {"id": 15, "marker": str(marker), "release": str(release)}}}
    job = slurmctl.submit(config)  # returns once the coordinator is started
    assert job.status()["status"] in ("pending", "running")
    wait_for(marker.exists, 300, "item 15 to be held in its batch, the second")

    # Refused while it runs, each with the command's message and nothing changed
    with pytest.raises(slurmctl.JobRunning, match="job from-python is running"):
        job.resume()
    with pytest.raises(slurmctl.NothingToDo, match="declares no rate_limits"):
        job.pause()
    with pytest.raises(slurmctl.NothingToDo, match="has no rate limit 'api'"):
        job.set_rate("api", 5)
    with pytest.raises(slurmctl.NothingToDo, match="one or more error classes"):
        job.retry([])
    with pytest.raises(slurmctl.SubmitRefused, match="job_id: job 'from-python' already exists"):
        slurmctl.submit(config)
    with pytest.raises(slurmctl.ConfigError, match="batch_size"):
        slurmctl.submit({**config, "job_id": "bad", "batch_size": 0})
    with pytest.raises(slurmctl.SubmitFailed, match="could not run deployment 'slurmctl-job/no-such'"):
        slurmctl.submit({**config, "job_id": "to-nowhere"}, deployment="no-such")
    assert slurmctl.job("to-nowhere").status()["status"] == "failed"  # admitted, then failed saying why

    try:
        assert "from-python cancelled: 1/3 batches committed and kept" in job.cancel(timeout=180)
    finally:
        release.touch()
    assert job.status()["status"] == "cancelled"
    view = job.resume(wait=True, timeout=300)
    assert view["status"] == "completed" and view["items_succeeded"] == 30, view
    assert sorted(job.to_pandas()["id"]) == list(range(30))
    first = [item for _, item in calls(str(tmp_path / "calls")) if item < 10]
    assert sorted(first) == list(range(10)), "the batch committed before the cancel never ran again"
    assert slurmctl.job("from-python").status()["status"] == "completed"  # found by id, as `status` finds it
