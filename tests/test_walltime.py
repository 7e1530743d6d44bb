"""A worker's clock: when its Slurm job ends and whether one more batch fits (``slurmctl.walltime``)."""

from __future__ import annotations

import random

import pytest

from slurmctl.config import ConfigError, parse_config
from slurmctl.slurm import duration_s
from slurmctl.walltime import END_ENV, WorkerClock, default_stagger_s, slurm_end_time


@pytest.mark.parametrize("text,seconds", [("1:00", 60), ("59:58", 3598), ("1:00:00", 3600), ("2-03:00:00", 183600),
                                          ("1-0", 86400), ("10", 600), ("UNLIMITED", None), ("NOT_SET", None)])
def test_slurm_durations_read_as_squeue_and_sbatch_write_them(text, seconds):
    assert duration_s(text) == seconds


def test_the_end_comes_from_squeue_and_else_from_the_job_script(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv(END_ENV, "1234.0")
    asked = []
    end = slurm_end_time(run=lambda job: asked.append(job) or 90.0)
    assert asked == ["42"] and end == pytest.approx(__import__("time").time() + 90, abs=2)
    assert slurm_end_time(run=lambda job: None) == 1234.0  # UNLIMITED, or squeue failed
    monkeypatch.setenv("PATH", "/nonexistent")  # no squeue on this compute node
    assert slurm_end_time() == 1234.0
    monkeypatch.delenv(END_ENV)
    assert slurm_end_time() is None


def test_a_batch_fits_while_its_p95_ends_before_the_retirement():
    now = [0.0]
    clock = WorkerClock(end=100.0, margin_s=10.0, now=lambda: now[0])
    assert clock.retire_at == 90.0
    now[0] = 95.0
    assert clock.fits()  # the first batch of a worker's life always runs: nothing to judge by yet
    for seconds in [1.0] * 19 + [20.0]:
        clock.record(seconds)
    assert clock.expected_batch_s() == 1.0  # p95 of twenty: the slowest one is the 5 % left out
    clock.record(20.0)
    assert clock.expected_batch_s() == 20.0
    now[0] = 70.0
    assert clock.fits()  # 70 + 20 = 90
    now[0] = 70.5
    assert not clock.fits() and clock.retiring
    now[0] = 0.0
    assert not clock.fits()  # once retiring, always retiring


def test_workers_of_one_wave_retire_at_different_times():
    times = {WorkerClock(end=3600.0, margin_s=10.0, stagger_s=default_stagger_s(3600), rng=random.Random(seed)
                         ).retire_at for seed in range(5)}
    assert len(times) == 5 and all(3590 - 120 <= t <= 3590 for t in times)
    assert default_stagger_s(60) == 3.0
    assert WorkerClock(end=None).fits()  # no end known (not a Slurm job): never retires


def test_a_margin_as_long_as_the_walltime_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"cluster.*retire_margin_s must be shorter than the walltime"):
        parse_config({"job_id": "j", "handler": "m:f", "input": {"uri": "in.jsonl"},
                      "cluster": {"kind": "slurm", "walltime": "00:01:00", "retire_margin_s": 60}})


def test_a_worker_job_near_its_retirement_gets_its_replacement_started_ahead(monkeypatch):
    from types import SimpleNamespace

    from slurmctl.flows import replacement
    from slurmctl.flows.replacement import Replacements

    monkeypatch.setattr(replacement.shutil, "which", lambda name: "/usr/bin/" + name)
    cfg = parse_config({"job_id": "j", "handler": "m:f", "input": {"uri": "in.jsonl"},
                        "cluster": {"kind": "slurm", "walltime": "01:00:00", "processes": 2, "min_jobs": 1,
                                    "max_jobs": 4}})
    adaptive = SimpleNamespace(minimum=2, maximum=8)  # in workers: jobs x processes
    reps = Replacements(cfg, SimpleNamespace(cluster=SimpleNamespace(_adaptive=adaptive)))
    assert reps.threshold_s == 10 + 120 + 30  # margin, the largest stagger, replace_ahead_s
    left = {"101": 3000.0, "102": 400.0}
    monkeypatch.setattr(reps, "time_left", lambda: dict(left))
    reps.tick()
    assert (adaptive.minimum, adaptive.maximum) == (2, 8)
    left["102"] = 150.0  # within 160 s of its end: one job (two workers) more while it finishes
    reps.last = 0.0
    reps.tick()
    assert (adaptive.minimum, adaptive.maximum) == (4, 10) and reps.retiring == {"102"}
    del left["102"]  # it retired: back to the configured bounds
    reps.last = 0.0
    reps.tick()
    assert (adaptive.minimum, adaptive.maximum) == (2, 8)
    # A 1-minute job is never counted as retiring in its first quarter, so replacements do not beget replacements.
    short = parse_config({"job_id": "j", "handler": "m:f", "input": {"uri": "in.jsonl"},
                          "cluster": {"kind": "slurm", "walltime": "00:01:00"}})
    assert Replacements(short, SimpleNamespace(cluster=SimpleNamespace(_adaptive=adaptive))).threshold_s == 10 + 3 + 15
    local = parse_config({"job_id": "j", "handler": "m:f", "input": {"uri": "in.jsonl"}})
    assert not Replacements(local, SimpleNamespace(cluster=SimpleNamespace(_adaptive=adaptive))).active


def test_sigterm_makes_a_worker_hand_its_shards_back_between_batches_and_leave(monkeypatch):
    from types import SimpleNamespace

    from slurmctl import walltime
    from slurmctl.flows.process import is_worker_loss
    from slurmctl.tasks import process_shard

    monkeypatch.setattr(walltime, "_clock", None)
    scheduled = []
    worker = SimpleNamespace(loop=SimpleNamespace(add_callback=lambda fn, *a: scheduled.append((fn, a))))
    process_shard.on_sigterm(worker)
    clock = walltime.current_clock()
    assert clock.terminated and not clock.fits()  # even a worker with its whole walltime ahead
    assert [fn for fn, _ in scheduled] == [process_shard._close_when_idle]  # it leaves once idle, asked once
    process_shard.on_sigterm(worker)
    assert len(scheduled) == 1
    # The job's config cannot undo it: the clock a shard then asks for is the terminated one.
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    cfg = parse_config({"job_id": "j", "handler": "m:f", "input": {"uri": "in.jsonl"}, "cluster": {"kind": "slurm"}})
    assert process_shard.clock_for(cfg) is clock
    exc = process_shard.ShardPreempted("x")
    assert isinstance(exc, process_shard.ShardRetiring) and not is_worker_loss(exc)
