"""An input of many files (a glob, a folder or S3 prefix, ``input.files``) is listed once into the books and cut file
by file: batches never span files, lines stay unique across them, rejects and failures name the file and its own
line, and a resume refuses a file set that changed (``slurmctl.books.input_files``)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import boto3
import pytest

from slurmctl.blocks.manifest_store import LocalManifestStore, store_from_uri
from slurmctl.books import input_files
from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.config import parse_config
from slurmctl.flows.partition import plan_input
from slurmctl.tasks.process_batch import run_batch


def jsonl(ids, bad_at=None) -> bytes:
    lines = [json.dumps({"id": i}) if i != bad_at else "{not json" for i in ids]
    return ("\n".join(lines) + "\n").encode()


def job(tmp_path: Path, input_: dict, **params) -> tuple:
    cfg = parse_config({"job_id": "many", "handler": "support.sample_handlers:counting", "input": input_,
                        "batch_size": 4, "storage": {"uri": f"file://{tmp_path / 'store'}"},
                        "params": {"calls_file": str(tmp_path / "calls"), **params}})
    return cfg, LocalManifestStore(root=str(tmp_path / "store"))


def day(tmp_path: Path) -> Path:
    """Three parts of one day, one of them gzipped, one holding a malformed line; and a file that is not input."""
    folder = tmp_path / "day"
    folder.mkdir()
    (folder / "part-1.jsonl").write_bytes(jsonl(range(0, 10)))
    (folder / "part-2.jsonl.gz").write_bytes(gzip.compress(jsonl(range(10, 13))))
    (folder / "part-3.jsonl").write_bytes(jsonl(range(13, 20), bad_at=15))
    (folder / "README.txt").write_text("not input")
    return folder


def run_all(cfg, store) -> list[dict]:
    plan = plan_input(store, cfg)
    for spec in plan.batches:
        run_batch(cfg, store, spec, sleep=lambda s: None)
    return plan.batches


def test_a_glob_is_cut_file_by_file_with_job_wide_lines_and_rejects_naming_their_file(tmp_path):
    folder = day(tmp_path)
    cfg, store = job(tmp_path, {"uri": str(folder / "part-*.jsonl*")}, fail={"3": "not_found"})
    specs = run_all(cfg, store)
    assert [(Path(s.file).name, s.records) for s in specs] == [
        ("part-1.jsonl", 4), ("part-1.jsonl", 4), ("part-1.jsonl", 2), ("part-2.jsonl.gz", 3), ("part-3.jsonl", 4),
        ("part-3.jsonl", 3)]  # batches never span files
    assert [s.batch_id for s in specs] == [f"batch-{i:06d}" for i in range(6)]
    tasks = committed_tasks(store, "many")
    assert sum(t["items_succeeded"] for t in tasks) == 18 and sum(t["items_rejected"] for t in tasks) == 1
    [reject] = [json.loads(line) for t in tasks if t.get("rejects")
                for line in (Path(store.root) / t["rejects"]).read_text().splitlines()]
    assert (Path(reject["file"]).name, reject["file_line"], reject["line"]) == ("part-3.jsonl", 3, 16)
    [failure] = failure_state(store, tasks).values()
    assert (failure["id"], Path(failure["file"]).name, failure["file_line"]) == (3, "part-1.jsonl", 4)
    listed = input_files.recorded(store, "many")
    assert [Path(f.uri).name for f in listed] == ["part-1.jsonl", "part-2.jsonl.gz", "part-3.jsonl"]


def test_a_folder_takes_the_files_of_its_format_and_a_list_file_its_entries(tmp_path):
    folder = day(tmp_path)
    cfg, store = job(tmp_path, {"uri": str(folder) + "/", "format": "jsonl"})
    assert [Path(f.uri).name for f in input_files.list_input(store, cfg.input)] == [
        "part-1.jsonl", "part-2.jsonl.gz", "part-3.jsonl"]  # README.txt is not jsonl
    (tmp_path / "list.txt").write_text("# the day's parts, in this order\nday/part-3.jsonl\n\nday/part-1.jsonl\n")
    cfg, store = job(tmp_path, {"files": str(tmp_path / "list.txt"), "format": "jsonl"})
    assert [Path(f.uri).name for f in input_files.list_input(store, cfg.input)] == ["part-3.jsonl", "part-1.jsonl"]
    cfg, store = job(tmp_path, {"uri": str(folder / "nothing-*.jsonl")})
    with pytest.raises(input_files.NoInputFiles, match="names no jsonl file"):
        input_files.list_input(store, cfg.input)


def test_a_resume_refuses_files_added_or_changed_since_partition(tmp_path):
    folder = day(tmp_path)
    cfg, store = job(tmp_path, {"uri": str(folder / "part-*.jsonl*")})
    plan_input(store, cfg)
    input_files.check_unchanged(store, "many", cfg.input)  # nothing changed
    (folder / "part-4.jsonl").write_bytes(jsonl(range(20, 22)))
    with pytest.raises(input_files.InputChanged, match="added: .*part-4.jsonl"):
        input_files.check_unchanged(store, "many", cfg.input)
    os.remove(folder / "part-4.jsonl")
    (folder / "part-1.jsonl").write_bytes(jsonl(range(0, 11)))
    with pytest.raises(input_files.InputChanged, match="changed: .*part-1.jsonl"):
        input_files.check_unchanged(store, "many", cfg.input)


def test_an_s3_glob_is_listed_with_etags_and_read_by_its_batches(tmp_path, moto_endpoint, s3_bucket, monkeypatch):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for name, body in [("users/2025-04-12/part-0.jsonl", jsonl(range(0, 5))),
                       ("users/2025-04-12/part-1.jsonl.gz", gzip.compress(jsonl(range(5, 9)))),
                       ("users/2025-04-12/_SUCCESS", b""), ("users/2025-04-13/part-0.jsonl", jsonl(range(100, 101)))]:
        s3.put_object(Bucket=s3_bucket, Key=name, Body=body)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    store = store_from_uri(f"s3://{s3_bucket}/state", endpoint_url=moto_endpoint, region="us-east-1")
    cfg = parse_config({"job_id": "many", "handler": "slurmctl.handlers.echo:handle", "batch_size": 3,
                        "input": {"uri": f"s3://{s3_bucket}/users/2025-04-12/part-*", "format": "jsonl"},
                        "storage": {"uri": f"s3://{s3_bucket}/state"}})
    files = input_files.list_input(store, cfg.input)
    assert [f.uri.rsplit("/", 1)[1] for f in files] == ["part-0.jsonl", "part-1.jsonl.gz"]
    assert all(f.identity.startswith("s3:etag=") for f in files)
    plan = plan_input(store, cfg)
    summaries = [run_batch(cfg, store, spec) for spec in plan.batches]
    assert sum(s["items_succeeded"] for s in summaries) == 9 and {s.file for s in plan.batches} == {
        f.uri for f in files}


def test_a_parquet_dataset_folder_keeps_each_files_identity_and_job_wide_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "dataset"
    folder.mkdir()
    pq.write_table(pa.table({"id": list(range(0, 5))}), folder / "a.parquet")
    pq.write_table(pa.table({"id": list(range(5, 12))}), folder / "b.parquet")
    cfg, store = job(tmp_path, {"uri": str(folder) + "/", "format": "parquet"})
    specs = run_all(cfg, store)
    assert [(Path(s.file).name, s.first_line, s.records) for s in specs] == [
        ("a.parquet", 1, 4), ("a.parquet", 5, 1), ("b.parquet", 6, 4), ("b.parquet", 10, 3)]
    assert all(s.input_identity.startswith("file:mtime_ns=") for s in specs)
    tasks = committed_tasks(store, "many")
    assert sum(t["items_succeeded"] for t in tasks) == 12
