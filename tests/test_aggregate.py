"""The aggregation subflow: a merge tree that is checksummed, restartable, deduplicated and lays out the dataset.

Jobs here are processed with ``run_batch`` directly (the processing phase has tests of its own); the aggregation
runs as the real Prefect subflow in this process, against the test's Prefect server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.jobs import output_ids, run_cli, status, write_config, write_jsonl
from support.prefect_runs import flows_reporting_to

from slurmctl.blocks.manifest_store import LocalManifestStore, S3ManifestStore, store_from_uri
from slurmctl.books.admission import create_job
from slurmctl.books.aggregation import plan_aggregation
from slurmctl.books.failures import committed_tasks
from slurmctl.books.manifests import Keys
from slurmctl.books.parts import PartCorrupt
from slurmctl.books.store import load_job
from slurmctl.config import AggregateConfig, parse_config
from slurmctl.records import partition
from slurmctl.storage import sha256_bytes
from slurmctl.tables import LINE, ROW, disjoint, id_range, span
from slurmctl.tasks.merge import merge_all
from slurmctl.tasks.process_batch import run_batch

JOB = "agg"


@pytest.fixture
def job(job_with):
    """A job whose batches are all committed: (cfg, store). ``records`` go through ``rows_per_item``."""
    def make(records: list[Any], batch_size: int = 2, part_format: str = "parquet", **aggregate: Any):
        return job_with("support.sample_handlers:rows_per_item", records, batch_size, part_format, **aggregate)
    return make


@pytest.fixture
def job_with(tmp_path: Path):
    """A job whose batches are all committed by ``handler``: (cfg, store)."""
    def make(handler: str, records: list[Any], batch_size: int = 2, part_format: str = "parquet", **aggregate: Any):
        write_jsonl(tmp_path / "in.jsonl", records)
        cfg = parse_config({"job_id": JOB, "handler": handler,
                            "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": batch_size,
                            "storage": {"uri": f"file://{tmp_path / 'store'}"}, "part_format": part_format,
                            "aggregate": aggregate})
        create_job(cfg, None)
        store = LocalManifestStore(root=str(tmp_path / "store"))
        with open(tmp_path / "in.jsonl", "rb") as f:
            specs = partition(f, "jsonl", batch_size).batches
        store.put_bytes(Keys(JOB).plan, b"".join(json.dumps(s.to_dict()).encode() + b"\n" for s in specs))
        for spec in specs:
            run_batch(cfg, store, spec, check_commit=False)
        return cfg, store
    return make


def aggregate(cfg: Any, api: str) -> dict[str, Any]:
    from slurmctl.flows.aggregate import aggregate_phase

    with flows_reporting_to(api):
        return aggregate_phase(cfg.job_id, cfg.model_dump(mode="json"))


def result_of(store: LocalManifestStore) -> dict[str, Any]:
    return store.get_json(Keys(JOB).result)


def output_table(store: LocalManifestStore) -> Any:
    return pq.read_table(store.local_path(Keys(JOB).output))


@pytest.mark.parametrize("fan_in,levels", [(2, 4), (10, 1)])
def test_merges_in_levels_and_keeps_every_row_once_in_input_order(job, prefect_api, fan_in, levels):
    # 20 batches of 2 items; an item may give several rows, or none
    records = [{"id": i, "n": (0 if i % 7 == 3 else 3 if i % 5 == 0 else 1)} for i in range(40)]
    cfg, store = job(records, fan_in=fan_in)
    got = aggregate(cfg, prefect_api)

    result = result_of(store)
    assert result["layout"]["levels"] == levels and result["layout"]["fan_in"] == fan_in
    want = [(r["id"], k) for r in records for k in range(r["n"])]
    table = output_table(store)
    assert list(zip(table["id"].to_pylist(), table["k"].to_pylist())) == want  # exactly once, in input order
    assert table.column_names == ["id", "k"]  # the bookkeeping columns stay out of the dataset
    assert got["rows"] == result["rows"] == result["rows_written"] == len(want) and result["duplicates"] == 0
    [out] = result["outputs"]
    assert out["uri"] == store.uri(Keys(JOB).output) and out["rows"] == len(want)
    assert out["batches"] == [["batch-000000", "batch-000019"]]  # lineage
    assert out["sha256"].startswith("sha256:") and load_job(store, JOB).output == out["uri"]
    assert list(store.list_keys(Keys(JOB).aggregate_prefix)) == []  # intermediate files are gone


COORDINATOR_AGGREGATES = textwrap.dedent("""
    import json, os, sys
    from slurmctl import procpool
    from slurmctl.flows import local_workers
    from slurmctl.flows.aggregate import aggregate_phase

    pids, shutdown = [], procpool.shutdown
    def watched():  # the merges' processes, seen as the flow stops them
        if procpool._pool is not None:
            pids.extend(procpool._pool._processes)
        shutdown()
    procpool.shutdown = watched
    local_workers.allow()  # what a coordinator of a job on the embedded default does (--fork-workers)
    local_workers.warm()
    config = json.loads(sys.argv[1])
    got = aggregate_phase(config["job_id"], config)
    print(json.dumps({"pids": pids, "me": os.getpid(), "rows": got["rows"]}))
""")


def test_a_coordinator_runs_the_merges_in_processes_forked_from_its_workers_template(job, prefect_api):
    """In its threads a coordinator's merges held the GIL in turn (10,000 parts: level 1 took 2.9-3.2 s in two
    threads, 1.3 s in two processes): a coordinator that forks its workers from a template runs them in processes
    forked from it (``slurmctl.procpool``). The same output, every row once in input order."""
    records = [{"id": i, "n": 1 + i % 3} for i in range(40)]
    cfg, store = job(records, fan_in=3)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", COORDINATOR_AGGREGATES, json.dumps(cfg.model_dump(mode="json"))],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    ran = json.loads(out.stdout.strip().splitlines()[-1])
    assert ran["pids"] and ran["me"] not in ran["pids"]  # the merges ran in other processes
    want = [(r["id"], k) for r in records for k in range(r["n"])]
    table = output_table(store)
    assert list(zip(table["id"].to_pylist(), table["k"].to_pylist())) == want and ran["rows"] == len(want)
    assert result_of(store)["layout"]["levels"] == 2


def test_on_a_cluster_the_merges_are_its_workers_task_runs(job, prefect_api, monkeypatch):
    """On a Slurm cluster a job of more than ``fan_in`` batches merges on the job's cluster (``aggregate_runner``:
    a ``DaskTaskRunner``): the merges cross to its workers as task-run arguments and Prefect's engine runs them
    there. A LocalCluster of one worker process stands in for the SLURMCluster."""
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from slurmctl.flows.aggregate import aggregate_phase

    records = [{"id": i, "n": 1 + i % 2} for i in range(24)]
    cfg, store = job(records, fan_in=3)  # 12 batches: 4 first-level merges, then the final layout merges them
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    runner = DaskTaskRunner(cluster_class=LocalCluster, cluster_kwargs={
        "n_workers": 1, "threads_per_worker": 2, "processes": True, "dashboard_address": None})
    with flows_reporting_to(prefect_api):
        got = aggregate_phase.with_options(task_runner=runner)(cfg.job_id, cfg.model_dump(mode="json"))
    want = [(r["id"], k) for r in records for k in range(r["n"])]
    table = output_table(store)
    assert list(zip(table["id"].to_pylist(), table["k"].to_pylist())) == want and got["rows"] == len(want)


def test_the_plan_stays_within_the_task_run_budget_and_changes_with_its_inputs():
    tasks = [{"batch_id": f"batch-{i:06d}", "output": f"o{i}", "output_sha256": "s", "rows_written": 100}
             for i in range(50_000)]
    cfg = AggregateConfig()
    plan = plan_aggregation("big", tasks, cfg, "id")
    # 5M rows: 10 hash partitions of ~500k rows; 500 first-level merges, then 5 per partition, which the final
    # layout merges (each partition's top merge)
    assert plan.buckets == 10 and [len(level) for level in plan.levels] == [500, 50]
    assert [(b, [m.bucket for m in merges]) for b, merges in plan.partition_sources()] == [
        (b, [b] * 5) for b in range(10)]
    tasks[7] = {**tasks[7], "output_sha256": "other"}  # e.g. a batch committed again after a lost commit
    assert plan_aggregation("big", tasks, cfg, "id").plan_id != plan.plan_id


def test_id_ranges_tell_which_files_cannot_share_an_item():
    assert disjoint([["int", 0, 9], ["int", 20, 29], ["int", 10, 19]])  # in any order
    assert not disjoint([["int", 0, 10], ["int", 10, 19]])  # touching: id 10 may be in both
    assert not disjoint([["int", 0, 9], ["str", "a", "b"]])  # 5 and "5" are never compared
    assert not disjoint([["int", 0, 9], None])  # a file without one (float or null ids, an earlier release)
    assert disjoint([None]) and disjoint([])
    assert id_range(pa.table({"id": [3, 1, 2]}), "id") == ["int", 1, 3]
    assert id_range(pa.table({"id": ["b", "a", "é"]}), "id") == ["str", "a", "é"]
    assert id_range(pa.table({"id": [1, None]}), "id") is None and id_range(pa.table({"id": [1.5]}), "id") is None
    assert span([["int", 0, 9], ["int", 5, 30]]) == ["int", 0, 30] and span([["int", 0, 1], None]) is None


@pytest.mark.parametrize("again", [None, 3], ids=["sequential-ids", "an-id-again-at-the-end"])
def test_merges_above_level_1_read_the_keys_only_when_their_inputs_may_share_an_item(job, monkeypatch, again):
    """Each merge records its files' id ranges; the merges above (and the final layout) deduplicate inputs whose
    ranges overlap, and take inputs whose ranges are disjoint whole, unread."""
    import slurmctl.tasks.merge as merge

    records = [{"id": i} for i in range(40)] + ([{"id": again, "n": 2}] if again is not None else [])
    cfg, store = job(records, fan_in=2)  # 21 batches: levels of 11, 6, 3, 2 merges, then the final layout
    real, deduplicated = merge.latest_rows, []
    monkeypatch.setattr(merge, "latest_rows", lambda keys, field: (deduplicated.append(len(keys)),
                                                                   real(keys, field))[1])
    body = merge_all(store, JOB, committed_tasks(store, JOB), cfg.aggregate)
    table = pq.read_table(store.local_path(body["files"][0]["key"]))
    if again is None:
        assert deduplicated == [] and table["id"].to_pylist() == list(range(40))
    else:  # every merge on the way up from the last batch to the first reads the keys
        assert deduplicated and sorted(table["id"].to_pylist()) == sorted([i for i in range(40) if i != 3] + [3, 3])
        assert body["duplicates"] == {"1": 1} and body["superseded"] == {"1": 1}


def test_a_corrupted_part_fails_naming_the_file_and_publishes_nothing(job, prefect_api):
    cfg, store = job([{"id": i} for i in range(10)], fan_in=2)
    part = committed_tasks(store, JOB)[3]["output"]
    data = bytearray(store.get_bytes(part))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(part, bytes(data))
    with pytest.raises(PartCorrupt, match=f"{store.uri(part)}.*has sha256"):
        aggregate(cfg, prefect_api)
    assert result_of(store) is None and list(store.list_keys(Keys(JOB).output_prefix)) == []


def test_a_crash_between_levels_restarts_from_the_finished_merges(job, prefect_api, monkeypatch):
    import slurmctl.tasks.merge as merge

    cfg, store = job([{"id": i} for i in range(40)], fan_in=2)  # 20 batches: levels of 10, 5, 3, 2 merges
    real, ran = merge.run_merge, []

    def crash_at_level_3(store: Any, spec: dict[str, Any]) -> dict[str, Any]:
        if spec["level"] == 3:
            raise RuntimeError("coordinator lost (injected)")
        ran.append(spec["name"])
        return real(store, spec)

    monkeypatch.setattr(merge, "run_merge", crash_at_level_3)
    with pytest.raises(RuntimeError, match="injected"):
        aggregate(cfg, prefect_api)
    assert sorted(ran) == [f"L1-{i:05d}" for i in range(10)] + [f"L2-{i:05d}" for i in range(5)]
    assert result_of(store) is None and list(store.list_keys(Keys(JOB).output_prefix)) == []

    ran.clear()
    monkeypatch.setattr(merge, "run_merge", lambda store, spec: (ran.append(spec["name"]), real(store, spec))[1])
    aggregate(cfg, prefect_api)
    assert sorted(ran) == ["L3-00000", "L3-00001", "L3-00002", "L4-00000", "L4-00001"]
    assert output_table(store)["id"].to_pylist() == list(range(40))


@pytest.mark.parametrize("rows_per_bucket", [500_000, 1000], ids=["one-partition", "hash-partitions"])
def test_duplicates_keep_the_last_occurrence_and_are_counted(job, prefect_api, rows_per_bucket):
    records = [{"id": i, "v": "first", **({"n": 3} if i == 9 else {})} for i in range(2500)]
    records += [{"id": 5, "v": "again"}, {"id": 2400, "v": "again"}, {"id": 2400, "v": "last"}]  # same batch too
    records += [{"id": 7, "n": 2, "v": "two rows"}]  # the last occurrence has more rows than the first
    records += [{"id": 9, "v": "one row"}]  # and fewer: none of the first occurrence's three rows is kept
    cfg, store = job(records, batch_size=50, fan_in=10, rows_per_bucket=rows_per_bucket)
    aggregate(cfg, prefect_api)

    result = result_of(store)
    assert result["layout"]["hash_partitions"] == (1 if rows_per_bucket > 2600 else 3)
    table = output_table(store)
    rows = {(i, k): v for i, k, v in zip(table["id"].to_pylist(), table["k"].to_pylist(), table["v"].to_pylist())}
    assert len(rows) == len(table) == 2501  # every item once, with the rows of its last occurrence
    assert (rows[(5, 0)], rows[(2400, 0)], rows[(7, 0)], rows[(7, 1)], rows[(9, 0)]) == (
        "again", "last", "two rows", "two rows", "one row")
    assert (9, 1) not in rows and (9, 2) not in rows  # never a mix of two occurrences' rows
    assert result["duplicates"] == 7 and result["rows_written"] == 2508 and result["rows"] == 2501
    # the books count each occurrence as an item; five of them were superseded by a later one of their id
    assert result["duplicate_items"] == 5 and result["items_succeeded"] == 2505
    counts = load_job(store, JOB).counts
    assert (counts.duplicates, counts.duplicate_items) == (7, 5)


def test_items_stay_distinct_whatever_id_their_handler_returns(job_with, prefect_api):
    # An API answering with its own id, shared by many users (7 places for 300 users): the output holds one row per
    # user, keyed by the user's id, with the API's id beside it; nothing is booked as a duplicate.
    cfg, store = job_with("support.sample_handlers:place_of", [{"id": f"user-{i}", "zip": i % 7} for i in range(300)],
                          batch_size=20, fan_in=4)
    aggregate(cfg, prefect_api)

    table = output_table(store)
    assert sorted(table["id"].to_pylist()) == sorted(f"user-{i}" for i in range(300))
    assert sorted(set(table["handler_id"].to_pylist())) == [f"place-{n}" for n in range(7)]
    assert table.column_names[:2] == ["id", "handler_id"]
    result = result_of(store)
    assert (result["rows"], result["duplicates"], result["duplicate_items"], result["items_succeeded"]) == (
        300, 0, 0, 300)


def test_sqlite_parts_merge_into_the_same_dataset(job, prefect_api, tmp_path):
    records = [{"id": i, "score": i * 0.5, "name": f"u{i}", "tags": ["a", str(i)], "note": None if i % 2 else "x"}
               for i in range(30)]
    cfg, store = job(records, batch_size=4, part_format="sqlite", fan_in=3)
    parts = [t["output"] for t in committed_tasks(store, JOB)]
    assert parts and all(p.endswith(".sqlite") for p in parts)
    aggregate(cfg, prefect_api)
    table = output_table(store)
    assert table.to_pylist() == [{"id": r["id"], "k": 0, **{k: r[k] for k in ("score", "name", "tags", "note")}}
                                 for r in records]


def test_a_partitioned_layout_with_files_of_at_most_n_rows(job, prefect_api):
    records = [{"id": i, "group": "ab"[i % 2] if i % 10 else None} for i in range(40)]
    cfg, store = job(records, fan_in=4, partition_by="group", max_rows_per_file=7)
    got = aggregate(cfg, prefect_api)

    result = result_of(store)
    root = store.local_path(Keys(JOB).output_prefix)
    assert got["output"] == result["output"] == store.uri(Keys(JOB).output_prefix) + "/"
    files = {o["uri"][len(result["output"]):]: o for o in result["outputs"]}
    assert sorted(files) == (["group=__HIVE_DEFAULT_PARTITION__/part-00000.parquet"]
                             + [f"group={g}/part-{n:05d}.parquet" for g in "ab" for n in range(3)])
    assert all(o["rows"] <= 7 and o["batches"] for o in files.values())
    assert sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs) == sorted(files)
    back = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    assert sorted(zip(back["id"].to_pylist(), back["group"].to_pylist())) == sorted(
        (r["id"], r["group"]) for r in records)


def test_a_row_count_mismatch_fails_the_job_listing_the_difference(job, prefect_api, monkeypatch):
    import slurmctl.tasks.merge as merge

    cfg, store = job([{"id": i} for i in range(20)], fan_in=4)
    real = merge.dedupe
    # every first-level merge loses a row without counting it (a bug, a library fault): the books must catch it
    monkeypatch.setattr(merge, "dedupe", lambda table, id_field: real(table.slice(1), id_field))
    from slurmctl.flows.aggregate import OutputMismatch

    with pytest.raises(OutputMismatch, match=r"holds 17 rows.* = 20 \(-3\); batches off: batch-000000 -1, "
                                             r"batch-000004 -1, batch-000008 -1\."):
        aggregate(cfg, prefect_api)
    assert result_of(store) is None


@pytest.mark.integration
def test_files_go_to_s3_as_multipart_uploads_streamed_from_disk(s3_bucket, moto_endpoint, tmp_path):
    store = store_from_uri(f"s3://{s3_bucket}/mp", endpoint_url=moto_endpoint, region="us-east-1")
    assert isinstance(store, S3ManifestStore)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 << 20))
    store.put_file("out/big.bin", str(big))
    head = store._s3().head_object(Bucket=s3_bucket, Key="mp/out/big.bin")
    assert head["ContentLength"] == 40 << 20 and head["ETag"].strip('"').endswith("-3")  # 3 parts of 16 MB
    store.copy("out/big.bin", "out/copy.bin")
    assert store.get_file("out/copy.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    store.delete_prefix("out/")
    assert list(store.list_keys("out/")) == []


@pytest.mark.integration
def test_slurmctl_aggregate_rebuilds_the_output_of_a_job(tmp_path, prefect_api, slurmctl_home):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(30)])
    cfg = write_config(tmp_path / "job.yaml", job_id="agg-cli", handler="support.sample_handlers:rows_per_item",
                       input={"uri": "in.jsonl"}, batch_size=5, cluster={"kind": "local", "n_workers": 1},
                       storage={"uri": "file://./state"}, aggregate={"fan_in": 2})
    assert run_cli("submit", str(cfg), "--wait").returncode == 0
    out = tmp_path / "state" / "jobs" / "agg-cli" / "output" / "data.parquet"
    out.unlink()
    result = run_cli("aggregate", "agg-cli", "--wait")
    assert result.returncode == 0, result.stderr
    view = status("agg-cli")
    assert view["status"] == "completed" and view["duplicates"] == 0 and output_ids(view) == list(range(30))


def test_a_job_never_partitioned_is_not_aggregated_into_an_empty_output(job, prefect_api):
    from slurmctl.books.audit import BooksUnbalanced

    cfg, store = job([{"id": 1}])
    store.delete(Keys(JOB).plan)  # as right after submit: no plan, no batches yet
    with pytest.raises(BooksUnbalanced, match="not been partitioned yet.*slurmctl resume agg"):
        aggregate(cfg, prefect_api)
    assert result_of(store) is None


@pytest.mark.parametrize("fan_in,batch_size,levels", [(100, 2, [1]), (2, 1, [4, 2])],
                         ids=["one-level", "upper-levels"])
def test_parts_of_different_columns_and_types_merge_into_one_schema_row_for_row(job_with, fan_in, batch_size,
                                                                                  levels):
    """A merge reads its parts into one table: a column missing from a part is null there, a column null-typed in
    one part takes the type of another, int64 and double unify to double. With a fan-in of 2 and a part per record
    the first level's outputs differ the same way, and the merges above (level 2 and the final layout, which stream
    their inputs) unify them alike."""
    records = [{"id": 0, "note": None}, {"id": 1, "note": None},  # note: null-typed in this part
               {"id": 2, "note": "x", "extra": 5}, {"id": 3, "note": "y"},  # extra: in this part only
               {"id": 4, "score": 1}, {"id": 5, "score": 2}, {"id": 6, "score": 2.5}]
    cfg, store = job_with("slurmctl.handlers.echo:handle", records, batch_size=batch_size, fan_in=fan_in)
    tasks = committed_tasks(store, JOB)
    assert len(tasks) == -(-len(records) // batch_size)
    assert [len(level) for level in plan_aggregation(JOB, tasks, cfg.aggregate, "id").levels] == levels
    body = merge_all(store, JOB, tasks, cfg.aggregate)
    table = pq.read_table(store.local_path(body["files"][0]["key"]))
    assert table.schema.field("note").type == pa.string() and table.schema.field("score").type == pa.float64()
    assert table.to_pylist() == [
        {"id": 0, "note": None, "extra": None, "score": None}, {"id": 1, "note": None, "extra": None, "score": None},
        {"id": 2, "note": "x", "extra": 5, "score": None}, {"id": 3, "note": "y", "extra": None, "score": None},
        {"id": 4, "note": None, "extra": None, "score": 1.0}, {"id": 5, "note": None, "extra": None, "score": 2.0},
        {"id": 6, "note": None, "extra": None, "score": 2.5}]


def test_a_part_written_before_the_row_key_columns_is_still_merged(job):
    """Parts of a release that did not write ``_slurmctl_line``/``_slurmctl_row`` get them derived."""
    cfg, store = job([{"id": i, "n": 2} for i in range(4)])
    tasks = committed_tasks(store, JOB)
    old = tasks[1]
    table = pq.read_table(store.local_path(old["output"])).drop_columns([LINE, ROW])
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    data = buf.getvalue().to_pybytes()
    store.put_bytes(old["output"], data)
    tasks[1] = {**old, "output_sha256": sha256_bytes(data)}
    body = merge_all(store, JOB, tasks, cfg.aggregate)
    merged = pq.read_table(store.local_path(body["files"][0]["key"]))
    assert merged.select(["id", "k"]).to_pylist() == [{"id": i, "k": k} for i in range(4) for k in (0, 1)]
    assert body["rows"] == 8 and body["rows_per_batch"] == {"0": 4, "1": 4}
