"""Shards: a bounded number of task runs whatever the job's size, each batch in exactly one, each batch committed on
its own inside a shard, only uncommitted batches re-cut."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from support.jobs import write_jsonl
from support.prefect_runs import flows_reporting_to, settled_task_runs
from support.sample_handlers import calls

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.failures import committed_batch_ids, committed_tasks
from slurmctl.books.manifests import Counts, Keys
from slurmctl.books.shards import MAX_BATCHES_PER_SHARD, Budget, plan_shards, shard_count
from slurmctl.config import parse_config
from slurmctl.flows.process import plan_pass
from slurmctl.records import BatchSpec, partition
from slurmctl.tasks.process_batch import run_batch
from slurmctl.tasks.process_shard import ShardIncomplete, run_shard


def specs_of(n: int) -> list[BatchSpec]:
    return [BatchSpec(batch_id=f"batch-{i:06d}", index=i, start=i * 10, end=i * 10 + 10, first_line=i * 10 + 1,
                      records=10) for i in range(n)]


@pytest.mark.parametrize("batches", [1, 3, 7, 40, 1_000, 50_000, 500_000, 5_000_000])
@pytest.mark.parametrize("slots", [1, 2, 16, 500])
def test_shards_are_bounded_spread_and_cover_every_batch_once(batches, slots):
    cap = Budget(2000, 3).process
    count = shard_count(batches, slots, cap)
    assert 1 <= count <= min(batches, cap)
    assert count >= min(batches, slots)  # a small job still reaches every worker thread
    if batches >= slots * 4 and cap >= slots * 4:
        assert count % slots == 0  # whole waves: the last one keeps every worker busy
    if math.ceil(batches / MAX_BATCHES_PER_SHARD) <= cap - cap % slots:  # else the budget binds
        assert batches / count <= MAX_BATCHES_PER_SHARD
    if batches > 100_000:
        return  # the cut itself is checked on the smaller sizes
    shards = plan_shards(specs_of(batches), slots, cap)
    assert len(shards) == count
    flat = [s.batch_id for shard in shards for s in shard.specs]
    assert flat == [f"batch-{i:06d}" for i in range(batches)]  # each once, contiguous, in plan order
    sizes = {len(shard.specs) for shard in shards}
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("concurrency", [None, 2])
def test_waves_are_counted_over_the_configured_threads_when_items_run_concurrently(concurrency):
    # 2 Slurm workers x 1 thread. Items in flight together run two shards per thread (4 Dask threads), so one keeps
    # the calls going while the other changes shards; the job still gets 4 waves over its 2 threads: 8 task runs, not
    # 16 (each task run's start costs the worker CPU its calls in flight are waiting for).
    cfg = parse_config({"handler": "support.sample_handlers:counting", "input": {"uri": "in.jsonl"},
                        "cluster": {"kind": "slurm", "cores": 1, "processes": 1, "max_jobs": 2},
                        "concurrency": concurrency})
    slots, shards = plan_pass(cfg, specs_of(40), Budget.of(cfg).process)
    assert slots == (4 if concurrency else 2)
    assert len(shards) == 8 and [len(s.specs) for s in shards] == [5] * 8


@pytest.mark.parametrize("concurrency", [None, 2])
def test_the_embedded_cluster_runs_one_wave_when_items_run_concurrently(job, concurrency):
    # 2 local workers x 1 thread, all started together. Items in flight: one shard per Dask thread (4 of 10), as no
    # worker comes late and every shard change costs the calls in flight some CPU. One at a time: 4 waves as before.
    cfg, _, _, _ = job()
    cfg = cfg.model_copy(update={"concurrency": concurrency})
    slots, shards = plan_pass(cfg, specs_of(40), Budget.of(cfg).process)
    assert (slots, [len(s.specs) for s in shards]) == ((4, [10] * 4) if concurrency else (2, [5] * 8))


def test_a_job_run_stays_within_its_task_run_budget():
    for total, rounds in [(2000, 3), (2000, 0), (20, 3), (100, 10)]:
        b = Budget(total, rounds)
        assert b.aggregate + b.process + b.retry_round * (rounds + 1) <= total, (total, rounds)
    assert Budget(2000, 3).process == 950


def test_only_uncommitted_batches_are_cut_into_shards():
    specs = specs_of(40)
    committed = {f"batch-{i:06d}" for i in (0, 1, 2, 17, 30, 39)}
    shards = plan_shards([s for s in specs if s.batch_id not in committed], 2, 100)
    flat = [s.batch_id for shard in shards for s in shard.specs]
    assert sorted(flat) == sorted(s.batch_id for s in specs if s.batch_id not in committed)
    assert len(flat) == len(set(flat)) == 34


@pytest.fixture
def job(tmp_path: Path):
    def make(n: int = 50, batch_size: int = 10, fmt: str = "jsonl", **params):
        if fmt == "csv":
            (tmp_path / "in.csv").write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(n)))
            uri = str(tmp_path / "in.csv")
        else:
            uri = str(write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)]))
        cfg = parse_config({"job_id": "shard", "handler": "support.sample_handlers:counting",
                            "input": {"uri": uri, "format": fmt}, "batch_size": batch_size,
                            "storage": {"uri": f"file://{tmp_path / 'store'}"},
                            "params": {"calls_file": str(tmp_path / "calls"), **params}})
        store = LocalManifestStore(root=str(tmp_path / "store"))
        with open(uri, "rb") as f:
            specs = partition(f, fmt, batch_size).batches
        return cfg, store, specs, str(tmp_path / "calls")
    return make


def test_a_fault_in_one_batch_leaves_the_others_committed_and_a_rerun_runs_only_it(job, monkeypatch):
    cfg, store, specs, calls_file = job()
    victim = Keys("shard").task("batch-000002")
    real_put = LocalManifestStore.put_json
    faults = iter([True])

    def put_json(self, key, body, if_absent=False):
        if key == victim and next(faults, False):
            raise OSError("store unreachable")
        return real_put(self, key, body, if_absent=if_absent)

    monkeypatch.setattr(LocalManifestStore, "put_json", put_json)
    reported: list[str] = []
    with pytest.raises(ShardIncomplete, match=r"1 of 5 batches did not commit: batch-000002: OSError"):
        run_shard(cfg, store, specs, check_commits=False, on_commit=lambda s: reported.append(s["batch_id"]))
    # each batch committed on its own, and was reported as it committed, in order
    assert reported == ["batch-000000", "batch-000001", "batch-000003", "batch-000004"]
    assert sorted(committed_batch_ids(store, "shard")) == reported
    assert len(calls(calls_file)) == 50

    # Prefect's retry of the shard reads the commits first: only batch 2's items run again.
    summaries = run_shard(cfg, store, specs, check_commits=True)
    assert [s["batch_id"] for s in summaries] == [s.batch_id for s in specs]
    again = [i for _, i in calls(calls_file)][50:]
    assert again == list(range(20, 30))
    counts = Counts()
    for s in summaries:
        counts.add(s)
    assert (counts.batches_done, counts.items_succeeded) == (5, 50)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_shard_reads_its_input_in_one_request(job, monkeypatch, fmt):
    cfg, store, specs, _ = job(fmt=fmt)
    reads: list[tuple[int, int]] = []
    real = LocalManifestStore.read_range

    def read_range(self, uri, start, end):
        reads.append((start, end))
        return real(self, uri, start, end)

    monkeypatch.setattr(LocalManifestStore, "read_range", read_range)
    run_shard(cfg, store, specs, check_commits=False)
    assert len(reads) == (2 if fmt == "csv" else 1)  # the slices' span (+ the CSV header, once)
    assert len(committed_batch_ids(store, "shard")) == 5
    reads.clear()
    run_batch(cfg, store, specs[0], check_commit=True)  # committed: one read of its commit, none of the input
    assert reads == []


@flow(name="shards-of-a-resumed-job", task_runner=ThreadPoolTaskRunner(max_workers=2))
def run_remaining(config: dict, storage_root: str) -> list[str]:
    from slurmctl.books.manifests import JobManifest
    from slurmctl.flows.process import run_batches

    cfg = parse_config(config)
    store = LocalManifestStore(root=storage_root)
    job = JobManifest(job_id=cfg.job_id, handler=cfg.handler, input={}, batch_size=cfg.batch_size, cluster={},
                      storage=storage_root, config=config)
    return run_batches(cfg, store, job, [BatchSpec.from_dict(s) for s in config["params"]["plan"]])


def test_a_resumed_run_cuts_only_the_uncommitted_batches(job, tmp_path, prefect_api):
    cfg, store, specs, calls_file = job(n=400, batch_size=10)
    done = {0, 1, 2, 17, 30, 39}
    for i in done:
        run_batch(cfg, store, specs[i], check_commit=False)
    config = {**cfg.model_dump(mode="json"), "params": {**cfg.params, "plan": [s.to_dict() for s in specs]}}
    with flows_reporting_to(prefect_api):
        state = run_remaining(config, str(tmp_path / "store"), return_state=True)
    assert state.is_completed() and state.result() == []
    # the committed batches' items were not called again; every other batch ran once
    assert sorted(i for _, i in calls(calls_file)) == list(range(400))
    runs = settled_task_runs(prefect_api, {str(state.state_details.flow_run_id)}, 8)
    # 34 uncommitted batches, 2 worker threads: 4 waves of 2 shards
    assert len(runs) == 8 and all(r.state.is_completed() for r in runs)
    sizes = [int(r.name.rsplit("(", 1)[1].rstrip(")")) for r in runs]
    assert sum(sizes) == 34
    assert not any(r.name.startswith(f"batch-{i:06d}") for r in runs for i in done)


def test_the_books_read_a_shards_commits_in_one_request(job, monkeypatch):
    cfg, store, specs, _ = job()
    run_shard(cfg, store, specs[:3], check_commits=False)
    run_batch(cfg, store, specs[3], check_commit=False)  # committed outside a shard: no commit log names it
    for s in specs[:3]:  # a log is used for commits listed as older than it: make sure they are (not the same tick)
        path = store.local_path(Keys("shard").task(s.batch_id))
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns - 5_000_000_000))
    one_by_one = [{k: v for k, v in store.get_json(Keys("shard").task(s.batch_id)).items() if k != "checksum"}
                  for s in specs[:4]]
    reads: list[str] = []
    real = LocalManifestStore.get_json

    def get_json(self, key):
        reads.append(key.split("/")[2])
        return real(self, key)

    monkeypatch.setattr(LocalManifestStore, "get_json", get_json)
    assert committed_tasks(store, "shard") == one_by_one  # the same manifests, in commit order
    assert sorted(reads) == ["commits", "tasks"]  # one commit log, and the one batch it does not hold


def test_a_shard_whose_worker_is_leaving_stops_between_batches_and_goes_back_as_a_lost_worker(job):
    from prefect.states import Failed

    from slurmctl.flows.process import is_worker_loss
    from slurmctl.tasks.process_shard import ShardAbandoned, retry_unless_abandoned

    cfg, store, specs, calls_file = job()
    asked = iter([True, True, False])
    with pytest.raises(ShardAbandoned) as err:
        run_shard(cfg, store, specs, check_commits=False, wanted=lambda: next(asked))
    assert sorted(committed_batch_ids(store, "shard")) == ["batch-000000", "batch-000001"]
    assert len(calls(calls_file)) == 20  # the third batch never started
    # not retried in place by Prefect; the coordinator re-queues its uncommitted batches like a dead worker's
    assert not retry_unless_abandoned(None, None, Failed(data=err.value))
    assert retry_unless_abandoned(None, None, Failed(data=OSError("store unreachable")))
    assert is_worker_loss(err.value)


def test_a_shard_whose_worker_nears_its_walltime_stops_between_batches_and_goes_back_as_a_retirement(job):
    from prefect.states import Failed

    from slurmctl.flows.process import is_worker_loss
    from slurmctl.tasks.process_shard import ShardRetiring, retry_unless_abandoned
    from slurmctl.walltime import WorkerClock

    cfg, store, specs, calls_file = job()
    now = [1000.0]
    # The job ends at 1100, retirement 10 s before; each batch "takes" 30 s of this clock.
    clock = WorkerClock(end=1100.0, margin_s=10.0, now=lambda: now[0])
    real_record = clock.record
    clock.record = lambda seconds: (now.__setitem__(0, now[0] + 30), real_record(30.0))
    with pytest.raises(ShardRetiring) as err:
        run_shard(cfg, store, specs, check_commits=False, clock=clock)
    # Batches start at 1000, 1030 and 1060 (the third ends at 1090, the retirement: it fits); a fourth would end
    # at 1120, so it is not started.
    assert sorted(committed_batch_ids(store, "shard")) == [f"batch-00000{i}" for i in range(3)]
    assert len(calls(calls_file)) == 30
    assert "retires" in str(err.value) and "Slurm job ends in 0 s" not in str(err.value)
    assert clock.retiring and clock.leave()  # the shard that heard it first makes the worker leave, once
    assert not clock.leave()
    assert not retry_unless_abandoned(None, None, Failed(data=err.value))  # back to the coordinator at once...
    assert not is_worker_loss(err.value)  # ...which does not count it as a lost worker
