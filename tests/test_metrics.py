"""What each batch cost (its task manifest's ``metrics``) and how fast the job goes (``slurmctl status``: items/s,
ETA, per-phase progress), from the manifests alone."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from support.busy import busy_machine
from support.jobs import (
    committed_tasks,
    current_status,
    job_manifest,
    log_tail,
    run_cli,
    status,
    wait_for,
    wait_until_ended,
    write_config,
    write_jsonl,
)

from slurmctl.batch_metrics import BatchMeter, CpuShare, percentile
from slurmctl.blocks.manifest_store import LocalManifestStore
from slurmctl.books.manifests import Counts, JobManifest, TaskManifest, counts_from_tasks, metric_counts
from slurmctl.books.progress import job_progress
from slurmctl.books.status import pace_view, status_view
from slurmctl.books.store import load_job, save_job, update_job
from slurmctl.cli.watching import watch
from slurmctl.config import StorageConfig
from slurmctl.flows.artifacts import status_table
from slurmctl.tasks.process_batch import summary_of

T0 = "2026-01-01T00:00:00.000Z"


def at(seconds: float) -> str:
    """``T0`` plus ``seconds``, as manifests write times."""
    m, s = divmod(seconds, 60)
    return f"2026-01-01T00:{int(m):02d}:{s:06.3f}Z"


# ---- per-batch metrics -----------------------------------------------------------------------------------------

def test_percentiles_are_nearest_rank_values_that_were_measured():
    ordered = [float(i) for i in range(1, 101)]
    assert (percentile(ordered, 50), percentile(ordered, 95), percentile(ordered, 100)) == (50.0, 95.0, 100.0)
    assert percentile([7.0], 95) == 7.0 and percentile([], 50) is None


def test_latency_leaves_out_the_time_blocked_on_a_rate_limit():
    class Ctx:  # a BatchContext's limiter clock, advanced by hand
        limiter_blocked_s = 0.0

    ctx = Ctx()
    meter = BatchMeter()
    with meter.call(ctx):
        time.sleep(0.5)  # as if blocked in ctx.limit for half a second: not the handler's latency
        ctx.limiter_blocked_s += 0.5
    m = meter.metrics(1, {"api_requests": 1}, ctx.limiter_blocked_s)
    assert m.api_calls == 1 and m.latency_ms.p50 < 250 and m.tokens_waited_s == 0.5
    assert m.model_dump()["api_requests"] == 1  # the handler's counters stay beside the typed fields


def test_a_task_manifest_from_before_the_typed_metrics_still_loads():
    old = {"schema_version": 1, "kind": "task", "job_id": "j", "batch_id": "batch-000000", "task_id": "task-000000",
           "status": "succeeded", "started_at": T0, "finished_at": T0, "items": 10,
           "metrics": {"seconds": 1.5, "api_requests": 10.0}}
    task = TaskManifest.model_validate(old)
    assert task.schema_version == 1 and task.metrics.items is None and task.metrics.latency_ms is None
    assert task.metrics.model_dump()["seconds"] == 1.5
    assert TaskManifest.model_validate({**old, "metrics": None}).metrics is None


STATUS_KEYS = {"job_id", "status", "phase", "batches_total", "batches_done", "batches_failed", "items_total",
               "items_succeeded", "items_failed", "items_deferred", "items_rejected", "rows_written", "duplicates",
               "output", "submitted_at", "started_at", "updated_at", "heartbeat_at", "finished_at", "error",
               "flow_run_id", "paused", "stale", "items_done", "items_per_s", "eta_s", "phases"}


def sample_job(tmp_path: Path, job_id: str, n: int, **params: Any) -> Path:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i} for i in range(n)])
    return write_config(tmp_path / "job.yaml", job_id=job_id, handler="support.sample_handlers:counting",
                        input={"uri": "in.jsonl"}, batch_size=10, storage={"uri": "state"},
                        cluster={"kind": "local", "n_workers": 1}, params=params,
                        errors={"backoff_base_s": 0.01, "backoff_max_s": 0.05})


def test_a_job_records_batch_metrics_and_status_shows_speed_and_phases(tmp_path, prefect_api, slurmctl_home):
    # One worker thread, 6 batches; every call sleeps 50 ms; item 3 fails 3 times (network: transient, retried);
    # the first call for item 15 (batch 1) holds until the test lets it go, so the job is seen mid-process.
    marker, release = tmp_path / "held", tmp_path / "release"
    cfg = sample_job(tmp_path, "metrics", 60, sleep_s=0.05, fail={"3": "network"},
                     hold={"id": 15, "marker": str(marker), "release": str(release)})
    assert run_cli("submit", str(cfg)).returncode == 0
    try:
        wait_for(marker.exists, 240, "the job to hold inside its second batch")
        view = wait_for(lambda: (v := current_status("metrics"))["batches_done"] >= 1 and v, 60,
                        "status to count the first committed batch")
        assert STATUS_KEYS <= set(view)  # `status --json` keeps its keys and adds items/s, ETA and phases
        assert view["status"] == "running" and view["items_done"] == 10
        assert view["items_per_s"] > 0 and view["eta_s"] == pytest.approx(50 / view["items_per_s"], rel=0.01)
        phases = {p["phase"]: p for p in view["phases"]}
        assert [p["phase"] for p in view["phases"]] == ["partition", "process", "retry", "aggregate"]
        assert (phases["partition"]["state"], phases["partition"]["share_done"]) == ("done", 1.0)
        assert (phases["process"]["state"], phases["process"]["share_done"]) == ("running", round(1 / 6, 4))
        assert phases["retry"]["state"] == phases["aggregate"]["state"] == "pending"
        human = run_cli("status", "metrics").stdout
        assert "items/s ETA" in human and "  process    running    16.7%" in human, human
    finally:
        release.touch()  # never leave the job holding
    view = wait_until_ended("metrics")
    assert view["status"] == "completed", log_tail(slurmctl_home, "metrics")
    assert view["eta_s"] == 0 and view["items_per_s"] > 0
    assert [(p["phase"], p["state"]) for p in view["phases"]] == [
        ("partition", "done"), ("process", "done"), ("retry", "skipped"), ("aggregate", "done")]
    times = job_manifest(tmp_path / "state", "metrics")["phase_times"]
    assert set(times) == {"partition", "process", "aggregate"}
    assert all(t["started_at"] <= t["finished_at"] for t in times.values())
    assert times["partition"]["finished_at"] <= times["process"]["started_at"]

    tasks = committed_tasks(tmp_path / "state", "metrics")
    assert len(tasks) == 6
    for batch_id, t in tasks.items():
        m = t["metrics"]
        assert t["schema_version"] == 2 and m["items"] == t["items"] == 10, batch_id
        assert m["api_calls"] == (12 if batch_id == "batch-000000" else 10)  # item 3: 3 attempts
        assert 50 <= m["latency_ms"]["p50"] <= m["latency_ms"]["p95"] <= m["latency_ms"]["max"]
        assert m["host"] == socket.gethostname() and m["slurm_job_id"] is None
        assert m["cpu_s"] >= 0 and m["peak_rss_mb"] > 10 and m["tokens_waited_s"] == 0
        assert m["duration_s"] >= 0.5 and t["started_at"] == m["started_at"] <= m["finished_at"] == t["finished_at"]
    assert tasks["batch-000001"]["metrics"]["latency_ms"]["max"] > tasks["batch-000002"]["metrics"]["latency_ms"][
        "max"]  # the held call

    # `status --batches N`: the slowest batches from their metrics; the held one first
    slow = json.loads(run_cli("status", "metrics", "--json", "--batches", "2").stdout)["slowest_batches"]
    assert [b["batch_id"] for b in slow][:1] == ["batch-000001"] and len(slow) == 2
    assert slow[0]["duration_s"] >= slow[1]["duration_s"] and slow[0]["items"] == 10
    assert "slowest batches:" in run_cli("status", "metrics", "--batches", "2").stdout

    # a retry round over the network failure (item 3 fails again): its own phase entry and batch metrics
    assert run_cli("retry", "metrics", "--errors=network", "--wait").returncode == 0, log_tail(slurmctl_home, "metrics")
    view = status("metrics")
    assert [(p["phase"], p["state"], p["share_done"]) for p in view["phases"]] == [
        ("partition", "done", 1.0), ("process", "done", 1.0), ("retry 1", "done", 1.0), ("aggregate", "done", 1.0)]
    retried = committed_tasks(tmp_path / "state", "metrics", "r01-batch-")["r01-batch-000000"]["metrics"]
    assert (retried["items"], retried["api_calls"]) == (1, 3)


# ---- job progress: items/s, ETA, phases ------------------------------------------------------------------------

def job(status: str, phase: str, updated: float, counts: dict[str, int], phase_times: dict[str, Any],
        **extra: Any) -> dict[str, Any]:
    return {"job_id": "j", "status": status, "phase": phase, "counts": counts, "started_at": T0,
            "updated_at": at(updated), "phase_times": phase_times, **extra}


def test_progress_mid_process():
    # process started at 20 s with 100 items already done (a resume); 500 done at 100 s: 400 in 80 s.
    p = job_progress(job("running", "process", 100, {"batches_total": 10, "batches_done": 5, "items_total": 1000,
                                                      "items_succeeded": 480, "items_failed": 10,
                                                      "items_rejected": 10},
                         {"partition": {"started_at": at(0), "finished_at": at(10), "items_at_start": 100},
                          "process": {"started_at": at(20), "finished_at": None, "items_at_start": 100}}))
    assert (p["items_done"], p["items_per_s"], p["eta_s"]) == (500, 5.0, 100.0)
    assert [(x["phase"], x["state"], x["share_done"], x["seconds"]) for x in p["phases"]] == [
        ("partition", "done", 1.0, 10.0), ("process", "running", 0.5, 80.0), ("retry", "pending", None, None),
        ("aggregate", "pending", 0.0, None)]


def test_progress_of_a_running_retry_round():
    # 10 initial batches done; round 1 (40 items, 4 batches) planned at 100 s, one of its batches done at 120 s.
    rounds = [{"round": 1, "classes": ["network"], "items": 40, "batches": 4, "started_at": at(100),
               "finished_at": None}]
    p = job_progress(job("running", "retry", 120, {"batches_total": 14, "batches_done": 11, "items_total": 200,
                                                    "items_succeeded": 160, "items_failed": 40},
                         {"process": {"started_at": at(10), "finished_at": at(90), "items_at_start": 0},
                          "retry": {"started_at": at(95), "finished_at": None, "items_at_start": 200}},
                         retry_rounds=rounds))
    assert (p["items_per_s"], p["eta_s"]) == (0.5, 60.0)  # 10 of its 40 items in 20 s
    assert [(x["phase"], x["state"], x["share_done"]) for x in p["phases"]] == [
        ("partition", "done", 1.0), ("process", "done", 1.0), ("retry 1", "running", 0.25),
        ("aggregate", "pending", 0.0)]


def test_progress_of_a_completed_and_of_a_failed_job():
    counts = {"batches_total": 4, "batches_done": 4, "items_total": 400, "items_succeeded": 400}
    times = {"partition": {"started_at": at(0), "finished_at": at(5), "items_at_start": 0},
             "process": {"started_at": at(5), "finished_at": at(45), "items_at_start": 0},
             "aggregate": {"started_at": at(45), "finished_at": at(50), "items_at_start": 400}}
    done = job_progress(job("completed", "done", 50, counts, times, finished_at=at(50)))
    assert (done["items_per_s"], done["eta_s"]) == (10.0, 0.0)  # the process phase's rate: 400 in 40 s
    assert [(x["phase"], x["state"], x["share_done"]) for x in done["phases"]] == [
        ("partition", "done", 1.0), ("process", "done", 1.0), ("retry", "skipped", None),
        ("aggregate", "done", 1.0)]
    failed = job_progress(job("failed", "aggregate", 50, counts, {**times, "aggregate": {**times["aggregate"]}},
                              finished_at=at(50)))
    assert failed["eta_s"] is None
    assert [x["state"] for x in failed["phases"]] == ["done", "done", "skipped", "failed"]


def test_progress_of_a_job_manifest_without_phase_times():
    # written before phase_times existed: the rate runs from the job's start, the phases follow `phase`
    p = job_progress(job("running", "process", 50, {"batches_total": 2, "batches_done": 1, "items_total": 200,
                                                     "items_succeeded": 100}, {}))
    assert (p["items_per_s"], p["eta_s"]) == (2.0, 50.0)
    assert [x["state"] for x in p["phases"]] == ["done", "running", "pending", "pending"]


# ---- the job's pace: workers too busy for their limit's slots, or held below it by max_concurrency -------------

def paced_batch(batch_id: str, tokens: int, late: int, needed: int = 0, held: float = 0) -> dict[str, Any]:
    """A committed batch's task manifest as a worker writes it: its limit's tokens and late slots in its metrics."""
    metrics = {"items": tokens, "api_calls": tokens, "ratelimit_api_tokens": tokens, "ratelimit_api_late": late,
               **({"loop_held_s": held} if held else {}),
               "ratelimit_api_late_ms_max": 1.9, "ratelimit_api_expired": late + 7, "in_flight_max": 256,
               **({"concurrency": 256, "concurrency_needed": needed} if needed else {})}
    return {"batch_id": batch_id, "status": "succeeded", "items_succeeded": tokens, "items_failed": 0,
            "items_deferred": 0, "items_rejected": 0, "rows_written": tokens, "metrics": metrics}


def test_status_says_why_a_job_spends_less_of_its_rate_limit_than_it_could_and_what_to_do():
    # Two batches of a job at 2000/s: a third of their slots passed because the workers came late, and the limit
    # needed 1,000 calls in flight in a worker that max_concurrency held at 256. The counts carry both (the
    # coordinator's from the batches' summaries, `status --scan`'s from their task manifests), and status says so.
    tasks = [paced_batch("batch-000000", 600, 300), paced_batch("batch-000001", 400, 200, needed=1000)]
    live = Counts(batches_total=2, items_total=1000)
    for t in tasks:
        live = live.plus(Counts(**_added(summary_of(t))))
    scanned = counts_from_tasks(tasks, 2, 1000)
    for counts in (live, scanned):
        assert (counts.limit_slots, counts.limit_slots_late, counts.concurrency_needed) == (1500, 500, 1000)
    view = status_view(job("running", "process", 10, scanned.model_dump(), {}, config={}))
    assert view["limit_slots_late"] == 500 and len(view["advice"]) == 2, view["advice"]
    busy, capped = view["advice"]
    assert "500 of 1,500 rate-limit slots (33 %)" in busy and "too busy" in busy and "more worker processes" in busy
    assert "1,000 calls in flight" in capped and "held each at 256" in capped and "max_concurrency: 1250 " in capped

    # A job that set max_concurrency to what it needs, with a few late slots: nothing to say.
    calm = counts_from_tasks([paced_batch("batch-000000", 1000, 40, needed=1000)], 1, 1000)
    assert pace_view(job("running", "process", 10, calm.model_dump(), {}, config={"max_concurrency": 1250})) == []
    # Late slots are a pattern only past 500 slots: a small job's tail is not.
    few = counts_from_tasks([paced_batch("batch-000000", 100, 60)], 1, 100)
    assert pace_view(job("completed", "done", 10, few.model_dump(), {})) == []


def test_status_names_an_async_handler_that_holds_its_loop_instead_of_blaming_busy_workers():
    # 1,000 calls that held their workers' loops 20 ms each: their slots passed late too, but more worker processes
    # would not help. The counts carry the seconds held (coordinator, recount and the aggregation's final counts
    # alike), and status says what to change instead of the late-slot advice.
    tasks = [paced_batch("batch-000000", 600, 300, held=12.25), paced_batch("batch-000001", 400, 200, held=7.75)]
    live = Counts(batches_total=2, items_total=1000)
    for t in tasks:
        live = live.plus(Counts(**_added(summary_of(t))))
    scanned = counts_from_tasks(tasks, 2, 1000)
    assert live.loop_held_s == scanned.loop_held_s == metric_counts(tasks)["loop_held_s"] == 20.0
    [said] = pace_view(job("completed", "done", 10, scanned.model_dump(), {}))
    assert "held its workers' event loops for 20 s (20 ms per call)" in said
    assert "async client" in said and "concurrency: auto" in said and "slots" not in said

    # A stall now and then is not a pattern: 0.5 s over the same 1,000 calls says nothing of the loop.
    stalls = counts_from_tasks([paced_batch("batch-000000", 1000, 10, held=0.5)], 1, 1000)
    assert pace_view(job("completed", "done", 10, stalls.model_dump(), {})) == []


def test_status_says_to_run_items_concurrently_when_one_at_a_time_holds_a_job_below_its_limit():
    # A sync handler's batches ran their items one at a time (in_flight_max 1; none in older metrics) where the limit
    # needed 10 calls in flight: the fix is concurrency, not max_concurrency.
    serial = paced_batch("batch-000000", 600, 0)
    del serial["metrics"]["in_flight_max"]
    serial["metrics"]["concurrency_needed"] = 10
    counts = counts_from_tasks([serial], 1, 600)
    assert (counts.in_flight_max, counts.concurrency_needed) == (1, 10)
    [said] = pace_view(job("completed", "done", 10, counts.model_dump(), {}))
    assert "needed up to 10 calls in flight" in said and "one at a time" in said and "concurrency: auto" in said
    assert "max_concurrency" not in said


def test_status_says_to_set_concurrency_auto_when_a_fixed_concurrency_holds_a_job_below_its_limit():
    # concurrency: 4 ran 4 calls in flight per batch where the limit needed 25: the fix is auto, not max_concurrency.
    fixed = paced_batch("batch-000000", 600, 0)
    fixed["metrics"].update(in_flight_max=4, concurrency=4, concurrency_needed=25)
    counts = counts_from_tasks([fixed], 1, 600)
    [said] = pace_view(job("completed", "done", 10, counts.model_dump(), {}, config={"concurrency": 4}))
    assert "needed up to 25 calls in flight" in said and "concurrency: 4 held each worker thread at 4" in said
    assert "set concurrency: auto" in said and "max_concurrency" not in said and "thread-safe" not in said
    # concurrency: 1 said in the config: the user's number too, whether the handler is sync or async (status cannot
    # tell): not "make the handler async", and thread safety only for a sync one.
    fixed["metrics"].update(in_flight_max=1, concurrency=1)
    counts = counts_from_tasks([fixed], 1, 600)
    [said] = pace_view(job("completed", "done", 10, counts.model_dump(), {}, config={"concurrency": 1}))
    assert "concurrency: 1 held each worker thread at 1" in said and "a sync handler must then be thread-safe" in said
    assert "make the handler async" not in said


def test_status_says_to_raise_batch_size_when_the_batches_hold_fewer_items_than_a_limit_needs_in_flight():
    # 300/s declared, 1 s answers, 2 workers of one thread, batch_size 50: each worker needs 150 in flight and its two
    # batches at once hold 100, whatever auto allows (the review's job ran at 0.45 of its rate, advice empty).
    capped = paced_batch("batch-000000", 600, 0, needed=150)
    capped["metrics"].update(in_flight_max=100, concurrency=190)
    counts = counts_from_tasks([capped], 1, 600)
    config = {"job_id": "j", "handler": "slurmctl.handlers.echo:handle", "input": {"uri": "in.jsonl"},
              "storage": {"uri": "state"}, "batch_size": 50, "cluster": {"kind": "local", "n_workers": 2}}
    [said] = pace_view(job("completed", "done", 10, counts.model_dump(), {}, config=config))
    assert "needed up to 150 calls in flight" in said and "held at most 100 items at once (batch_size 50 x 2" in said
    assert "set batch_size: 188 " in said and "max_concurrency" not in said, said
    # Batches that hold enough: the bound is max_concurrency's, as before.
    config.update(batch_size=500, max_concurrency=100)
    [said] = pace_view(job("completed", "done", 10, counts.model_dump(), {}, config=config))
    assert "max_concurrency held each at 100: set max_concurrency: 188 " in said, said


def test_waiting_for_a_job_ends_with_what_its_pace_says(tmp_path, capsys):
    # `submit --wait` / `resume --wait` end with the job's outcome, then its pace advice: the user sees it at once.
    store = LocalManifestStore(root=str(tmp_path / "state"))
    counts = counts_from_tasks([paced_batch("batch-000000", 600, 300), paced_batch("batch-000001", 400, 200)],
                               2, 1000)
    save_job(store, JobManifest(job_id="paced", handler="h", input={}, batch_size=500, cluster={}, storage="s",
                                config={}, status="completed", phase="done", counts=counts, output="file:///out"))
    assert watch("paced", StorageConfig(uri=str(tmp_path / "state")), None, None) == 0
    said = capsys.readouterr().err.splitlines()
    assert said[-2].startswith("job paced completed: 1000 items ok"), said
    assert said[-1].startswith("note: 500 of 1,500 rate-limit slots (33 %)"), said


def test_cpu_share_tells_a_thread_that_computes_from_one_that_waits_however_busy_the_machine():
    # On 2 cores shared by 4 busy loops, a thread that computes gets at most two fifths of the wall time: its CPU time
    # over the wall time would say it mostly waits, as a thread that sleeps does. Its time in the run queue says
    # otherwise. (With 8 loops, on a machine already loaded by others it sat in the run queue more than 90 % of the
    # time, where CpuShare says nothing can be told: None.)
    def spin(cpu_s: float) -> None:
        end = time.thread_time() + cpu_s
        while time.thread_time() < end:
            pass

    with busy_machine(per_core=2):
        computing, cpu0, t0 = CpuShare(), time.thread_time(), time.perf_counter()
        spin(0.3)  # a tenth to a third of the wall time on a CPU
        assert computing.share() >= 0.5 and time.thread_time() - cpu0 < 0.5 * (time.perf_counter() - t0)
        sleeping = CpuShare()
        for _ in range(20):
            time.sleep(0.02)
        assert sleeping.share() <= 0.05


def test_the_live_status_table_in_the_ui_says_what_status_notes_while_the_job_runs():
    # The run's `<job>-status` artifact is where a user watching the Prefect UI looks: a handler holding its loop is
    # said there while the job runs (with the seconds held in the table), not only in the summary at its end.
    counts = counts_from_tasks([paced_batch("batch-000000", 600, 300, held=12.25)], 2, 1000)
    running = JobManifest(job_id="held", handler="h", input={}, batch_size=500, cluster={}, storage="s", config={},
                          status="running", phase="process", counts=counts)
    table = status_table(running, "process")
    assert "| event loops held by the handler | 12.2 s |" in table
    assert "| rate-limit slots passed late | 300 of" in table
    [said] = pace_view(running.model_dump(mode="json"))
    assert table.endswith(f"**Pace:**\n\n- {said}\n"), table
    # A job with nothing to say shows the table alone.
    calm = counts_from_tasks([paced_batch("batch-000000", 1000, 10)], 2, 1000)
    assert "Pace" not in status_table(running.model_copy(update={"counts": calm}), "process")


def _added(summary: dict[str, Any]) -> dict[str, Any]:
    """What the coordinator adds to its counts for one committed batch (``Counts.add``), as a delta."""
    delta = Counts()
    delta.add(summary)
    return delta.model_dump()


class FakeClock:
    """``slurmctl.books.manifests.now`` that advances 1 s per call, from ``T0``: no two manifest times are equal
    however fast the machine (the real clock gives millisecond strings, often the same one twice)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return at(self.calls)

    @property
    def last(self) -> str:
        """The latest time handed out."""
        return at(self.calls)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    import slurmctl.books.manifests
    import slurmctl.books.store

    fake = FakeClock()
    # where save_job / update_job / time_phases take it from (a name imported into books.store), and its home
    monkeypatch.setattr(slurmctl.books.store, "now", fake)
    monkeypatch.setattr(slurmctl.books.manifests, "now", fake)
    return fake


def test_update_job_times_each_phase(tmp_path, clock):
    store = LocalManifestStore(root=str(tmp_path))
    save_job(store, JobManifest(job_id="j", handler="h", input={}, batch_size=1, cluster={}, storage="s",
                                config={}, submitted_at=clock()))
    update_job(store, "j", status="running", phase="partition")
    update_job(store, "j", phase="process")
    update_job(store, "j", phase="retry")
    first_retry = load_job(store, "j").phase_times["retry"]
    update_job(store, "j", phase="retry")  # the next round: the phase goes on
    times = load_job(store, "j").phase_times
    assert times["retry"] == first_retry and times["retry"]["finished_at"] is None
    assert times["partition"]["started_at"] < times["partition"]["finished_at"]
    assert times["partition"]["finished_at"] == times["process"]["started_at"] < times["process"]["finished_at"]
    assert times["process"]["finished_at"] == times["retry"]["started_at"]

    # the coordinator dies mid-retry; a restart closes the phase when that coordinator last wrote, not now
    last_written = load_job(store, "j").updated_at
    restarted = update_job(store, "j", status="pending", phase="submitted")
    assert restarted.phase_times["retry"]["finished_at"] == last_written < restarted.updated_at
    before = clock.last
    job_ = update_job(store, "j", status="running", phase="partition")
    assert job_.phase_times["partition"]["finished_at"] is None
    # the new run's start: a time of this write, after the restart's, not the first run's
    assert before < job_.phase_times["partition"]["started_at"] <= job_.updated_at
    assert job_.phase_times["partition"]["started_at"] > restarted.updated_at > times["partition"]["started_at"]
    # the job ends: the open phase closes at a time of the ending write (the one that says failed), not before
    before = clock.last
    ended = update_job(store, "j", status="failed")
    assert before < ended.phase_times["partition"]["finished_at"] <= ended.updated_at
    assert ended.phase_times["partition"]["finished_at"] > job_.phase_times["partition"]["started_at"]
