"""A batch stopped mid-way by SIGTERM saves what it did and the next attempt runs only the rest
(``slurmctl.books.checkpoints``): run directly, no Prefect, no Dask, no Slurm."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.jobs import write_jsonl
from support.sample_handlers import calls

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books import checkpoints
from slurmctl.books.failures import committed_tasks, failure_state
from slurmctl.books.manifests import Keys
from slurmctl.config import parse_config
from slurmctl.records import partition
from slurmctl.tasks.process_batch import BatchHandedOn, run_batch
from slurmctl.tasks.process_shard import ShardPreempted, run_shard
from slurmctl.walltime import WorkerClock


@pytest.fixture
def job(tmp_path: Path):
    def make(n: int = 20, batch_size: int = 20, handler: str = "support.sample_handlers:counting", **extra):
        write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
        cfg = parse_config({"job_id": "ckpt", "handler": handler, "input": {"uri": str(tmp_path / "in.jsonl")},
                            "batch_size": batch_size, "storage": {"uri": f"file://{tmp_path / 'store'}"},
                            "errors": {"backoff_base_s": 0, "backoff_max_s": 0},
                            **{"params": {"calls_file": str(tmp_path / "calls")}, **extra}})
        store = LocalManifestStore(root=str(tmp_path / "store"))
        with open(tmp_path / "in.jsonl", "rb") as f:
            specs = partition(f, "jsonl", batch_size).batches
        return cfg, store, specs, str(tmp_path / "calls")
    return make


def handled(calls_file: str) -> Counter:
    return Counter(item for _, item in calls(calls_file))


def output_ids(store: LocalManifestStore, task: dict) -> list[int]:
    return pq.read_table(store.root + "/" + task["output"]).column("id").to_pylist()


def test_sigterm_mid_batch_saves_the_items_done_and_the_next_attempt_runs_only_the_rest(job):
    cfg, store, [spec], calls_file = job(params={"fail": {"2": "not_found"}})
    cfg.params["calls_file"] = calls_file
    with pytest.raises(BatchHandedOn, match="7 of its 20 items saved"):
        run_batch(cfg, store, spec, sleep=lambda s: None, halted=lambda: len(calls(calls_file)) >= 7)
    assert store.get_json(Keys("ckpt").task(spec.batch_id)) is None  # not committed: handed on
    assert sorted(handled(calls_file)) == list(range(7))

    summary = run_batch(cfg, store, spec, sleep=lambda s: None)  # the re-queued attempt (commit check on)
    assert handled(calls_file) == Counter(range(20))  # every item's handler ran once, over two attempts
    assert (summary["items_succeeded"], summary["items_failed"], summary["rows_written"]) == (19, 1, 19)
    assert summary["api_calls"] == 20  # the checkpoint's calls count too (budgets)
    [task] = committed_tasks(store, "ckpt")
    assert task["items_resumed"] == 7 and task["checkpoint"].endswith("/0001.json")
    assert output_ids(store, task) == [i for i in range(20) if i != 2]  # once each, in input order
    assert [r["id"] for r in failure_state(store, [task]).values()] == [2]  # the checkpoint's failure is kept


def test_a_batch_stopped_twice_carries_its_first_checkpoint_into_the_second(job):
    cfg, store, [spec], calls_file = job()
    with pytest.raises(BatchHandedOn):
        run_batch(cfg, store, spec, halted=lambda: len(calls(calls_file)) >= 5)
    with pytest.raises(BatchHandedOn, match="12 of its 20 items saved"):
        run_batch(cfg, store, spec, halted=lambda: len(calls(calls_file)) >= 12)
    run_batch(cfg, store, spec)
    assert handled(calls_file) == Counter(range(20))
    [task] = committed_tasks(store, "ckpt")
    assert task["items_resumed"] == 12 and task["checkpoint"].endswith("/0002.json")
    assert output_ids(store, task) == list(range(20))


def test_a_first_execution_without_the_commit_check_ignores_checkpoints_and_still_commits_each_item_once(job):
    cfg, store, [spec], calls_file = job()
    with pytest.raises(BatchHandedOn):
        run_batch(cfg, store, spec, halted=lambda: len(calls(calls_file)) >= 5)
    run_batch(cfg, store, spec, check_commit=False)
    [task] = committed_tasks(store, "ckpt")
    assert task["items_resumed"] == 0 and output_ids(store, task) == list(range(20))
    assert checkpoints.checkpointed_batches(store, "ckpt") == {spec.batch_id}  # so the coordinator checks it


def test_items_in_flight_past_the_grace_are_cut_off_and_run_again(job, tmp_path: Path):
    marker = tmp_path / "stalled"
    cfg, store, [spec], calls_file = job(handler="support.sample_handlers:counting_async", concurrency=4,
                                         params={"sleep_s": 0.01,
                                                 "stall_once": {"id": 5, "marker": str(marker), "seconds": 600}})
    cfg.params["calls_file"] = calls_file
    halted_at: list[float] = []

    def halted() -> bool:
        if marker.exists() and not halted_at:
            halted_at.append(time.monotonic())
        return bool(halted_at)

    started = time.monotonic()
    with pytest.raises(BatchHandedOn):
        run_batch(cfg, store, spec, halted=halted, grace_deadline=lambda: halted_at[0] + 0.3 if halted_at else None)
    assert time.monotonic() - started < 30  # item 5 (stalled for 600 s) was cut off at the grace, not waited for
    saved = checkpoints.latest(store, "ckpt", spec.batch_id, committed_digest(store, cfg, spec))
    ids_done = {line - 1 for line in saved.done}  # item i is on line i + 1
    assert 5 not in ids_done and {0, 1, 2, 3, 4} <= ids_done

    run_batch(cfg, store, spec)
    counts = handled(calls_file)
    assert counts[5] == 2 and all(counts[i] == 1 for i in range(20) if i != 5), counts  # only the cut-off item
    [task] = committed_tasks(store, "ckpt")
    assert output_ids(store, task) == list(range(20))


def committed_digest(store, cfg, spec) -> str:
    from slurmctl.records import read_batch

    return read_batch(store.open_uri, store.read_range, cfg.input.uri, "jsonl", spec, "id").digest


def test_two_attempts_saving_the_same_checkpoint_number_keep_one(job):
    cfg, store, [spec], _ = job()
    first = checkpoints.Checkpoint(spec.batch_id, "sha256:x", {1}, 1, [{"id": 0}], [1], [0])
    assert checkpoints.save(store, "ckpt", first).endswith("/0001.json")
    assert checkpoints.save(store, "ckpt", first) is None  # the loser's rows are removed too
    folder = Path(store.root, "jobs/ckpt/checkpoints", spec.batch_id)
    assert [p.name for p in folder.glob("*.json")] == ["0001.json"] and len(list(folder.glob("*.parquet"))) == 1


def test_a_shard_whose_worker_got_sigterm_hands_back_the_stopped_batch_and_the_rest(job):
    cfg, store, specs, calls_file = job(n=60, batch_size=20)
    clock = WorkerClock(None)
    original = clock.halted
    clock.halted = lambda: len(calls(calls_file)) >= 25 and (clock.terminate() or original())  # SIGTERM in batch 2
    with pytest.raises(ShardPreempted, match="items saved"):
        run_shard(cfg, store, specs, clock=clock)
    assert [t["batch_id"] for t in committed_tasks(store, "ckpt")] == [specs[0].batch_id]
    assert len(calls(calls_file)) == 25  # batch 2 stopped after its 5th item, batch 3 never started
    run_shard(cfg, store, specs[1:], check_commits=True)
    assert handled(calls_file) == Counter(range(60))
