"""Cancelling a running job — from the Prefect UI/API or ``slurmctl cancel`` — stops it between batches, closes its
Dask cluster, leaves no Slurm job behind, says ``cancelled`` in the job manifest, and keeps every commit:
``slurmctl resume`` then finishes it with every item exactly once."""

from __future__ import annotations

import subprocess

import pytest
from support.jobs import (
    assert_exactly_once,
    committed_tasks,
    held_job,
    job_manifest,
    log_tail,
    run_cli,
    status,
    wait_for,
    write_jsonl,
)
from support.prefect_runs import cancel_flow_run, job_flow_run_states, job_task_run_states
from support.sample_handlers import calls

from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.store import load_job, new_job_manifest, save_job
from slurmctl.config import parse_config
from slurmctl.flows import process
from slurmctl.records import partition
from slurmctl.tasks.process_batch import run_batch


def test_slurmctl_cancel_stops_the_job_and_resume_finishes_it(tmp_path, prefect_api, slurmctl_home):
    cfg, marker, release = held_job(tmp_path, "cancel-cli", 60)
    assert run_cli("submit", str(cfg)).returncode == 0
    try:
        wait_for(marker.exists, 240, "the job to hold in its third batch")
        out = run_cli("cancel", "cancel-cli", timeout=180)
        assert out.returncode == 0, out.stderr + log_tail(slurmctl_home, "cancel-cli")
        assert "cancelled: 2/6 batches committed and kept, 0 Slurm jobs left" in out.stderr
    finally:
        release.touch()
    view = status("cancel-cli")
    assert view["status"] == "cancelled" and "slurmctl resume cancel-cli" in view["error"]
    assert set(committed_tasks(tmp_path / "state", "cancel-cli")) == {"batch-000000", "batch-000001"}
    # The Prefect UI shows the run and the phase it stopped in as Cancelled, not Failed.
    states = wait_for(lambda: (s := job_flow_run_states(prefect_api, view["flow_run_id"]))["cancel-cli"]
                      == "CANCELLED" and s, 30, "the flow run to be Cancelled")
    assert states["cancel-cli / process"] == "CANCELLED" and states["cancel-cli / partition"] == "COMPLETED"
    assert "cancel-cli / aggregate" not in states
    # The shard that was holding ends Cancelled: no task run is left Running (prefect#12969).
    task_states = job_task_run_states(prefect_api, view["flow_run_id"])
    assert "CANCELLED" in task_states and not {"RUNNING", "PENDING"} & set(task_states), task_states

    # A second cancel has nothing to do; resume continues from the two commits.
    assert "not running (status cancelled)" in run_cli("cancel", "cancel-cli").stderr
    assert run_cli("resume", "cancel-cli", "--wait").returncode == 0, log_tail(slurmctl_home, "cancel-cli")
    view = status("cancel-cli")
    assert view["status"] == "completed" and view["batches_done"] == 6
    assert_exactly_once(view, range(60))
    assert not any(i < 20 for _, i in calls(str(tmp_path / "calls"))[20:])  # committed batches never ran again


@pytest.mark.slurm
def test_cancel_from_the_prefect_api_on_slurm_leaves_no_slurm_job(tmp_path, prefect_api, slurmctl_home, slurm):
    from test_slurm import slurm_config, worker_jobs

    n = 300
    cfg = slurm_config(tmp_path, "cancel-slurm", n)
    assert run_cli("submit", str(cfg)).returncode == 0
    wait_for(lambda: len(calls(str(tmp_path / "calls"))) >= 40, 300, "batches running on Slurm workers")
    assert worker_jobs("cancel-slurm")
    flow_run_id = job_manifest(tmp_path / "state", "cancel-slurm")["flow_run_id"]
    cancel_flow_run(prefect_api, flow_run_id)  # the UI's Cancel button

    def stopped() -> bool:
        left = subprocess.run(["squeue", "-h", "--name", "slurmctl-cancel-slurm", "-o", "%i"], capture_output=True,
                              text=True, timeout=30).stdout.split()
        return not left and status("cancel-slurm")["status"] == "cancelled"
    wait_for(stopped, 30, "0 Slurm jobs of the run left and the job cancelled")
    wait_for(lambda: job_flow_run_states(prefect_api, flow_run_id)["cancel-slurm"] == "CANCELLED", 30,
             "the flow run to be Cancelled")
    done_before = status("cancel-slurm")["batches_done"]
    assert 0 < done_before < 30

    assert run_cli("resume", "cancel-slurm", "--wait", timeout=900).returncode == 0, \
        log_tail(slurmctl_home, "cancel-slurm")
    view = status("cancel-slurm")
    assert view["status"] == "completed" and view["batches_done"] == 30
    assert_exactly_once(view, range(n))


@pytest.mark.slurm
def test_the_cancellation_hook_finds_the_jobs_slurm_jobs_by_name(tmp_path, slurm):
    """Prefect may run ``on_cancellation`` in a deployment worker, after it killed the coordinator: no cluster
    object there, only the flow run. The hook still cancels every Slurm job named after the job, and records the
    cancellation."""
    from types import SimpleNamespace

    from prefect.states import Cancelling

    from slurmctl.books.store import new_job_manifest, save_job, store_for
    from slurmctl.config import parse_config
    from slurmctl.flows.cancel import on_cancellation

    cfg = parse_config({"job_id": "hook-test", "handler": "slurmctl.handlers.echo:handle",
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "storage": {"uri": str(tmp_path / "state")},
                        "cluster": {"kind": "slurm", "queue": "debug"}})
    job = new_job_manifest(cfg, None)
    job.status = "running"
    save_job(store_for(cfg.storage), job)
    for _ in range(2):  # two worker jobs, as dask-jobqueue names them
        subprocess.run(["sbatch", "--job-name", "slurmctl-hook-test", "--output", "/dev/null", "--wrap", "sleep 600"],
                       check=True, capture_output=True, timeout=60)
    queued = lambda: subprocess.run(["squeue", "-h", "--name", "slurmctl-hook-test", "-o", "%i"],  # noqa: E731
                                    capture_output=True, text=True, timeout=30).stdout.split()
    assert len(queued()) == 2
    run = SimpleNamespace(id="00000000-0000-0000-0000-000000000000", expected_start_time=None,
                          parameters={"job_id": "hook-test", "storage": cfg.storage.model_dump()})
    on_cancellation(None, run, Cancelling())
    wait_for(lambda: not queued(), 30, "the Slurm jobs named after the job to leave the queue")
    assert status("hook-test", "--storage", str(tmp_path / "state"))["status"] == "cancelled"


# The coordinator of the embedded default, as `slurmctl submit` starts it: no PREFECT_API_URL in its environment,
# the local server's URL put in Prefect's settings context when the job starts (slurmctl.cli.coordinator).
_WATCH_WITH_THE_COORDINATORS_SETTINGS = """
import sys, time
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling
from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.flows.cancel import CancelWatch

@flow(name="watched")
def watched():
    pass

with temporary_settings(updates={PREFECT_API_URL: sys.argv[1]}):
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(watched)
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    watch = CancelWatch(LocalManifestStore(root=sys.argv[2]), "ctx-job", str(run.id), interval_s=0.5).start()
    deadline = time.monotonic() + 60
    while watch.reason is None and time.monotonic() < deadline:
        time.sleep(0.2)
    watch.stop()
    print(watch.reason)
"""


def test_the_cancel_watch_asks_the_api_the_coordinator_uses(tmp_path, prefect_api):
    """The watch polls from its own thread; it must ask the server the flow runs on, not a throwaway one."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([sys.executable, "-c", _WATCH_WITH_THE_COORDINATORS_SETTINGS, prefect_api,
                             str(tmp_path / "state")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting temporary server" not in result.stderr
    assert result.stdout.strip() == "its flow run was cancelled in Prefect (Cancelling)", (
        result.stdout + result.stderr[-2000:])


def test_a_batch_that_commits_after_the_coordinator_stopped_waiting_is_counted(tmp_path):
    # A cancel: the pass stops waiting with shards running, and their workers stop after. A batch that committed in
    # between was missing from the job manifest's counts (status said 2 batches where 3 had committed) until a
    # resume recounted. Once the workers are gone, the job flow counts those batches; a batch that did not commit
    # runs at resume.
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(15)])
    store = LocalManifestStore(root=str(tmp_path / "state"))
    cfg = parse_config({"job_id": "late", "handler": "slurmctl.handlers.echo:handle", "batch_size": 5,
                        "input": {"uri": str(tmp_path / "in.jsonl")}, "storage": {"uri": store.root}})
    with open(tmp_path / "in.jsonl", "rb") as f:
        specs = partition(f, "jsonl", 5).batches
    job = new_job_manifest(cfg, None)
    job.counts.add(run_batch(cfg, store, specs[0]))  # seen by the coordinator before the cancel
    save_job(store, job)
    run_batch(cfg, store, specs[1])  # committed while the workers were stopping
    process._running_at_exit["late"] = [specs[1], specs[2]]  # the shards running when the pass stopped waiting
    assert process.count_late_commits(store, "late") == 1
    counts = load_job(store, "late").counts
    assert (counts.batches_done, counts.items_succeeded) == (2, 10)
    assert process.count_late_commits(store, "late") == 0 and load_job(store, "late").counts.batches_done == 2
