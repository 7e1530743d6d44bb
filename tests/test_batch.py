"""One batch, run directly (no Prefect, no Dask): commit once, retry transient items, defer under throttling."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import write_jsonl
from support.sample_handlers import calls

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.failures import analyze, committed_tasks, failure_state
from slurmctl.books.manifests import Keys
from slurmctl.config import parse_config
from slurmctl.records import partition
from slurmctl.tasks.process_batch import SUMMARY_FIELDS, InputChanged, run_batch


@pytest.fixture
def job(tmp_path: Path):
    def make(n: int = 20, batch_size: int = 20, extra_lines: tuple[str, ...] = (), **params):
        write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)] + list(extra_lines))
        cfg = parse_config({"job_id": "unit", "handler": "support.sample_handlers:counting",
                            "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": batch_size,
                            "storage": {"uri": f"file://{tmp_path / 'store'}"},
                            "params": {"calls_file": str(tmp_path / "calls"), **params},
                            "errors": {"backoff_base_s": 0, "backoff_max_s": 0,
                                       "circuit_breaker": {"window": 6, "min_attempts": 6, "threshold": 0.8}}})
        store = LocalManifestStore(root=str(tmp_path / "store"))
        with open(tmp_path / "in.jsonl", "rb") as f:
            specs = partition(f, "jsonl", batch_size).batches
        return cfg, store, specs, tmp_path / "calls"
    return make


def test_item_failures_are_recorded_not_fatal(job):
    cfg, store, [spec], calls_file = job(fail={"3": "not_found", "7": "handler"})
    summary = run_batch(cfg, store, spec, sleep=lambda s: None)
    assert (summary["status"], summary["items_succeeded"], summary["items_failed"]) == ("succeeded", 18, 2)
    state = failure_state(store, committed_tasks(store, "unit"))
    assert {r["id"]: r["error_class"] for r in state.values()} == {3: "not_found", 7: "handler"}
    assert all(r["attempts"] == 1 for r in state.values())  # permanent: not retried
    report = analyze("unit", state)
    assert report["classes"] == {"not_found": 1, "handler": 1} and report["batches"] == {spec.batch_id: 2}


def test_transient_items_are_retried_within_the_batch(job):
    cfg, store, [spec], calls_file = job(fail={"5": "throttle"})
    summary = run_batch(cfg, store, spec, sleep=lambda s: None)
    # throttle is transient: 3 attempts (the default budget), then recorded with its class
    assert [i for _, i in calls(str(calls_file))].count(5) == 3
    assert summary["items_failed"] == 1
    state = failure_state(store, committed_tasks(store, "unit"))
    assert [(r["error_class"], r["attempts"]) for r in state.values()] == [("throttle", 3)]


def test_a_committed_batch_never_calls_the_handler_again(job):
    cfg, store, [spec], calls_file = job()
    first = run_batch(cfg, store, spec)
    again = run_batch(cfg, store, spec)
    assert len(calls(str(calls_file))) == 20
    assert again["already_committed"] and again["items_succeeded"] == first["items_succeeded"] == 20


def test_two_attempts_racing_commit_exactly_once(job, tmp_path):
    # Both attempts are inside the handler at once (they meet on item 0), so both passed the "already committed?"
    # check and both write their files: only the commit can decide. Each writes output, rejects and a retry manifest.
    cfg, store, [spec], calls_file = job(n=19, extra_lines=("{not json",), fail={"3": "not_found"},
                                         rendezvous={"id": 0, "dir": str(tmp_path / "meet"), "parties": 2})
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(run_batch(cfg, store, spec))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2, "an attempt raised (see the thread's traceback above)"
    assert sorted(i for _, i in calls(str(calls_file))) == sorted(list(range(19)) * 2)  # both ran every item

    task = json.loads(store.get_bytes(Keys("unit").task(spec.batch_id)))
    winner = [r for r in results if not r.get("duplicate")]
    loser = [r for r in results if r.get("duplicate")]
    assert len(winner) == 1 and len(loser) == 1, results  # exactly one commit, exactly one duplicate
    # the loser reports the committed attempt's summary, not its own (nor an empty one)
    assert ({k: loser[0][k] for k in SUMMARY_FIELDS} == {k: winner[0][k] for k in SUMMARY_FIELDS}
            == {k: task.get(k) for k in SUMMARY_FIELDS})
    assert (task["items_succeeded"], task["items_failed"], task["items_rejected"]) == (18, 1, 1)
    # the loser deleted its own files; the committed attempt's files are all there, and nothing else
    files = sorted(k for prefix in ("outputs/", "rejects/", "retry/") for k in store.list_keys(f"jobs/unit/{prefix}"))
    assert files == sorted([task["output"], task["rejects"], task["retry"]])
    assert all(f".{task['attempt']}." in key for key in files)


def test_breaker_defers_the_rest_of_a_throttled_batch(job):
    cfg, store, [spec], calls_file = job(fail={str(i): "throttle" for i in range(20)})
    summary = run_batch(cfg, store, spec, sleep=lambda s: None)
    assert summary["status"] == "throttled"
    # 6 attempts fill the breaker's window (items 0 and 1, 3 attempts each), the rest are not even tried
    assert len(calls(str(calls_file))) == 6
    # item 0 had failed (3 attempts) before the breaker opened on item 1: same storm, so it is deferred too
    assert (summary["items_failed"], summary["items_deferred"]) == (0, 20)
    state = failure_state(store, committed_tasks(store, "unit"))
    assert sum(r["state"] == "deferred" for r in state.values()) == 20


def test_input_changed_under_the_job_fails_the_batch_loudly(job, tmp_path):
    cfg, store, [spec], calls_file = job()
    write_jsonl(tmp_path / "in.jsonl", [{"id": i + 100} for i in range(20)])
    with pytest.raises(InputChanged, match="input changed"):
        run_batch(cfg, store, spec)
    assert not calls_file.exists()


def test_a_parquet_input_rewritten_with_the_same_shape_fails_its_batches(tmp_path):
    """A Parquet batch's digest covers the file's shape, not its rows: the file's identity at partition time
    (mtime and size here, ETag and size on S3) tells a rewrite apart."""
    from slurmctl.flows.partition import plan_input
    from slurmctl.records import BatchSpec, parquet_slice_digest

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(20)), "name": [f"user-{i:02d}" for i in range(20)]}), path)
    cfg = parse_config({"job_id": "unit", "handler": "support.sample_handlers:counting",
                        "input": {"uri": str(path)}, "batch_size": 10,
                        "storage": {"uri": f"file://{tmp_path / 'store'}"},
                        "params": {"calls_file": str(tmp_path / "calls")}})
    store = LocalManifestStore(root=str(tmp_path / "store"))
    specs = plan_input(store, cfg).batches
    run_batch(cfg, store, specs[0])  # the input as partitioned
    time.sleep(0.05)  # file times advance in clock ticks of a few ms
    pq.write_table(pa.table({"id": list(range(100, 120)), "name": [f"anon-{i:02d}" for i in range(20)]}), path)
    assert parquet_slice_digest(pq.ParquetFile(path).metadata, 10, 20) == specs[1].digest  # same shape
    with pytest.raises(InputChanged, match="the input changed while the job ran — submit it as a new job"):
        run_batch(cfg, store, specs[1])
    assert len(calls(str(tmp_path / "calls"))) == 10  # nothing of the new file was processed

    # a plan written before input identities were recorded still runs (unchecked, as it always was)
    old = BatchSpec.from_dict({k: v for k, v in specs[1].to_dict().items() if k != "input_identity"})
    assert run_batch(cfg, store, old)["items_succeeded"] == 10


def test_worker_loss_is_told_apart_from_batch_failure():
    from distributed.scheduler import KilledWorker

    from slurmctl.flows.process import is_worker_loss

    assert is_worker_loss(KilledWorker("batch-000001", "tcp://127.0.0.1:1234", allowed_failures=3))
    assert not is_worker_loss(InputChanged("input changed"))
    assert not is_worker_loss(ValueError("bad"))


def test_dask_client_is_none_only_where_no_dask_task_runner_runs(monkeypatch):
    """No client means nothing watches the cluster: only a run without a Dask task runner may have none. A cluster
    that fails to start must fail the phase, not leave it waiting for workers that never come."""
    from types import SimpleNamespace

    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from slurmctl.flows import process

    def running_on(runner=None, **context) -> None:
        context = {"task_runner": runner} if runner is not None else context
        monkeypatch.setattr(process, "get_run_context", lambda: SimpleNamespace(**context))

    assert process.dask_client() is None  # no run here at all (the real get_run_context)
    running_on(task_run=object())  # a task run's context: no task runner
    assert process.dask_client() is None
    running_on(ThreadPoolTaskRunner())
    assert process.dask_client() is None

    def no_cluster(**kwargs):
        raise RuntimeError("sbatch: error: invalid partition specified: gpu")

    running_on(DaskTaskRunner(cluster_class=no_cluster))
    with pytest.raises(RuntimeError, match="invalid partition"):
        process.dask_client()
    running_on(SimpleNamespace(client="the client"))
    assert process.dask_client() == "the client"


@pytest.mark.parametrize("encoding, rejected", [("utf-8", 1), ("latin-1", 0)])
def test_a_batch_rejects_bytes_not_valid_in_the_declared_encoding(tmp_path, encoding, rejected):
    path = tmp_path / "in.csv"
    path.write_bytes(b"id,name\n1,ok\n2,caf\xe9\n3,ok\n")
    cfg = parse_config({"job_id": "enc", "handler": "slurmctl.handlers.echo:handle",
                        "input": {"uri": str(path), "encoding": encoding},
                        "storage": {"uri": f"file://{tmp_path / 'store'}"}})
    store = LocalManifestStore(root=str(tmp_path / "store"))
    with open(path, "rb") as f:
        [spec] = partition(f, "csv", 10).batches
    summary = run_batch(cfg, store, spec)
    assert (summary["items_succeeded"], summary["items_rejected"]) == (3 - rejected, rejected)
    [task] = committed_tasks(store, "enc")
    names = pq.read_table(str(tmp_path / "store" / task["output"])).to_pylist()
    assert "\ufffd" not in json.dumps(names, ensure_ascii=False)
    if rejected:
        reject = json.loads((tmp_path / "store" / task["rejects"]).read_text())
        assert reject["line"] == 3 and reject["reason"].startswith("bytes not valid utf-8 (line 3, byte 6: ")
