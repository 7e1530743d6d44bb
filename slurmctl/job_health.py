"""The job's health over a recent window: its error rate and its workers' time spent waiting for rate-limit tokens.

Pure arithmetic over the coordinator's running totals, sampled once per heartbeat (``flows.events`` feeds it and
emits the events): a job of 50,000 batches is judged every couple of seconds, never per batch. A threshold is
*crossed* when the share goes above it; it must fall back to it or below before it can be crossed again, so one bad
spell is one event, not one per heartbeat.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """Running totals at one moment (monotonic seconds)."""

    at: float
    succeeded: int
    failed: int
    waited_s: float  # seconds worker threads spent blocked on the rate limiter, all batches so far


def error_rate_pct(succeeded: int, failed: int, min_items: int) -> float | None:
    """Failed items as a percentage of the finished ones; None below ``min_items`` (too few to judge)."""
    finished = succeeded + failed
    if finished < min_items or finished <= 0:
        return None
    return 100.0 * failed / finished


def token_wait_pct(waited_s: float, seconds: float, worker_threads: int) -> float | None:
    """Time blocked on rate-limit tokens as a percentage of the worker threads' time; None for an empty window."""
    capacity = seconds * max(1, worker_threads)
    if seconds <= 0:
        return None
    return min(100.0, 100.0 * max(0.0, waited_s) / capacity)


def crossed(above: bool, value: float | None, threshold: float) -> tuple[bool, bool]:
    """``(above now, crossed upwards now)``: the edge, so a share that stays high is reported once."""
    if value is None:
        return above, False
    now_above = value > threshold
    return now_above, now_above and not above


@dataclass
class Window:
    """The shares over the last ``seconds``, from samples of running totals (the oldest one inside the window is
    the baseline: its differences with the newest are the window's items and wait)."""

    seconds: float
    samples: deque[Sample]

    @classmethod
    def of(cls, seconds: float) -> "Window":
        return cls(seconds, deque())

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        while len(self.samples) > 2 and sample.at - self.samples[1].at >= self.seconds:
            self.samples.popleft()

    def error_rate_pct(self, min_items: int) -> float | None:
        if len(self.samples) < 1:
            return None
        first, last = self._ends()
        return error_rate_pct(last.succeeded - first.succeeded, last.failed - first.failed, min_items)

    def token_wait_pct(self, worker_threads: int) -> float | None:
        if len(self.samples) < 2:
            return None
        first, last = self._ends()
        return token_wait_pct(last.waited_s - first.waited_s, last.at - first.at, worker_threads)

    def _ends(self) -> tuple[Sample, Sample]:
        return self.samples[0], self.samples[-1]
