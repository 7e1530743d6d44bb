"""The books must balance before a job completes, and every committed part is verified before it is used."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from support.jobs import output_ids, run_cli, status, write_config, write_jsonl
from support.sample_handlers import calls

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.admission import create_job
from slurmctl.books.audit import BooksUnbalanced, audit, check
from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.books.manifests import Keys
from slurmctl.books.parts import PartCorrupt, PartMissing
from slurmctl.books.store import load_job, save_job, store_for
from slurmctl.config import parse_config
from slurmctl.records import partition
from slurmctl.storage import ManifestCorrupt
from slurmctl.tasks.merge import concat_rejects, merge_all
from slurmctl.tasks.process_batch import run_batch
from slurmctl.tasks.process_shard import run_shard


@pytest.fixture
def planned(tmp_path: Path):
    """A job created and partitioned in a store (a local one unless ``storage`` says), no batch run yet:
    (cfg, store, specs)."""
    def make(records: list, batch_size: int = 4, storage: dict | None = None, **params):
        write_jsonl(tmp_path / "in.jsonl", records)
        cfg = parse_config({"job_id": "books", "handler": "support.sample_handlers:counting",
                            "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": batch_size,
                            "storage": storage or {"uri": f"file://{tmp_path / 'store'}"},
                            "params": {"calls_file": str(tmp_path / "calls"), **params}})
        create_job(cfg, None)
        store = store_for(cfg.storage)
        with open(tmp_path / "in.jsonl", "rb") as f:
            specs = partition(f, "jsonl", batch_size).batches
        store.put_bytes(Keys("books").plan, b"".join(json.dumps(s.to_dict()).encode() + b"\n" for s in specs))
        return cfg, store, specs
    return make


def books_of(store):
    return audit(store, load_job(store, "books"), committed_tasks(store, "books"))


def rewrite_task(store, batch_id: str, **changes) -> None:
    """Change a committed task manifest and re-checksum it: consistent JSON, wrong facts."""
    key = Keys("books").task(batch_id)
    store.put_json(key, {**store.get_json(key), **changes})


def test_a_job_with_a_batch_missing_its_commit_cannot_complete(planned):
    cfg, store, specs = planned([{"id": i} for i in range(10)] + ["{bad json"])
    for spec in specs[:2]:
        run_batch(cfg, store, spec)
    store.put_bytes(f"jobs/books/cache/{specs[2].batch_id}-0123abcd", b"{}")  # a Prefect cache record for it
    with pytest.raises(BooksUnbalanced) as err:
        check(store, load_job(store, "books"), committed_tasks(store, "books"))
    message = str(err.value)
    assert "1 of 3 planned batch(es) have no commit: batch-000002" in message
    assert "succeeded 8 + failed 0 + rejected 0 = 8, but the input has 11 (-3)" in message
    assert "slurmctl resume books" in message
    # its stale cache record is gone, so resume runs the batch instead of being answered from the cache
    assert list(store.list_keys("jobs/books/cache/")) == []

    run_batch(cfg, store, specs[2])
    books = check(store, load_job(store, "books"), committed_tasks(store, "books"))
    assert (books.items_total, books.items_succeeded, books.items_rejected, books.difference) == (11, 10, 1, 0)


def test_a_commit_whose_counts_do_not_add_up_is_named(planned):
    cfg, store, specs = planned([{"id": i} for i in range(8)])
    for spec in specs:
        run_batch(cfg, store, spec)
    assert books_of(store).balanced
    rewrite_task(store, specs[1].batch_id, items_succeeded=3)
    books = books_of(store)
    assert books.inconsistent == [specs[1].batch_id] and books.difference == -1 and not books.balanced


def test_items_sharing_an_id_are_each_accounted_for(planned):
    # id 5 appears twice and fails both times: two failed items, not one
    records = [{"id": i} for i in range(8)] + [{"id": 5}]
    cfg, store, specs = planned(records, fail={"5": "not_found"})
    for spec in specs:
        run_batch(cfg, store, spec, sleep=lambda s: None)
    state = failure_state(store, committed_tasks(store, "books"))
    assert sorted(r["line"] for r in state.values()) == [6, 9]
    books = books_of(store)
    assert (books.items_succeeded, books.items_failed, books.difference) == (7, 2, 0) and books.balanced


def test_a_retry_round_batch_without_a_commit_is_named(planned):
    from slurmctl.flows.retry import plan_round

    cfg, store, specs = planned([{"id": i} for i in range(8)], fail={"1": "network", "6": "network"})
    for spec in specs:
        run_batch(cfg, store, spec, sleep=lambda s: None)
    round_specs = plan_round(store, "books", 1, {"network"}, include_deferred=True, batch_size=1)
    job = load_job(store, "books")
    job.retry_rounds = [{"round": 1, "classes": ["network"], "finished_at": None}]
    save_job(store, job)
    run_batch(cfg, store, round_specs[0], sleep=lambda s: None)
    books = books_of(store)
    assert books.missing == [round_specs[1].batch_id] and books.batches_planned == 4


def test_the_merge_verifies_each_part_against_its_task_manifest(planned, tmp_path):
    cfg, store, specs = planned([{"id": i} for i in range(8)] + ["not json"])
    for spec in specs:
        run_batch(cfg, store, spec)
    tasks = committed_tasks(store, "books")

    def merge(tasks: list[dict]) -> dict:
        store.delete_prefix("jobs/books/aggregate/")  # as after a completed aggregation: nothing to skip
        return merge_all(store, "books", tasks, cfg.aggregate)

    assert merge(tasks)["rows"] == 8

    # a part damaged after its batch committed: same size, other bytes
    part = tasks[0]["output"]
    data = bytearray(store.get_bytes(part))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(part, bytes(data))
    with pytest.raises(PartCorrupt, match=f"{store.uri(part)}.*has sha256"):
        merge(tasks)

    # a part replaced together with its recorded checksum, but not the row count
    other = tasks[1]["output"]
    rewrite_task(store, tasks[0]["batch_id"], output=other, output_sha256=tasks[1]["output_sha256"],
                 rows_written=3)
    with pytest.raises(PartCorrupt, match="holds 4 rows, but 3 were recorded"):
        merge(committed_tasks(store, "books"))

    # a committed part that is gone is an error, not an empty part
    store.delete(other)
    with pytest.raises(PartMissing, match=store.uri(other)):
        merge(committed_tasks(store, "books"))


def test_missing_rejects_or_retry_files_are_errors_not_empty(planned):
    cfg, store, specs = planned([{"id": 0}, "oops", {"id": 2}, {"id": 3}], fail={"3": "not_found"})
    run_batch(cfg, store, specs[0], sleep=lambda s: None)
    [task] = committed_tasks(store, "books")
    assert concat_rejects(store, [task], "rejects.jsonl").rows == 1
    assert len(failure_state(store, [task])) == 1
    store.delete(task["rejects"])
    with pytest.raises(PartMissing, match="rejects"):
        concat_rejects(store, [task], "rejects.jsonl")
    store.delete(task["retry"])
    with pytest.raises(PartMissing, match="retry manifest"):
        failure_state(store, [task])


def test_a_manifest_without_its_checksum_is_corrupt(tmp_path):
    store = LocalManifestStore(root=str(tmp_path))
    store.put_bytes("m.json", json.dumps({"schema_version": 1, "kind": "task"}).encode())
    with pytest.raises(ManifestCorrupt, match="no 'checksum' field"):
        store.get_json("m.json")


# --- commit logs are an index; the task manifest is the truth ------------------------------------------------------
def set_mtime(store, key: str, when: float) -> None:
    """Give a local store's object another modification time (what the store's listing reports)."""
    os.utime(store.local_path(key), (when, when))


def age(store, prefix: str, seconds: float) -> None:
    """Everything under ``prefix`` as if written ``seconds`` earlier."""
    for key in store.list_keys(prefix):
        set_mtime(store, key, os.stat(store.local_path(key)).st_mtime - seconds)


def commit_again(cfg, store, spec, **params) -> dict:
    """The batch's commit is lost and the batch runs again: another attempt, other files (``params``: how the
    handler behaves this time). Returns the new task manifest."""
    store.delete(Keys("books").task(spec.batch_id))
    run_batch(cfg.model_copy(update={"params": {**cfg.params, **params}}), store, spec, sleep=lambda s: None)
    return store.get_json(Keys("books").task(spec.batch_id))


def merged_rows(store, cfg) -> int:
    store.delete_prefix("jobs/books/aggregate/")
    return merge_all(store, "books", committed_tasks(store, "books"), cfg.aggregate)["rows"]


def test_a_batch_committed_again_after_its_commit_log_is_read_from_its_task_manifest(planned):
    cfg, store, specs = planned([{"id": i} for i in range(8)])
    run_shard(cfg, store, specs)  # both batches committed, then the shard's commit log with their copies
    age(store, "jobs/books/", 100)
    first = store.get_json(Keys("books").task(specs[0].batch_id))
    second = commit_again(cfg, store, specs[0], fail={"1": "not_found"})  # this time item 1 fails
    assert second["attempt"] != first["attempt"] and second["output"] != first["output"]

    [task, _] = committed_tasks(store, "books")
    assert (task["attempt"], task["output"], task["items_failed"]) == (second["attempt"], second["output"], 1)
    books = books_of(store)
    assert (books.items_succeeded, books.items_failed, books.balanced) == (7, 1, True)
    assert merged_rows(store, cfg) == 7
    store.delete(first["output"])  # the old attempt's part is gone too: nothing reads it
    assert merged_rows(store, cfg) == 7


def test_a_commit_log_is_used_only_when_written_after_the_commit(planned, monkeypatch):
    cfg, store, specs = planned([{"id": i} for i in range(8)])
    run_shard(cfg, store, specs)
    [log] = store.list_keys("jobs/books/commits/")
    reads: list[str] = []
    real = LocalManifestStore.get_json
    monkeypatch.setattr(LocalManifestStore, "get_json", lambda self, key: reads.append(key) or real(self, key))

    def manifests_read() -> list[str]:
        reads.clear()
        assert [t["batch_id"] for t in committed_tasks(store, "books")] == [s.batch_id for s in specs]
        return sorted(k.rsplit("/", 1)[-1] for k in reads if "/tasks/" in k)

    now = time.time()
    for spec in specs:
        set_mtime(store, Keys("books").task(spec.batch_id), now - 10)
    set_mtime(store, log, now)
    assert manifests_read() == []  # one request for the shard
    set_mtime(store, Keys("books").task(specs[1].batch_id), now)  # equal times (S3: in one second): no order
    assert manifests_read() == ["batch-000001.json"]


def test_commit_logs_naming_two_attempts_of_a_batch_are_not_trusted_for_it(planned):
    """A shard that committed attempt 1 and writes its log only after the batch was committed again (a zombie
    whose worker lost its coordinator): its log is newer than the commit, but another log names attempt 2."""
    cfg, store, specs = planned([{"id": i} for i in range(8)])
    run_shard(cfg, store, specs)
    [zombie] = store.list_keys("jobs/books/commits/")
    store.delete(Keys("books").task(specs[0].batch_id))
    run_shard(cfg.model_copy(update={"params": {**cfg.params, "fail": {"1": "not_found"}}}), store, specs[:1])
    [own] = set(store.list_keys("jobs/books/commits/")) - {zombie}
    second = store.get_json(Keys("books").task(specs[0].batch_id))
    now = time.time()
    set_mtime(store, Keys("books").task(specs[0].batch_id), now - 100)
    set_mtime(store, own, now - 100)  # the re-commit's own log, in the same second as it: not usable by time
    set_mtime(store, zombie, now)  # the zombie's log: later than the commit it does not hold
    assert committed_tasks(store, "books")[0]["attempt"] == second["attempt"]


@pytest.mark.integration
@pytest.mark.aws
def test_on_s3_a_batch_committed_again_after_its_commit_log_is_read_from_its_task_manifest(planned, moto_endpoint,
                                                                                            s3_bucket):
    cfg, store, specs = planned([{"id": i} for i in range(8)], storage={
        "uri": f"s3://{s3_bucket}/runs", "endpoint_url": moto_endpoint, "region": "us-east-1"})
    run_shard(cfg, store, specs)
    time.sleep(1.1)  # S3's LastModified is in seconds: the new commit lands in a later second than the log
    second = commit_again(cfg, store, specs[0], fail={"1": "not_found"})
    assert committed_tasks(store, "books")[0]["attempt"] == second["attempt"]
    books = books_of(store)
    assert (books.items_succeeded, books.items_failed, books.balanced) == (7, 1, True)


def test_a_corrupt_commit_log_falls_back_to_the_task_manifests(planned, caplog):
    cfg, store, specs = planned([{"id": i} for i in range(8)] + ["not json"])
    run_shard(cfg, store, specs)
    [log] = store.list_keys("jobs/books/commits/")
    age(store, "jobs/books/tasks/", 10)  # the log is usable by its time: only its checksum is wrong
    store.put_bytes(log, store.get_bytes(log).replace(b'"items_succeeded": 4', b'"items_succeeded": 5'))
    with caplog.at_level(logging.WARNING, logger="slurmctl"):
        tasks = committed_tasks(store, "books")
    assert [t["items_succeeded"] for t in tasks] == [4, 4, 0]
    assert f"commit log {store.uri(log)} skipped" in caplog.text and "checksum mismatch" in caplog.text
    assert check(store, load_job(store, "books"), tasks).balanced  # the audit
    assert merged_rows(store, cfg) == 8  # and the aggregation
    assert concat_rejects(store, tasks, "jobs/books/rejects.jsonl").rows == 1


# --- end to end: a real job, then its manifests damaged ----------------------------------------------------------
def completed_job(tmp_path: Path, job_id: str, n: int = 60) -> Path:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    cfg = write_config(tmp_path / "job.yaml", job_id=job_id, handler="support.sample_handlers:counting",
                       input={"uri": "in.jsonl"}, batch_size=10, storage={"uri": "state"},
                       params={"calls_file": str(tmp_path / "calls")})
    result = run_cli("submit", str(cfg), "--wait")
    assert result.returncode == 0, result.stderr
    return tmp_path / "state" / "jobs" / job_id


@pytest.mark.integration
def test_a_lost_commit_fails_the_job_and_resume_finishes_it(tmp_path, prefect_api, slurmctl_home):
    root = completed_job(tmp_path, "lost-commit")
    (root / "tasks" / "batch-000003.json").unlink()  # the commit is gone; the Prefect cache record is not
    result = run_cli("resume", "lost-commit", "--force", "--wait")
    assert result.returncode == 1, result.stderr
    view = status("lost-commit")
    assert view["status"] == "failed" and "batch-000003" in view["error"] and "(-10)" in view["error"]
    assert run_cli("resume", "lost-commit", "--wait").returncode == 0
    view = status("lost-commit")
    assert view["status"] == "completed" and sorted(output_ids(view)) == list(range(60))
    assert len(calls(str(tmp_path / "calls"))) == 70  # the lost batch ran again, nothing else did


@pytest.mark.integration
def test_a_damaged_part_fails_the_aggregation_naming_the_file(tmp_path, prefect_api, slurmctl_home):
    root = completed_job(tmp_path, "damaged")
    task = json.loads((root / "tasks" / "batch-000002.json").read_text())
    part = Path(task["output"].replace("jobs/damaged/", str(root) + "/", 1))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    result = run_cli("resume", "damaged", "--force", "--wait")
    assert result.returncode == 1
    view = status("damaged")
    assert view["status"] == "failed" and "PartCorrupt" in view["error"] and part.name in view["error"]


def test_a_failed_jobs_error_says_why_its_first_batch_failed(tmp_path):
    # A handler class whose __init__ raises fails every batch; the job's error named the batches and where to look,
    # and a resume would fail the same way. It now carries the first one's cause (one line, at most 300 characters).
    from slurmctl.flows.job import first_failure

    store = store_for({"uri": str(tmp_path)})
    error = "RuntimeError: cannot build:\n  no credentials " + "x" * 400
    store.put_json(Keys("j").failed_task("batch-000002"), {"batch_id": "batch-000002", "error": error})
    said = first_failure(store, "j", ["batch-000002", "batch-000005"])
    assert said.startswith(". The first failed with RuntimeError: cannot build: no credentials xxx"), said
    assert said.endswith("…; fix that before resuming") and len(said) < 360
    assert first_failure(store, "j", ["batch-000005"]) == "" and first_failure(store, "j", []) == ""
