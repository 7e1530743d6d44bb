"""Measuring one batch as it runs, for the ``metrics`` of its task manifest (``books.manifests.BatchMetrics``).

Cheap enough for 10k-item batches: one float per handler call (its latency), sorted once at the end for the
percentiles; nothing per item lands in the manifest. The worker measures, so the numbers are the batch's own wherever
it ran (a LocalCluster process, a Slurm job).
"""

from __future__ import annotations

import math
import os
import resource
import socket
import sys
import threading
import time
from typing import Any, Callable

from slurmctl.books.manifests import BatchMetrics, Latency, now
from slurmctl.handler import call_blocked


def percentile(ordered: list[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of an ascending list (None when empty): a value that was measured."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class CpuShare:
    """How much of the time they could have had a CPU some threads spent computing: their CPU time over the wall
    time since this was made, less the time they sat in the run queue waiting for a CPU (Linux's ``schedstat``).
    ``threads``: the calling thread (None), or the process's threads whose names start with one of these (those
    that run items in flight: ``inflight.ITEM_THREADS``, the worker's event loop and its handler threads).

    A handler that computes scores near 1 however busy the machine: on 2 cores shared by 8 busy loops, a thread
    spinning 20 ms a call got a fifth of the wall time and waited the rest, where its CPU time over the wall time
    alone said 0.2, as a handler that waits might. One that sleeps or reads a socket scores near 0. Elsewhere (no
    ``/proc``) the CPU time (the thread's, or the process's) over the wall time. ``share()`` is None when the run
    queue took nearly all of the time: nothing can be told."""

    def __init__(self, threads: tuple[str, ...] | None = None) -> None:
        self.threads = threads
        self.t0 = time.perf_counter()
        self.before = self._read()

    def _read(self) -> dict[int, tuple[float, float]]:
        """CPU and run-queue seconds by thread (0: the calling thread, or the process off Linux)."""
        try:
            if self.threads is None:
                return {0: _schedstat("/proc/thread-self/schedstat")}
            out = {}
            for t in threading.enumerate():
                if t.name.startswith(self.threads) and t.native_id is not None:
                    try:
                        out[t.native_id] = _schedstat(f"/proc/self/task/{t.native_id}/schedstat")
                    except OSError:  # a thread that ended meanwhile
                        pass
            return out
        except OSError:
            return {0: (time.thread_time() if self.threads is None else time.process_time(), 0.0)}

    def share(self) -> float | None:
        wall, cpu, wait = time.perf_counter() - self.t0, 0.0, 0.0
        for tid, (c, w) in self._read().items():  # a thread started since: all of its time is since
            c0, w0 = self.before.get(tid, (0.0, 0.0))
            cpu, wait = cpu + max(0.0, c - c0), wait + max(0.0, w - w0)
        room = wall - wait
        if room <= 0.1 * wall:
            return None
        return cpu / room


def _schedstat(path: str) -> tuple[float, float]:
    """A thread's seconds on a CPU and in the run queue (the first two of ``schedstat``'s nanosecond counters)."""
    with open(path, "rb") as f:
        on_cpu, waited = f.read().split()[:2]
    return int(on_cpu) / 1e9, int(waited) / 1e9


class BatchMeter:
    """Started when a batch starts (before its slice is read); ``call`` wraps each handler call; ``metrics`` says
    what the batch cost.

    CPU is ``time.thread_time()`` of the calling thread: a worker runs several batches at once in threads, and the
    process's CPU time would charge each batch with the others'. Work the batch hands to other threads (pyarrow's
    compression pool) is not in it. ``ctx`` (``call``'s argument) is the batch's ``BatchContext``: the time it was
    blocked acquiring rate-limit tokens (``limiter_blocked_s``) is taken out of the latency of the call it happened
    in, and reported on its own as ``tokens_waited_s``.
    """

    def __init__(self, concurrent: bool = False) -> None:
        self.started_at = now()
        self.t0 = time.perf_counter()
        self.cpu0 = time.thread_time()
        self.latencies: list[float] = []  # seconds, one per handler call
        self.concurrent = concurrent  # items in flight together: each call's own token wait, not the batch's

    def call(self, ctx: Any) -> "_Call":
        """Time one handler call; the yielded cell holds its latency afterwards (``[0]``, seconds). With items in
        flight together, the time this call was blocked in ``ctx.limit`` is its own (a context variable), not the
        batch's total, which moves with the other items' waits. (A class, not a generator: it wraps every item, and
        ``contextlib``'s machinery cost a no-op job more than the rest of the meter.)"""
        return _Call(self, ctx)

    def timed(self, ctx: Any, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its latency recorded: ``call`` for items run one at a time, where the batch's token wait
        during the call is the call's own (half the cost of the context manager, for the no-op job's sake)."""
        t, blocked = time.perf_counter(), ctx.limiter_blocked_s
        try:
            return fn(*args)
        finally:
            self.latencies.append(max(0.0, time.perf_counter() - t - (ctx.limiter_blocked_s - blocked)))

    def metrics(self, items: int, counters: dict[str, float], tokens_waited_s: float) -> BatchMetrics:
        ordered = sorted(self.latencies)

        def ms(p: float) -> float | None:
            v = percentile(ordered, p)
            return None if v is None else round(v * 1000, 3)

        return BatchMetrics(
            **counters, items=items, api_calls=len(ordered),
            latency_ms=Latency(p50=ms(50), p95=ms(95), max=ms(100)), tokens_waited_s=round(tokens_waited_s, 4),
            cpu_s=round(time.thread_time() - self.cpu0, 4), peak_rss_mb=peak_rss_mb(), host=socket.gethostname(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"), started_at=self.started_at, finished_at=now(),
            duration_s=round(time.perf_counter() - self.t0, 4))


class _Call:
    """``BatchMeter.call``'s context manager."""

    __slots__ = ("meter", "ctx", "t", "blocked", "cell", "token")

    def __init__(self, meter: BatchMeter, ctx: Any) -> None:
        self.meter, self.ctx = meter, ctx

    def __enter__(self) -> list[float]:
        self.t, self.blocked = time.perf_counter(), self.ctx.limiter_blocked_s
        self.cell = [0.0]
        # One item at a time, the batch's total wait is this call's: no context variable to set (a Prefect task's
        # context holds many, and setting one costs the no-op job more than the call's timing).
        self.token = call_blocked.set(self.cell) if self.meter.concurrent else None
        return self.cell

    def __exit__(self, *exc: Any) -> None:
        if self.token is not None:
            call_blocked.reset(self.token)
        cell = self.cell
        waited = cell[0] if self.meter.concurrent else self.ctx.limiter_blocked_s - self.blocked
        cell[0] = max(0.0, time.perf_counter() - self.t - waited)
        self.meter.latencies.append(cell[0])
