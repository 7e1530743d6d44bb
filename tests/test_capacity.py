"""``slurmctl capacity``: partitions, nodes and CPUs, the queue and our worker jobs from one ``sinfo`` and one
``squeue``, and when a job's workers would start; and the ``--wait`` progress bar on a terminal."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from support.command_counter import count_commands
from support.jobs import log_tail, run_cli, wait_for, write_config, write_jsonl
from support.terminal import run_cli_on_terminal

from slurmctl.capacity import estimate, node_category, parse_sinfo, summarize

# Captured `sinfo -h -a -o "%P|%a|%D|%T|%C|%m|%c"`: a default partition, one with busy, drained and not responding
# nodes, one that is down.
SINFO = """\
debug*|up|1|idle|0/2/0/2|8000|2
batch|up|3|mixed|40/8/0/48|64000|16
batch|up|2|allocated|32/0/0/32|64000|16
batch|up|1|drained|0/0/16/16|64000|16
batch|up|1|down*|0/0/16/16|64000|16
gpu|down|2|idle|0/8/0/8|128000|4
"""
# Captured `squeue -h -a -r -o "%i|%T|%P|%C|%S|%e|%j"`: running jobs with end times (their time limits), our
# worker jobs of job backfill-1 (one running, one pending with the start Slurm expects), a pending job with no
# estimate whose name holds the separator, a completing job, a job pending in two partitions.
SQUEUE = """\
101|RUNNING|batch|16|2026-11-24T10:00:00|2026-11-24T14:00:00|etl
102|RUNNING|batch|16|2026-11-24T11:00:00|2026-11-24T15:00:00|train
103|RUNNING|batch|8|2026-11-24T12:00:00|2026-11-24T13:30:00|slurmctl-backfill-1
104|PENDING|batch|8|2026-11-24T14:00:00|2026-11-24T18:00:00|slurmctl-backfill-1
105|PENDING|batch|4|N/A|N/A|odd|name
106|COMPLETING|debug|1|2026-11-24T12:59:00|2026-11-24T13:01:00|slurmctl-other
107|PENDING|gpu,debug|1|N/A|N/A|x
"""
NOW = dt.datetime(2026, 11, 24, 13, 0).astimezone()


def at(hhmm: str) -> str:
    return dt.datetime.fromisoformat(f"2026-11-24T{hhmm}:00").astimezone().isoformat(timespec="seconds")


def test_sinfo_rows_add_up_per_partition_with_down_and_drained_nodes_apart():
    parts = parse_sinfo(SINFO)
    batch = parts["batch"]
    assert (batch["nodes_total"], batch["nodes_idle"], batch["nodes_allocated"], batch["nodes_down"]) == (7, 0, 5, 2)
    assert (batch["cpus_allocated"], batch["cpus_idle"], batch["cpus_other"], batch["cpus_total"]) == (72, 8, 32, 112)
    assert batch["node_states"] == {"mixed": 3, "allocated": 2, "drained": 1, "down*": 1}
    assert (batch["memory_mb"], batch["cpus_per_node"], batch["available"]) == (64000, 16, "up")
    assert parts["debug"]["default"] and not batch["default"]
    assert parts["gpu"]["available"] == "down"


@pytest.mark.parametrize("state, category", [
    ("idle", "idle"), ("idle~", "idle"), ("idle*", "down"), ("mixed", "allocated"), ("allocated", "allocated"),
    ("completing", "allocated"), ("drained", "down"), ("draining", "down"), ("down*", "down"), ("maint", "down")])
def test_node_states_fall_into_idle_allocated_or_down(state: str, category: str):
    assert node_category(state) == category


def test_queue_depth_and_our_worker_jobs_grouped_by_job_id():
    view = summarize(SINFO, SQUEUE)
    assert [p["partition"] for p in view["partitions"]] == ["debug", "batch", "gpu"]  # the default first
    batch = next(p for p in view["partitions"] if p["partition"] == "batch")
    assert (batch["jobs_running"], batch["jobs_pending"], batch["cpus_pending"]) == (3, 2, 12)
    assert batch["next_pending_start"] == at("14:00")
    assert view["queue"] == {"jobs_running": 4, "jobs_pending": 3, "jobs_other": 0}
    assert view["ours"] == [
        {"job_id": "backfill-1", "partitions": ["batch"], "running": 1, "pending": 1, "cpus_running": 8,
         "cpus_pending": 8},
        {"job_id": "other", "partitions": ["debug"], "running": 1, "pending": 0, "cpus_running": 1,
         "cpus_pending": 0}]
    assert any(j["name"] == "odd|name" for j in view["_jobs"])  # the name is the last field: '|' in it is kept


def test_workers_start_now_when_idle_cpus_cover_them():
    est = estimate(summarize(SINFO, SQUEUE), None, cores=1, max_jobs=2, now=NOW)
    assert est["partition"] == "debug"  # no queue: the default partition
    assert (est["first_worker_start"], est["all_workers_start"], est["cpus_needed"]) == ("now", "now", 2)


def test_workers_wait_for_running_jobs_to_free_cpus_behind_the_pending_ones():
    est = estimate(summarize(SINFO, SQUEUE), "batch", cores=4, max_jobs=8, now=NOW)
    assert est["first_worker_start"] == "now"  # 8 CPUs idle: one worker job of 4 fits
    # 32 ours + 12 pending ahead = 44: idle 8, +8 at 13:30, +16 at 14:00, +16 at 15:00 -> 48
    assert est["all_workers_start"] == at("15:00"), est


def test_workers_never_start_before_slurms_expected_start_of_the_jobs_ahead():
    squeue = SQUEUE.replace("2026-11-24T14:00:00|2026-11-24T18:00:00", "2026-11-24T16:30:00|2026-11-24T20:00:00")
    est = estimate(summarize(SINFO, squeue), "batch", cores=4, max_jobs=8, now=NOW)
    assert est["all_workers_start"] == at("16:30"), est
    assert "pending jobs ahead" in est["basis"]


def test_estimate_says_never_or_unknown_and_why():
    view = summarize(SINFO, SQUEUE)
    too_big = estimate(view, "batch", cores=32, max_jobs=1, now=NOW)
    assert too_big["first_worker_start"] == "never" and "at most 16" in too_big["basis"]
    assert estimate(view, "batch", cores=16, max_jobs=6, now=NOW)["all_workers_start"] == "never"  # > 80 usable
    down = estimate(view, "gpu", cores=1, max_jobs=1, now=NOW)
    assert down["first_worker_start"] == "unknown" and "is down" in down["basis"]
    missing = estimate(view, "nope", cores=1, max_jobs=1, now=NOW)
    assert missing["first_worker_start"] == "unknown" and "debug, batch, gpu" in missing["basis"]
    no_ends = SQUEUE.replace("|2026-11-24T14:00:00|etl", "|N/A|etl").replace("|2026-11-24T15:00:00|", "|N/A|")
    no_ends = no_ends.replace("|2026-11-24T13:30:00|", "|N/A|").replace("2026-11-24T14:00:00|", "N/A|")
    assert estimate(summarize(SINFO, no_ends), "batch", cores=4, max_jobs=8, now=NOW)["all_workers_start"] == \
        "unknown"


def test_progress_on_a_terminal_is_a_rich_bar_fed_from_the_status_view():
    from rich.console import Console

    from slurmctl.progress_display import TerminalProgress

    out = io.StringIO()
    view = {"phase": "process", "items_done": 400, "items_total": 1000, "items_per_s": 12.5, "eta_s": 48,
            "batches_done": 4, "batches_total": 10, "batches_failed": 0, "items_failed": 3, "items_rejected": 0}
    with TerminalProgress("backfill-1", console=Console(force_terminal=True, file=out, width=200)) as bar:
        bar.update(view)
    drawn = out.getvalue()
    assert "\x1b[" in drawn  # drawn with terminal control codes, redrawn in place
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    for part in ("backfill-1", "process", "40%", "400/1000 items", "12.5 items/s ETA 48s", "batches 4/10"):
        assert part in text, (part, text)



def test_progress_off_a_terminal_stays_the_plain_line():
    from slurmctl.progress_display import progress_line

    view = {"phase": "process", "batches_done": 4, "batches_total": 10, "batches_failed": 0, "items_succeeded": 397,
            "items_failed": 3, "items_rejected": 0, "items_per_s": 12.5, "eta_s": 48}
    assert progress_line(view) == ("[#########---------------]  40.0% process   batches 4/10 failed 0 items ok 397 "
                                   "failed 3 rejected 0 12.5 items/s ETA 48s")


@pytest.mark.integration
@pytest.mark.slurm
def test_capacity_json_on_the_real_slurm_with_one_sinfo_and_one_squeue(tmp_path: Path, slurm: None,
                                                                        monkeypatch: pytest.MonkeyPatch):
    job_id = f"capacity-{uuid.uuid4().hex[:8]}"
    held = subprocess.run(["sbatch", "--hold", "-J", f"slurmctl-{job_id}", "-p", "debug", "-c", "1", "-o",
                           "/dev/null", "--wrap", "true"], capture_output=True, text=True, timeout=60)
    assert held.returncode == 0, held.stderr
    slurm_id = held.stdout.split()[-1]
    try:
        wait_for(lambda: slurm_id in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                                   timeout=30).stdout, timeout=60, what="the held job in squeue")
        counter = count_commands(monkeypatch, tmp_path / "shims", "sinfo", "squeue")
        cfg = write_config(tmp_path / "job.yaml", job_id="capacity-probe", handler="slurmctl.handlers.echo:handle",
                           input={"uri": "items.jsonl"}, cluster={"kind": "slurm", "queue": "debug", "cores": 1,
                                                                  "max_jobs": 2})
        result = run_cli("capacity", "--json", "--config", str(cfg), timeout=120)
        assert result.returncode == 0, result.stderr
        assert (counter.calls("sinfo"), counter.calls("squeue")) == (1, 1)
        view = json.loads(result.stdout)
        debug = next(p for p in view["partitions"] if p["partition"] == "debug")
        assert debug["default"] and debug["available"] == "up"
        assert (debug["nodes_total"], debug["cpus_total"]) == (1, 2)
        assert debug["nodes_idle"] + debug["nodes_allocated"] + debug["nodes_down"] == 1
        assert debug["cpus_idle"] + debug["cpus_allocated"] + debug["cpus_other"] == 2
        assert debug["jobs_pending"] >= 1 and view["queue"]["jobs_pending"] >= 1
        assert {"job_id": job_id, "partitions": ["debug"], "running": 0, "pending": 1, "cpus_running": 0,
                "cpus_pending": 1} in view["ours"]
        est = view["estimate"]
        assert (est["job_id"], est["partition"], est["cpus_needed"]) == ("capacity-probe", "debug", 2)
        assert (est["all_workers_start"] == "now") == (est["cpus_idle"] >= 2), est
        human = run_cli("capacity", timeout=120)
        assert human.returncode == 0 and "debug*" in human.stdout and f"{job_id}: 0 running" in human.stdout, \
            human.stdout + human.stderr
    finally:
        subprocess.run(["scancel", slurm_id], capture_output=True, timeout=60)


@pytest.mark.integration
def test_submit_wait_on_a_terminal_shows_the_rich_bar_not_the_plain_lines(tmp_path: Path, prefect_api: str,
                                                                          slurmctl_home: Path):
    write_jsonl(tmp_path / "items.jsonl", [{"id": i} for i in range(40)])
    cfg = write_config(tmp_path / "job.yaml", job_id="on-a-terminal", handler="slurmctl.handlers.echo:handle",
                       input={"uri": "items.jsonl"}, batch_size=10, cluster={"kind": "local", "n_workers": 1},
                       storage={"uri": "file://./state"})
    code, _, shown = run_cli_on_terminal("submit", str(cfg), "--wait")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert code == 0, shown[-3000:] + log_tail(slurmctl_home, "on-a-terminal")
    assert "━" in text and "40/40 items" in text and "batches 4/4" in text, text[-3000:]
    assert "items/s" in text and "job on-a-terminal completed" in text, text[-3000:]
    assert "[####" not in text and "[----" not in text  # no hand-drawn bar
