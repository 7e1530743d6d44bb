"""The manifest store: atomic writes, create-if-absent commits, checksummed JSON, on disk and on S3 over HTTP."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from slurmctl.blocks.manifest_store import LocalManifestStore, S3ManifestStore, store_from_uri
from slurmctl.books.manifests import (
    TASK_SCHEMA_VERSION,
    Counts,
    JobManifest,
    Keys,
    TaskManifest,
    counts_from_tasks,
    now,
)
from slurmctl.books.status import status_view
from slurmctl.storage import DeleteIncomplete, ManifestCorrupt


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


def test_an_inputs_identity_changes_when_it_is_rewritten_with_the_same_size(store):
    store.put_bytes("in.parquet", b"a" * 100)
    before = store.input_identity(store.uri("in.parquet"))
    assert store.input_identity(store.uri("in.parquet")) == before
    time.sleep(0.05)  # file times advance in clock ticks of a few ms
    store.put_bytes("in.parquet", b"b" * 100)
    assert store.input_identity(store.uri("in.parquet")) != before


def test_local_writes_leave_no_temporary_files(tmp_path):
    store = LocalManifestStore(root=str(tmp_path))
    store.put_bytes("a/b.json", b"1")
    store.put_bytes("a/b.json", b"2")
    assert not store.put_bytes("a/b.json", b"3", if_absent=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]
    assert (tmp_path / "a" / "b.json").read_bytes() == b"2"


def test_a_local_write_fsyncs_the_directories_that_name_it(tmp_path, monkeypatch):
    """A commit is reported once ``put_bytes`` returns: its name must survive a crash too, not only its bytes."""
    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_replace = os.fsync, os.link, os.replace

    def fsync(fd: int) -> None:
        kind = "fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"
        events.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", lambda src, dst: events.append(("link", str(dst))) or real_link(src, dst))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(dst))) or real_replace(src, dst))
    store = LocalManifestStore(root=str(tmp_path))

    def after(op: str, path: Path) -> list[tuple[str, str]]:
        return events[events.index((op, str(path))) + 1:]

    # a commit in directories it creates: the new name, and each new directory's name in its parent
    assert store.put_bytes("jobs/j/tasks/b.json", b"1", if_absent=True)
    assert after("link", tmp_path / "jobs/j/tasks/b.json") == [
        ("fsync dir", str(tmp_path)), ("fsync dir", str(tmp_path / "jobs")), ("fsync dir", str(tmp_path / "jobs/j")),
        ("fsync dir", str(tmp_path / "jobs/j/tasks"))]
    events.clear()
    store.put_bytes("jobs/j/tasks/c.json", b"2")  # an existing directory: only its own entries
    assert after("replace", tmp_path / "jobs/j/tasks/c.json") == [("fsync dir", str(tmp_path / "jobs/j/tasks"))]
    events.clear()
    (tmp_path / "part.parquet").write_bytes(b"rows")
    store.put_file("jobs/j/outputs/b.parquet", str(tmp_path / "part.parquet"))  # a streamed file, then renamed
    assert after("replace", tmp_path / "jobs/j/outputs/b.parquet") == [
        ("fsync dir", str(tmp_path / "jobs/j")), ("fsync dir", str(tmp_path / "jobs/j/outputs"))]
    events.clear()
    assert not store.put_bytes("jobs/j/tasks/b.json", b"3", if_absent=True)  # refused: nothing new to sync
    assert [e for e in events if e[0] == "fsync dir"] == []


class RefusingDeletes:
    """The store's S3 client, except that ``DeleteObjects`` reports some keys as not deleted (per-key ``Errors``
    in a 200 answer, as S3 does for access denied or a slow-down) without deleting them: moto never does. A key in
    ``once`` is refused the first time it is asked for, a key in ``always`` every time."""

    def __init__(self, client, once: set[str], always: set[str]):
        self.client, self.once, self.always = client, set(once), always
        self.requests: list[list[str]] = []

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def delete_objects(self, Bucket: str, Delete: dict) -> dict:
        keys = [o["Key"] for o in Delete["Objects"]]
        self.requests.append(keys)
        refused = [k for k in keys if k in self.always or k in self.once]
        self.once -= set(keys)
        kept = [{"Key": k} for k in keys if k not in refused]
        answer = self.client.delete_objects(Bucket=Bucket, Delete={**Delete, "Objects": kept}) if kept else {}
        return {**answer, "Errors": [{"Key": k, "Code": "AccessDenied", "Message": "Access Denied"} for k in refused]}


@pytest.mark.integration
@pytest.mark.aws
def test_s3_delete_prefix_retries_the_keys_s3_did_not_delete_then_names_them(moto_endpoint, s3_bucket, monkeypatch):
    store = store_from_uri(f"s3://{s3_bucket}/p", endpoint_url=moto_endpoint, region="us-east-1")
    for i in range(5):
        store.put_bytes(f"aggregate/{i}.parquet", b"x")
    client = RefusingDeletes(store._s3(), once={"p/aggregate/1.parquet"}, always={"p/aggregate/3.parquet"})
    monkeypatch.setattr(S3ManifestStore, "_s3", lambda self: client)
    with pytest.raises(DeleteIncomplete, match=re.escape(
            f"1 of 5 key(s) under s3://{s3_bucket}/p/aggregate/ could not be deleted (tried twice): "
            f"p/aggregate/3.parquet (AccessDenied: Access Denied)")):
        store.delete_prefix("aggregate/")
    assert client.requests == [[f"p/aggregate/{i}.parquet" for i in range(5)],
                               ["p/aggregate/1.parquet", "p/aggregate/3.parquet"]]
    assert list(store.list_keys("aggregate/")) == ["aggregate/3.parquet"]  # the one it could not delete
    client.always.clear()
    store.delete_prefix("aggregate/")
    assert list(store.list_keys("aggregate/")) == []


@pytest.mark.integration
@pytest.mark.aws
def test_markers_are_deleted_before_the_files_they_vouch_for(moto_endpoint, s3_bucket, monkeypatch):
    # a merge's .done marker says its files are there: a delete cut short must never leave it without them
    store = store_from_uri(f"s3://{s3_bucket}/p", endpoint_url=moto_endpoint, region="us-east-1")
    for key in ("plan/L1/00000.done", "plan/L1/00000.json", "plan/L1/00000/0.parquet", "plan/L1/00001.done"):
        store.put_bytes(key, b"x")
    client = RefusingDeletes(store._s3(), once=set(), always={"p/plan/L1/00000/0.parquet"})
    monkeypatch.setattr(S3ManifestStore, "_s3", lambda self: client)
    with pytest.raises(DeleteIncomplete):
        store.delete_prefix("plan/", first=lambda key: key.endswith(".done"))
    assert client.requests[0] == ["p/plan/L1/00000.done", "p/plan/L1/00001.done"]
    assert list(store.list_keys("plan/")) == ["plan/L1/00000/0.parquet"]

    client.always = {"p/plan/L1/00001.done"}  # a marker that cannot go: nothing it vouches for is touched
    for key in ("plan/L1/00001.done", "plan/L1/00001.json"):
        store.put_bytes(key, b"x")
    with pytest.raises(DeleteIncomplete, match="plan/L1/00001.done"):
        store.delete_prefix("plan/", first=lambda key: key.endswith(".done"))
    assert "plan/L1/00001.json" in list(store.list_keys("plan/"))


def test_a_local_delete_that_leaves_files_says_so(tmp_path, monkeypatch):
    store = LocalManifestStore(root=str(tmp_path))
    for key in ("plan/L1/00000.done", "plan/L1/00000.json"):
        store.put_bytes(key, b"x")
    real = LocalManifestStore.delete

    def refuse(self, key: str) -> None:
        if key.endswith(".json"):
            raise PermissionError(13, "Permission denied", key)
        real(self, key)

    monkeypatch.setattr(LocalManifestStore, "delete", refuse)
    with pytest.raises(DeleteIncomplete, match="plan/L1/00000.json"):
        store.delete_prefix("plan/", first=lambda key: key.endswith(".done"))
    assert list(store.list_keys("plan/")) == ["plan/L1/00000.json"]  # the marker went first


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
