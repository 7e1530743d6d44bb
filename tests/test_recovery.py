"""Exactly once under failure, end to end: resume after the coordinator is SIGKILLed, a worker SIGKILLed mid-batch,
re-submits that never call the handler twice, and retry rounds by error class. Real Prefect server, real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from support.jobs import (
    assert_exactly_once,
    committed_tasks,
    current_status,
    job_manifest,
    log_tail,
    log_text,
    output_ids,
    run_cli,
    status,
    wait_for,
    wait_until_ended,
    write_config,
    write_jsonl,
)
from support.prefect_runs import flows_reporting_to, job_artifacts, settled_task_runs, task_run_state
from support.sample_handlers import calls

from slurmctl.books.admission import create_job
from slurmctl.books.manifests import Counts, Keys, TaskManifest, now
from slurmctl.books.store import load_job, read_plan, store_for
from slurmctl.config import parse_config
from slurmctl.flows.process import run_batches
from slurmctl.flows.runners import task_runner_for
from slurmctl.records import partition
from slurmctl.tasks.process_batch import run_batch

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def make_job(tmp_path: Path, job_id: str, n: int, batch_size: int, **params) -> Path:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    return write_config(tmp_path / "job.yaml", job_id=job_id, handler="support.sample_handlers:counting",
                        input={"uri": "in.jsonl"}, batch_size=batch_size, storage={"uri": "state"},
                        max_in_flight=4, batch_retries=0,
                        params={"calls_file": str(tmp_path / "calls"), **params},
                        errors={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "retry_cooldown_s": 0.5})


@flow(name="resubmit-batches")
def resubmit_batches(job_id: str, storage: dict[str, Any]) -> dict[str, Any]:
    """Submit every planned batch of a job again, in shards that read each batch's commit first (as a re-queued or
    retried shard does), as a coordinator that believes nothing is committed would (``done=set()``); return the
    counters folded from the shards' summaries."""
    store = store_for(storage)
    job = load_job(store, job_id)
    job.counts = Counts(batches_total=job.counts.batches_total, items_total=job.counts.items_total)
    failed = run_batches(parse_config(job.config), store, job, read_plan(store, job_id), done=set(),
                         check_commits=True)
    return {"failed": failed, "counts": job.counts.model_dump()}


def cached_summaries(store: Path, job_id: str) -> list[list[dict[str, Any]]]:
    """The shard results Prefect persisted in the job's store (its cache records): one list of batch summaries per
    shard."""
    records = [json.loads(p.read_bytes()) for p in sorted((store / "jobs" / job_id / "cache").iterdir())]
    return [json.loads(r["result"]) if isinstance(r["result"], str) else r["result"] for r in records]


def test_committed_batches_never_call_the_handler_again(tmp_path, prefect_api, slurmctl_home):
    cfg = make_job(tmp_path, "no-rerun", 200, 20)
    assert run_cli("submit", str(cfg), "--wait").returncode == 0, log_tail(slurmctl_home, "no-rerun")
    store, calls_file = tmp_path / "state", str(tmp_path / "calls")
    assert len(calls(calls_file)) == 200
    done = job_manifest(store, "no-rerun")["counts"]
    cache = store / "jobs/no-rerun/cache"
    assert len(list(cache.iterdir())) == 8  # each shard's result persisted in the job's own store (10 batches)

    # 1. The coordinator: `resume --force` of a completed job lists the commits and submits no batch at all.
    result = run_cli("resume", "no-rerun", "--force", "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "no-rerun")
    assert len(calls(calls_file)) == 200
    assert_exactly_once(status("no-rerun"), range(200))

    # 2. The task itself: every batch submitted again (a re-queued shard, a Dask re-run), with the Prefect cache
    # records gone so the cache cannot answer first. run_batch finds each batch's commit and calls nothing.
    shutil.rmtree(cache)
    storage = {"uri": f"file://{store}"}
    runner = task_runner_for(parse_config(job_manifest(store, "no-rerun")["config"]).cluster, job_id="no-rerun")
    with flows_reporting_to(prefect_api):
        first = resubmit_batches.with_options(task_runner=runner)("no-rerun", storage, return_state=True)
    assert first.is_completed(), first
    out = first.result()
    assert out["failed"] == [] and len(calls(calls_file)) == 200
    summaries = [s for shard in cached_summaries(store, "no-rerun") for s in shard]
    assert len(summaries) == 10 and all(s["already_committed"] for s in summaries), summaries
    # each summary is the committed batch's (not an empty "duplicate"): the counters add up to the job's
    assert {k: out["counts"][k] for k in ("batches_done", "items_succeeded", "rows_written")} == {
        k: done[k] for k in ("batches_done", "items_succeeded", "rows_written")}
    runs = [r for r in settled_task_runs(prefect_api, {str(first.state_details.flow_run_id)}, 8)
            if r.name.startswith("batch-")]
    assert len(runs) == 8 and {r.state.name for r in runs} == {"Completed"}  # ran: no cache hit

    # 3. With its records present, the Prefect cache answers before the task body runs at all.
    with flows_reporting_to(prefect_api):
        second = resubmit_batches.with_options(task_runner=runner)("no-rerun", storage, return_state=True)
    assert second.is_completed() and second.result()["failed"] == []
    runs = [r for r in settled_task_runs(prefect_api, {str(second.state_details.flow_run_id)}, 8)
            if r.name.startswith("batch-")]
    assert len(runs) == 8 and {r.state.name for r in runs} == {"Cached"}
    assert len(calls(calls_file)) == 200


def test_coordinator_sigkill_then_resume_finishes_exactly_once(tmp_path, prefect_api, slurmctl_home):
    n, batch_size, max_in_flight = 400, 10, 4
    cfg = make_job(tmp_path, "kill-coord", n, batch_size, sleep_s=0.02)
    assert run_cli("submit", str(cfg)).returncode == 0
    store = tmp_path / "state"
    job = wait_for(lambda: (j := job_manifest(store, "kill-coord"))["counts"]["batches_done"] >= 8 and j, 240,
                   "8 committed batches")
    os.kill(job["coordinator_pid"], signal.SIGKILL)
    committed_at_kill = len(committed_tasks(store, "kill-coord"))

    result = run_cli("resume", "kill-coord", "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "kill-coord")
    view = status("kill-coord")
    assert view["status"] == "completed" and view["items_succeeded"] == n
    assert_exactly_once(view, range(n))
    handler_calls = len(calls(str(tmp_path / "calls")))
    assert n <= handler_calls <= n + max_in_flight * batch_size, (handler_calls, committed_at_kill)


def test_worker_sigkill_mid_shard_loses_only_its_uncommitted_batches(tmp_path, prefect_api, slurmctl_home):
    # 40 batches of 10 on 2 worker threads: 8 shards of 5 batches. Item 77 is in batch 7, the third batch of the
    # shard batch-000005..000009: when its worker is killed there, batches 5 and 6 are committed and must not run
    # again; batches 7-9 are queued again (batch 7 ran up to item 77 in the dead worker).
    n, batch_size, stalled = 400, 10, 77
    victim_batch, shard = "batch-000007", "batch-000005..000009 (5)"
    marker = tmp_path / "stalled-pid"
    # batch_retries: 0 — a retry counted against the shard would fail the job
    cfg = make_job(tmp_path, "kill-worker", n, batch_size, sleep_s=0.005,
                   stall_once={"id": stalled, "marker": str(marker), "seconds": 600})
    assert run_cli("submit", str(cfg)).returncode == 0
    store, calls_file = tmp_path / "state", str(tmp_path / "calls")
    victim = int(wait_for(lambda: marker.exists() and marker.read_text().strip(), 240,
                          f"a worker to stall inside {victim_batch}"))

    # The victim is one of this job's Dask worker processes (spawned under the coordinator, not the coordinator),
    # it is inside the handler of a batch that has not committed, and its shard's first two batches are committed.
    coordinator = job_manifest(store, "kill-worker")["coordinator_pid"]
    assert victim != coordinator and coordinator in {p.pid for p in psutil.Process(victim).parents()}
    committed = committed_tasks(store, "kill-worker")
    assert victim_batch not in committed and {"batch-000005", "batch-000006"} <= set(committed)
    # And Prefect shows its shard Running: the worker's events about it have reached the server. Killed before they
    # do (the shard started a moment ago), it would leave no task run to end in Prefect at all.
    shard_run = committed["batch-000005"]["task_run_id"]
    wait_for(lambda: task_run_state(prefect_api, shard_run, missing_ok=True) == "RUNNING", 60,
             "Prefect to show the stalled shard's task run Running")
    os.kill(victim, signal.SIGKILL)

    view = wait_until_ended("kill-worker")
    assert view["status"] == "completed", view["error"] + log_tail(slurmctl_home, "kill-worker")
    assert_exactly_once(view, range(n))
    # Only the uncommitted batches ran again: items 70-77 of batch 7 twice (the second time in another process),
    # every other item once.
    ids = [item for _, item in calls(calls_file)]
    twice = sorted(i for i in set(ids) if ids.count(i) == 2)
    assert twice == list(range(70, 78)) and len(ids) == n + 8, twice
    callers = [pid for pid, item in calls(calls_file) if item == stalled]
    assert callers[0] == victim and callers[1] != victim, callers
    tasks = committed_tasks(store, "kill-worker")
    assert len(tasks) == n // batch_size and tasks[victim_batch]["items_succeeded"] == batch_size
    assert tasks["batch-000005"]["task_run_id"] == tasks["batch-000006"]["task_run_id"] != \
        tasks[victim_batch]["task_run_id"]
    # The killed shard's task run says so in Prefect (Crashed), instead of Running forever (prefect#12969).
    assert task_run_state(prefect_api, tasks["batch-000005"]["task_run_id"]) == "CRASHED"
    # It came back through the coordinator's requeue of the KilledWorker (not a shard retry: there are none), which
    # the job manifest counts and the log names.
    assert job_manifest(store, "kill-worker")["worker_loss_requeues"] >= 1
    assert re.search(rf"shard {re.escape(shard)} lost its worker \(KilledWorker.* 3 of its 5 batches uncommitted",
                     log_text(slurmctl_home, "kill-worker"))


def test_status_counters_move_as_batches_commit_inside_a_shard(tmp_path, prefect_api, slurmctl_home):
    # One worker thread, 8 batches: 4 shards of 2. The first shard holds in its second batch (item 15): its first
    # batch has committed, and status must already count it while the shard's task run is still running.
    marker, release = tmp_path / "held", tmp_path / "release"
    cfg = make_job(tmp_path, "progress", 80, 10, hold={"id": 15, "marker": str(marker), "release": str(release)})
    config = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**config, "cluster": {"kind": "local", "n_workers": 1}}))
    assert run_cli("submit", str(cfg)).returncode == 0
    store = tmp_path / "state"
    try:
        wait_for(marker.exists, 240, "the shard to hold inside its second batch")
        assert set(committed_tasks(store, "progress")) == {"batch-000000"}
        view = wait_for(lambda: (v := current_status("progress"))["batches_done"] >= 1 and v, 30,
                        "status to count the shard's first committed batch")
        assert (view["batches_done"], view["items_succeeded"], view["status"]) == (1, 10, "running")
        # the Prefect UI shows it too: the job's progress artifact (1 of 8 batches) and its status table
        arts = wait_for(lambda: (a := job_artifacts(prefect_api, view["flow_run_id"])).get("progress-progress")
                        and a["progress-progress"].data > 0 and a, 30, "the progress artifact to move")
        assert arts["progress-progress"].data == 12.5 and "1 of 8 batches" in arts["progress-progress"].description
        assert "| batches | 1 of 8 (12.5 %) |" in arts["progress-status"].data
    finally:
        release.touch()  # never leave the job holding
    view = wait_until_ended("progress")
    assert view["status"] == "completed" and view["batches_done"] == 8
    assert_exactly_once(view, range(80))


def test_retry_by_error_class_and_analyze_errors(tmp_path, prefect_api, slurmctl_home):
    fail_file = tmp_path / "fail.json"
    fail_file.write_text(json.dumps({"3": "network", "14": "network", "27": "not_found", "33": "server"}))
    cfg = make_job(tmp_path, "retry-cls", 60, 10, fail_file=str(fail_file))
    assert run_cli("submit", str(cfg), "--wait").returncode == 0, log_tail(slurmctl_home, "retry-cls")
    view = status("retry-cls")
    assert (view["items_succeeded"], view["items_failed"]) == (56, 4)

    report = json.loads(run_cli("analyze-errors", "retry-cls", "--json").stdout)
    assert report["classes"] == {"network": 2, "not_found": 1, "server": 1}
    assert {m["error_class"]: m["count"] for m in report["top_messages"]}["network"] == 2
    assert sorted(sum((m["example_ids"] for m in report["top_messages"]), [])) == [3, 14, 27, 33]
    human = run_cli("analyze-errors", "retry-cls")
    assert "retry them with: slurmctl retry retry-cls --errors=" in human.stdout

    fail_file.write_text(json.dumps({"27": "not_found"}))  # the API recovered; 27 really does not exist
    before = len(calls(str(tmp_path / "calls")))
    result = run_cli("retry", "retry-cls", "--errors=network,server", "--wait")
    assert result.returncode == 0, result.stderr + log_tail(slurmctl_home, "retry-cls")
    assert len(calls(str(tmp_path / "calls"))) - before == 3  # only the 3 items of those classes ran again
    view = status("retry-cls")
    assert (view["items_succeeded"], view["items_failed"], view["status"]) == (59, 1, "completed")
    ids = output_ids(view)
    assert sorted(ids) == [i for i in range(60) if i != 27] and len(ids) == len(set(ids))
    failures = [json.loads(line) for line in (tmp_path / "state/jobs/retry-cls/failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["error_class"]) for f in failures] == [(27, "not_found")]
    job = job_manifest(tmp_path / "state", "retry-cls")
    assert [(r["round"], r["classes"], r["items"]) for r in job["retry_rounds"]] == [(1, ["network", "server"], 3)]


@flow(name="process-a-plan", task_runner=ThreadPoolTaskRunner(max_workers=2))
def process_plan(job_id: str, storage: dict[str, Any]) -> list[str]:
    """A pass over a job's whole plan as the process phase makes it, on threads: ``run_batches`` lists the
    commits (and the failure markers) itself."""
    store = store_for(storage)
    job = load_job(store, job_id)
    return run_batches(parse_config(job.config), store, job, read_plan(store, job_id))


def mark_failed(store: Any, job_id: str, batch_id: str) -> None:
    """The marker ``fail_uncommitted`` leaves for a batch whose shard failed for good."""
    store.put_json(Keys(job_id).failed_task(batch_id), TaskManifest(
        job_id=job_id, batch_id=batch_id, task_id=batch_id, status="failed", started_at=now(), finished_at=now(),
        error="OSError: store unreachable").model_dump(mode="json"))


def test_a_failure_marker_goes_once_its_batch_commits(tmp_path, prefect_api):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(30)])
    cfg = parse_config({"job_id": "markers", "handler": "support.sample_handlers:counting",
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": 10,
                        "storage": {"uri": f"file://{tmp_path / 'state'}"},
                        "params": {"calls_file": str(tmp_path / "calls")}})
    create_job(cfg, None)
    store = store_for(cfg.storage)
    with open(tmp_path / "in.jsonl", "rb") as f:
        specs = partition(f, "jsonl", 10).batches
    store.put_bytes(Keys("markers").plan, b"".join(json.dumps(s.to_dict()).encode() + b"\n" for s in specs))
    for spec in specs[:2]:
        mark_failed(store, "markers", spec.batch_id)  # an earlier pass failed batches 0 and 1 for good
    run_batch(cfg, store, specs[0])  # batch 0 was committed since (the next pass lists it committed)
    with flows_reporting_to(prefect_api):
        state = process_plan("markers", {"uri": f"file://{tmp_path / 'state'}"}, return_state=True)
    assert state.is_completed() and state.result() == []
    tasks = tmp_path / "state" / "jobs" / "markers" / "tasks"
    assert sorted(committed_tasks(tmp_path / "state", "markers")) == [s.batch_id for s in specs]
    assert [p.name for p in tasks.glob("*.failed.json")] == []  # 0: at the pass's start; 1: once it committed


class CancelledAfterACommit:
    """Stands in for the coordinator's ``CancelWatch``: a cancellation asked for as soon as a batch committed."""

    def __init__(self, store: Any, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def check(self) -> None:
        from slurmctl.books.failures import committed_batch_ids
        from slurmctl.flows.cancel import JobCancelled

        if committed_batch_ids(self.store, self.job_id):
            raise JobCancelled("cancelled by the test")


def test_a_cancelled_pass_leaves_the_counts_of_the_commits_it_saw(tmp_path, prefect_api, monkeypatch):
    # The counters are written every HEARTBEAT_S; a cancel between two writes must not leave the cancelled job
    # saying fewer batches are done than the coordinator counted (status reads them; seen: 0 done after 4 commits).
    import slurmctl.flows.process as process
    from slurmctl.flows import cancel

    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(30)])
    cfg = parse_config({"job_id": "cancel-counts", "handler": "support.sample_handlers:counting",
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": 10,
                        "storage": {"uri": f"file://{tmp_path / 'state'}"}})
    create_job(cfg, None)
    store = store_for(cfg.storage)
    with open(tmp_path / "in.jsonl", "rb") as f:
        specs = partition(f, "jsonl", 10).batches
    store.put_bytes(Keys("cancel-counts").plan, b"".join(json.dumps(s.to_dict()).encode() + b"\n" for s in specs))
    monkeypatch.setattr(process, "HEARTBEAT_S", 1e6)  # no write of the counters is due during the pass
    monkeypatch.setitem(cancel._live, "cancel-counts", CancelledAfterACommit(store, "cancel-counts"))
    with flows_reporting_to(prefect_api):
        state = process_plan("cancel-counts", {"uri": f"file://{tmp_path / 'state'}"}, return_state=True)
    assert not state.is_completed(), state  # the pass stopped
    done = load_job(store, "cancel-counts").counts
    assert done.batches_done >= 1 and done.items_succeeded == 10 * done.batches_done, (done, state)


class _StoppedAfter:
    """A Slurm worker's walltime clock (``slurmctl.walltime.WorkerClock``) whose SIGTERM comes once ``n`` calls ran."""

    def __init__(self, calls_file: str, n: int) -> None:
        self.calls_file, self.n, self.terminated = calls_file, n, False

    def fits(self) -> bool:
        return True

    def halted(self) -> bool:
        self.terminated = self.terminated or len(calls(self.calls_file)) >= self.n
        return self.terminated

    def grace_deadline(self) -> float | None:
        return None

    def record(self, seconds: float) -> None:
        pass

    def leave(self) -> bool:  # no Dask worker here to retire
        return False


def test_a_shard_dask_runs_again_after_its_result_was_lost_resumes_from_the_checkpoint(tmp_path, prefect_api,
                                                                                       monkeypatch):
    # A worker got SIGTERM mid-batch: its batch saved a checkpoint of 5 items and the shard ended; the SIGKILL that
    # followed took the shard's result with the worker, so Dask ran the same task run again on another worker (lost
    # data: allowed-failures does not apply, and Prefect counts a first run). The review saw the saved items called
    # twice. The same task run id, executed twice in this process, as Dask's worker runs it (prefect_dask.client).
    import uuid

    from prefect.task_engine import run_task_sync

    from slurmctl.books.shards import Shard
    from slurmctl.tasks import process_shard as shard_task

    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(20)])
    calls_file, run_id = str(tmp_path / "calls"), uuid.uuid4()
    job_id = f"relost-{run_id.hex[:8]}"  # the shard's cache record is kept in Prefect's home: a job of its own
    cfg = parse_config({"job_id": job_id, "handler": "support.sample_handlers:counting",
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "batch_size": 20,
                        "storage": {"uri": f"file://{tmp_path / 'store'}"}, "params": {"calls_file": calls_file}})
    store = store_for(cfg.storage)
    with open(tmp_path / "in.jsonl", "rb") as f:
        [spec] = partition(f, "jsonl", 20).batches
    parameters = {"cfg": cfg, "store": store, "shard": Shard((spec,)).to_dict(), "check_commits": False}

    @flow(name="lost-result")
    def run_twice() -> tuple[Any, list[int], Any]:
        monkeypatch.setattr(shard_task, "clock_for", lambda cfg: _StoppedAfter(calls_file, 5))
        first = run_task_sync(shard_task.process_shard, task_run_id=run_id, parameters=parameters,
                              return_type="state")
        called = sorted(item for _, item in calls(calls_file))
        monkeypatch.setattr(shard_task, "clock_for", lambda cfg: None)
        return first, called, run_task_sync(shard_task.process_shard, task_run_id=run_id, parameters=parameters,
                                            return_type="state")

    with flows_reporting_to(prefect_api):
        first, called, again = run_twice()
    assert first.is_failed() and "SIGTERM" in str(first.message) and called == list(range(5)), (first, called)
    assert again.is_completed(), again
    assert sorted(item for _, item in calls(calls_file)) == list(range(20))  # each item's handler ran once
    [task] = committed_tasks(tmp_path / "store", job_id).values()
    assert task["items_resumed"] == 5 and task["checkpoint"], task
