"""The manifest store: atomic writes, create-if-absent commits, checksummed JSON, on disk and on S3 over HTTP."""

from __future__ import annotations

import json
import threading

import pytest

from slurmctl.blocks.manifest_store import LocalManifestStore, ManifestCorrupt, S3ManifestStore, store_from_uri
from slurmctl.books.manifests import (
    TASK_SCHEMA_VERSION,
    Counts,
    JobManifest,
    Keys,
    TaskManifest,
    counts_from_tasks,
    now,
    status_view,
)


@pytest.fixture
def store(manifest_store):
    """Each test below runs on a local directory and, as an integration test, on S3 (moto over HTTP)."""
    return manifest_store


def test_json_round_trip_with_checksum(store):
    body = {"schema_version": 1, "kind": "task", "n": 3, "nested": {"a": [1, 2]}}
    store.put_json("jobs/j/tasks/b.json", body)
    got = store.get_json("jobs/j/tasks/b.json")
    assert got["checksum"].startswith("sha256:")
    assert {k: v for k, v in got.items() if k != "checksum"} == body
    assert store.get_json("jobs/j/tasks/missing.json") is None


def test_tampered_manifest_is_detected(store):
    store.put_json("m.json", {"count": 1})
    body = json.loads(store.get_bytes("m.json"))
    body["count"] = 2
    store.put_bytes("m.json", json.dumps(body).encode())
    with pytest.raises(ManifestCorrupt, match="checksum mismatch"):
        store.get_json("m.json")


def test_create_if_absent_has_exactly_one_winner(store):
    results = []

    def commit(i: int) -> None:
        results.append((i, store.put_bytes("commit", f"writer {i}".encode(), if_absent=True)))

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results if won]
    assert len(winners) == 1
    assert store.get_bytes("commit") == f"writer {winners[0]}".encode()


def test_list_keys_and_delete(store):
    for name in ("b", "a", "c"):
        store.put_bytes(f"jobs/j/tasks/{name}.json", b"{}")
    store.put_bytes("jobs/j/other", b"x")
    assert list(store.list_keys("jobs/j/tasks/")) == [f"jobs/j/tasks/{n}.json" for n in "abc"]
    store.delete("jobs/j/tasks/b.json")
    store.delete("jobs/j/tasks/never-there.json")
    assert list(store.list_keys("jobs/j/tasks/")) == ["jobs/j/tasks/a.json", "jobs/j/tasks/c.json"]


def test_ranged_and_streamed_reads(store):
    data = bytes(range(256)) * 100
    store.put_bytes("input.bin", data)
    uri = store.uri("input.bin")
    assert store.read_range(uri, 10, 20) == data[10:20]
    with store.open_uri(uri) as f:
        f.seek(25000)
        assert f.read(10) == data[25000:25010]
        f.seek(0)
        assert f.read() == data


def test_local_writes_leave_no_temporary_files(tmp_path):
    store = LocalManifestStore(root=str(tmp_path))
    store.put_bytes("a/b.json", b"1")
    store.put_bytes("a/b.json", b"2")
    assert not store.put_bytes("a/b.json", b"3", if_absent=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]
    assert (tmp_path / "a" / "b.json").read_bytes() == b"2"


def test_s3_store_pickles_without_a_client(moto_endpoint, s3_bucket):
    import pickle

    store = store_from_uri(f"s3://{s3_bucket}/p", endpoint_url=moto_endpoint)
    store.put_bytes("k", b"v")  # creates and caches a client in prefect-aws, not on the block
    clone = pickle.loads(pickle.dumps(store))
    assert isinstance(clone, S3ManifestStore) and clone.get_bytes("k") == b"v"


def test_manifest_models_round_trip(tmp_path):
    store = LocalManifestStore(root=str(tmp_path))
    keys = Keys("job-1")
    task = TaskManifest(job_id="job-1", batch_id="batch-000001", task_id="task-000001", status="succeeded",
                        started_at=now(), finished_at=now(), items=10, items_succeeded=9, items_failed=1)
    store.put_json(keys.task("batch-000001"), task.model_dump(mode="json"))
    again = TaskManifest.model_validate(store.get_json(keys.task("batch-000001")))
    assert again.items_failed == 1 and again.schema_version == TASK_SCHEMA_VERSION
    assert Keys.committed_batch(keys.task("batch-000001")) == "batch-000001"
    assert Keys.committed_batch(keys.failed_task("batch-000001")) is None
    c = counts_from_tasks([again.model_dump()], batches_total=3, items_total=30)
    assert (c.batches_done, c.items_succeeded, c.items_failed) == (1, 9, 1)


def test_status_view_flags_a_silent_running_job():
    job = JobManifest(job_id="j", handler="h:f", input={}, batch_size=1, cluster={}, storage="s", config={},
                      status="running", counts=Counts(batches_total=2), updated_at="2020-01-01T00:00:00Z")
    view = status_view(job.model_dump(mode="json"))
    assert view["stale"] is True and view["batches_total"] == 2
    for field in ("job_id", "status", "phase", "batches_total", "batches_done", "batches_failed", "items_total",
                  "items_succeeded", "items_failed", "items_rejected", "output", "started_at", "updated_at"):
        assert field in view
