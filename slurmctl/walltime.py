"""A Slurm worker's clock: when its job ends, and whether one more batch fits before it does.

Slurm ends every worker job at its walltime (SIGTERM, then SIGKILL ``KillWait`` seconds later). A worker killed
mid-batch costs that batch's items a second run (its commit never happened), so a worker that knows its end stops
taking batches that would not finish in time, commits what it holds, and leaves on its own: a *retirement*, not a
loss. dask's ``--lifetime`` closes a worker at a fixed age whatever it is running; this clock decides between batches.

* The end: ``squeue``'s time left for the worker's own job (right even when an admin changed its limit), else
  ``SLURMCTL_WORKER_END`` (epoch seconds), which the job script sets from its start and the configured walltime.
* A batch "fits" when now + the p95 of this worker's recent batch durations is before the retirement time, which is
  the end minus ``retire_margin_s`` (time to commit and close) minus a random stagger, so the workers of one wave do
  not all leave together and the cluster replaces them one at a time.
* A worker always runs its first batch (there is no duration to judge by, and a worker that retired before doing
  anything would only be replaced by another one like it). Once a batch did not fit, the worker is retiring: nothing
  more fits.

Plain Python (no Dask, no Prefect): ``tasks/process_shard.py`` keeps one clock per worker process.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import deque
from typing import Callable

from slurmctl.slurm import DEFAULT_KILL_WAIT_S, duration_s, kill_wait_s, time_left_s

END_ENV = "SLURMCTL_WORKER_END"
HISTORY = 50  # batch durations kept per worker (the p95 follows the job as it slows down or speeds up)


def default_stagger_s(walltime_s: float) -> float:
    """5 % of the walltime, at most 2 minutes: 3 s for a 1-minute job, 2 min for an hour."""
    return min(120.0, 0.05 * walltime_s)


def slurm_end_time(job_id: str | None = None, run: Callable[[str], float | None] | None = None) -> float | None:
    """Epoch seconds at which this worker's Slurm job ends, or None outside a Slurm job with no end known."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if job_id:
        # None when squeue is missing on the compute node or slurmctld is slow: the job script's estimate serves.
        seconds = (run or time_left_s)(job_id)
        if seconds is not None:
            return time.time() + seconds
    try:
        return float(os.environ[END_ENV])
    except (KeyError, ValueError):
        return None


class WorkerClock:
    """One worker process's retirement time and batch durations; thread-safe (a worker runs shards in threads)."""

    def __init__(self, end: float | None, margin_s: float = 10.0, stagger_s: float = 0.0,
                 now: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.end = end
        self.now = now
        stagger = (rng or random).uniform(0.0, stagger_s) if stagger_s > 0 else 0.0
        self.retire_at = None if end is None else end - margin_s - stagger
        self.durations: deque[float] = deque(maxlen=HISTORY)
        self.retiring = False
        self.leaving = False
        self.terminated = False  # SIGTERM came (scancel, preemption, the walltime itself): retiring, unplanned
        self.terminated_at: float | None = None
        self.kill_wait_s = DEFAULT_KILL_WAIT_S  # SIGTERM to SIGKILL (the site's KillWait: ``worker_clock`` reads it)
        self._lock = threading.Lock()

    def expected_batch_s(self) -> float:
        """p95 (nearest rank) of the recent batch durations; 0 before the first."""
        with self._lock:
            ordered = sorted(self.durations)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else 0.0

    def record(self, seconds: float) -> None:
        with self._lock:
            self.durations.append(seconds)

    def fits(self) -> bool:
        """May this worker start another batch? False from the first time one would end past the retirement."""
        if self.retiring:
            return False
        if self.retire_at is None or not self.durations:
            return True
        if self.now() + self.expected_batch_s() <= self.retire_at:
            return True
        self.retiring = True
        return False

    def seconds_left(self) -> float | None:
        return None if self.end is None else self.end - self.now()

    def terminate(self) -> None:
        """SIGTERM: no further batch starts, whatever time is left, and no further item of the batches running;
        their items in flight get until ``grace_deadline`` to finish, then the batches save what they did
        (``slurmctl.books.checkpoints``) before Slurm's SIGKILL, ``KillWait`` seconds after the SIGTERM."""
        if self.terminated_at is None:
            self.terminated_at = self.now()
        self.terminated = self.retiring = True

    def halted(self) -> bool:
        """Should the batches running start no further item? (SIGTERM came.)"""
        return self.terminated

    def grace_deadline(self) -> float | None:
        """``time.monotonic()`` by which items in flight must have finished, so that a batch still has time to save
        what it did before the SIGKILL: ``KillWait`` minus a reserve for the writes (30 %, 1 to 5 s). None before a
        SIGTERM."""
        if self.terminated_at is None:
            return None
        reserve = min(5.0, max(1.0, 0.3 * self.kill_wait_s))
        return time.monotonic() + (self.terminated_at + self.kill_wait_s - reserve - self.now())

    def leave(self) -> bool:
        """True the first time it is asked once the worker is retiring: whoever hears it makes the worker leave."""
        with self._lock:
            if self.retiring and not self.leaving:
                self.leaving = True
                return True
            return False


_clock: WorkerClock | None = None
_clock_lock = threading.Lock()


def current_clock() -> WorkerClock:
    """This process's clock, or one with no end known (a SIGTERM before the first shard)."""
    global _clock
    with _clock_lock:
        if _clock is None:
            _clock = WorkerClock(None)
        return _clock


def worker_clock(walltime: str, margin_s: float, stagger_s: float | None) -> WorkerClock:
    """This process's clock, built on first use from its Slurm job's end (the job's config gives the rest)."""
    global _clock
    with _clock_lock:
        if _clock is None or (_clock.end is None and not _clock.terminated):
            wall = duration_s(walltime) or 0.0
            _clock = WorkerClock(slurm_end_time(), margin_s,
                                 default_stagger_s(wall) if stagger_s is None else stagger_s)
            _clock.kill_wait_s = kill_wait_s()
        return _clock
