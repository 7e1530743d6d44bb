"""Running a batch's items through its handler: one by one, or many in flight (``slurmctl.inflight``).

Either way each item gets the same in-batch retries (``slurmctl.errors``), the same circuit breaker and the same
measurements, and the outcomes come back in input order, one per item (None for an item not started because the
breaker had opened or the worker got SIGTERM, or cut off at the end of its SIGTERM grace), so the batch assembles
its rows and its books the same way whatever the concurrency.

* A sync handler with ``concurrency: 1`` (its default) runs in the batch's own thread, as it always has: it need not
  be thread-safe.
* An async handler (default ``concurrency: auto``) runs on the worker process's event loop; a sync handler with
  ``concurrency: N`` or ``auto`` runs in the process's thread pool, driven from that loop. A retry's backoff is an
  async sleep that gives the item's slot to another item meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import math
import statistics
import threading
import time
from typing import Any, Callable

from slurmctl import inflight
from slurmctl.batch_metrics import BatchMeter, CpuShare
from slurmctl.books.shards import SHARDS_PER_THREAD, concurrent_batches
from slurmctl.config import JobConfig
from slurmctl.errors import Backoff, CircuitBreaker, ErrorPolicy, ItemOutcome, acall_with_retries, call_with_retries
from slurmctl.handler import BatchContext, Handler, is_async, is_async_spec, normalise_output

Items = list[tuple[int, dict[str, Any]]]


def concurrency_of(cfg: JobConfig, handler: Handler) -> int | str:
    """The job's ``concurrency`` for this handler: as configured, else ``auto`` for an async one, 1 for a sync one."""
    if cfg.concurrency is not None:
        return cfg.concurrency
    return "auto" if is_async(handler) else 1


def is_concurrent(cfg: JobConfig, handler: Handler) -> bool:
    """Do this handler's items run on the worker's event loop (async, or a ``concurrency`` other than 1)?"""
    return is_async(handler) or concurrency_of(cfg, handler) != 1


def runs_concurrently(cfg: JobConfig) -> bool:
    """Does the job keep several items of a batch in flight (an async handler, or ``concurrency`` other than 1)?
    Imports the handler's module when ``concurrency`` is not set; never builds a class handler."""
    if cfg.concurrency is not None:
        return cfg.concurrency != 1
    return is_async_spec(cfg.handler)


def shards_per_thread(cfg: JobConfig) -> int:
    """Shards each of a worker's configured threads runs at once: 2 when items are in flight together, so when one
    shard drains (its last batch's last calls, the task run's end, the next one's start) the other keeps the
    worker's calls in flight; those threads mostly wait, and book no more cores (``flows.runners``). Else 1."""
    return SHARDS_PER_THREAD if runs_concurrently(cfg) else 1


FIXED_NEED_MIN_CALLS = 20  # calls a batch under a fixed concurrency measures before it says what a limit needs
# ... unless its calls compute (``CpuShare``) this share of the time or more. Measured: urllib calls one at a time
# 0.003-0.043 (the batch's thread), ``concurrency: 4`` in a Dask worker 0.022-0.036 (the item threads); a handler
# that computes 1.0 on an idle machine and 0.26 on 2 cores shared by 2 busy loops and a test suite (between its
# turns on a CPU its thread waits for the GIL, held by another thread that was preempted: not run-queue time).
COMPUTES_SHARE = 0.1
_fixed = [0]  # the calls in flight that the batches of this process under a fixed concurrency allow together, now
_fixed_lock = threading.Lock()


def _raised_by_handler() -> bool:
    """Is the ``CancelledError`` being handled the handler's own (no cancellation of this item's task was asked for:
    it awaited something another task cancelled)? Then it is the item's error; taken for a cancellation, the item
    would silently end not started. Python 3.10 cannot tell (no ``Task.cancelling``): a cancellation there."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is not None and cancelling() == 0


class ItemRun:
    """One batch's items through the handler, with retries, the breaker and the meter."""

    def __init__(self, cfg: JobConfig, handler: Handler, ctx: BatchContext, meter: BatchMeter,
                 breaker: CircuitBreaker | None, on_retry: Callable[..., None],
                 sleep: Callable[[float], None], halted: Callable[[], bool] | None = None,
                 grace_deadline: Callable[[], float | None] | None = None) -> None:
        self.cfg, self.handler, self.ctx, self.meter = cfg, handler, ctx, meter
        self.halted = halted or (lambda: False)  # SIGTERM: no further item starts (None outcomes, handed on)
        self.grace_deadline = grace_deadline or (lambda: None)
        self.breaker, self.on_retry, self.sleep = breaker, on_retry, sleep
        e = cfg.errors
        self.policy, self.backoff, self.max_attempts = ErrorPolicy.of(e), Backoff.of(e), e.max_attempts
        self.id_field = cfg.input.id_field
        self.concurrency = concurrency_of(cfg, handler)
        self.is_async = ctx.async_handler = is_async(handler)
        self.concurrent = is_concurrent(cfg, handler)
        self.gate: Any = None
        self.in_flight_max = 0
        self.loop_held_s = 0.0  # the time this batch's async handler held the worker's event loop (its share)
        self.loop_held: Any = None  # what the job's async handler did to the worker's loop (``loop_watch.Held``)
        # Under a fixed concurrency (1 for a sync handler by default, or ``concurrency: N``): the most calls in flight
        # that the process's batches under one allowed together while this one ran, and ``fixed_need``, worked out
        # once when its items have run (the metrics and the worker's warning read that one answer).
        self.fixed_in_flight = 0
        self.fixed_short: tuple[str, float, float, int] | None = None

    def _broken(self) -> bool:
        return self.breaker is not None and self.breaker.open

    def _stop(self) -> bool:
        return self._broken() or self.halted()

    # --- one by one, in the batch's thread ------------------------------------------------------------------------
    def one_by_one(self, items: Items) -> list[ItemOutcome | None]:
        """Each item's first attempt runs here, and an item that succeeds is done (nearly all of them: a no-op
        handler's loop costs half as much per item as going through the retry loop each time); an item whose first
        attempt raised goes on in ``call_with_retries`` from its second attempt. One call in flight, counted with
        the process's other batches under a fixed concurrency (``fixed_in_flight``); the batch's thread runs the
        calls, so its CPU says whether they compute (``fixed_need``)."""
        return self._fixed_cap(1, lambda: self._one_by_one(items), None)

    def _fixed_cap(self, cap: int, run: Callable[[], list[ItemOutcome | None]],
                   threads: tuple[str, ...] | None, ceiling: int | None = None) -> list[ItemOutcome | None]:
        """``run()``, its ``cap`` calls in flight counted among the process's under a fixed concurrency while it
        runs (at most ``ceiling``: ``concurrency: N``'s slots per process); then ``fixed_need``, with how much the
        calls computed (``CpuShare`` of ``threads``: None, this one). A job without declared limits has nothing to
        need: it measures nothing (a no-op job's fast path)."""
        cpu = CpuShare(threads) if self.ctx.limiters else None
        with _fixed_lock:
            _fixed[0] += cap
            self.fixed_in_flight = _fixed[0]
        try:
            return run()
        finally:
            with _fixed_lock:
                self.fixed_in_flight = max(self.fixed_in_flight, _fixed[0])
                _fixed[0] -= cap
            if ceiling is not None:
                self.fixed_in_flight = min(self.fixed_in_flight, ceiling)
            self.fixed_short = self.fixed_need(cpu) if cpu is not None else None

    def _one_by_one(self, items: Items) -> list[ItemOutcome | None]:
        outcomes: list[ItemOutcome | None] = []
        ctx, meter, breaker, handler, id_field = self.ctx, self.meter, self.breaker, self.handler, self.id_field
        halted, broken = self.halted, False  # only a failure can open the breaker: asked after one
        for _, item in items:
            if broken or halted():
                outcomes.append(None)
                continue

            def call(item: dict[str, Any] = item) -> list[dict[str, Any]]:
                return normalise_output(meter.timed(ctx, handler, item, ctx), item, id_field)

            try:
                rows = call()
            except Exception as exc:
                outcomes.append(call_with_retries(call, self.policy, self.backoff, self.max_attempts, breaker,
                                                  sleep=self.sleep, on_retry=self.on_retry, first_error=exc))
                broken = self._broken()
                continue
            if breaker is not None:
                breaker.record(None)  # as ``call_with_retries`` records a success
            outcomes.append(ItemOutcome(True, result=rows, attempts=1))
        return outcomes

    # --- many in flight, on the worker's event loop ----------------------------------------------------------------
    def concurrently(self, items: Items) -> list[ItemOutcome | None]:
        loop = inflight.worker_loop()  # first: its start imports what a commit needs, before a gate's memory base
        if self.concurrency == "auto":
            self.gate = inflight.auto_gate(self.cfg.job_id or "", self.cfg.max_concurrency)
            self.gate.batch_size = self.cfg.batch_size  # its items in flight are at most this x the batches at once
            self.gate.batches = concurrent_batches(self.cfg)
            pool_size = self.cfg.max_concurrency
        else:
            self.gate = inflight.fixed_gate(self.cfg.job_id or "", int(self.concurrency),
                                           self.cfg.cluster.worker_threads)
            pool_size = self.gate.shared.maximum  # N per worker thread, shared by its two batches
        pool = None if self.is_async else inflight.thread_pool(pool_size)
        # a sync handler's threads tell an adapting gate on its loop; a fixed gate hears nothing it would use
        adapts = pool is not None and self.concurrency == "auto"
        self.ctx.observer = inflight.FromThreads(self.gate, loop.loop) if adapts else self.gate
        if self.concurrency == "auto":
            return self._on_loop(loop, items, pool)
        # ``concurrency: N``: the calls run in the pool's threads or on the loop's, so theirs is the CPU that says
        # whether they compute (the batch's own thread only waits for the loop)
        return self._fixed_cap(int(self.concurrency), lambda: self._on_loop(loop, items, pool), inflight.ITEM_THREADS,
                               ceiling=self.gate.shared.maximum)

    def _on_loop(self, loop: Any, items: Items, pool: Any) -> list[ItemOutcome | None]:
        if pool is not None:  # a sync handler's calls block threads of the pool, not the loop
            return loop.run(self._run_all(items, pool))
        entry = loop.watch.join(self.cfg.job_id or "", self.handler)
        self.loop_held = entry.job
        try:
            return loop.run(self._run_all(items, pool))
        finally:
            self.loop_held_s = loop.watch.leave(entry)

    async def _run_all(self, items: Items, pool: Any) -> list[ItemOutcome | None]:
        gate, loop, breaker = self.gate, asyncio.get_running_loop(), self.breaker
        peak, priority = gate.watch(), inflight.batch_priority()
        calling = [0]  # the batch's attempts in flight now: the breaker's window spans at least them, and at least
        # the process's (its batches' answers to calls sent together are one moment at the API too: a gate cut by a
        # 429 with 63 in flight saw 26 answered 429 at once, 26 of its batch's 30, and the breaker deferred the batch)

        async def attempt(item: dict[str, Any]) -> list[dict[str, Any]]:
            calling[0] += 1
            if breaker is not None:
                breaker.in_flight(max(calling[0], gate.in_flight))
            try:
                with self.meter.call(self.ctx) as latency:
                    if pool is None:  # a decorated handler's sync wrapper may hand back rows, not a coroutine
                        try:
                            result = self.handler(item, self.ctx)
                            if inspect.isawaitable(result):
                                result = await result
                        except asyncio.CancelledError as exc:
                            if not _raised_by_handler():
                                raise
                            raise RuntimeError("the handler raised asyncio.CancelledError, but nothing cancelled "
                                               "its item (did it await a task or future something else cancelled?)"
                                               ) from exc
                    else:  # a sync handler in a thread: the call's context (its token-wait cell) goes with it
                        result = await loop.run_in_executor(pool, contextvars.copy_context().run, self.handler,
                                                            item, self.ctx)
            finally:
                calling[0] -= 1
            gate.observe(latency[0])
            return normalise_output(result, item, self.id_field)

        async def backoff(seconds: float) -> None:
            gate.release()  # the slot goes to another item while this one waits
            try:
                if self.sleep is time.sleep:
                    await asyncio.sleep(seconds)
                else:
                    self.sleep(seconds)  # a test's clock
            finally:
                await gate.acquire(priority)

        def on_retry(err: Any, attempt_no: int, wait: float) -> None:
            if err.error_class == "throttle":
                gate.throttled()
            self.on_retry(err, attempt_no, wait)

        async def run_one(entry: tuple[int, dict[str, Any]]) -> ItemOutcome:
            item = entry[1]
            outcome = await acall_with_retries(lambda: attempt(item), self.policy, self.backoff, self.max_attempts,
                                               self.breaker, sleep=backoff, on_retry=on_retry)
            if not outcome.ok and outcome.error.error_class == "throttle":
                gate.throttled()
            return outcome

        try:
            return await inflight.run_all(items, run_one, gate, stop=self._stop, deadline=self.grace_deadline,
                                          priority=priority)
        finally:
            self.in_flight_max = gate.unwatch(peak)

    def fixed_need(self, cpu: CpuShare) -> tuple[str, float, float, int] | None:
        """Items run under a fixed concurrency (one at a time, or ``concurrency: N``), under a declared limit that
        needs at least twice the calls in flight this process's batches then allow together (``fixed_in_flight``):
        the limit's name, the rate it offers this process, the batch's median call latency and the calls in flight
        that spend the rate (Little's law). None otherwise, before ``FIXED_NEED_MIN_CALLS`` calls measured a
        latency, and when the calls compute rather than wait (``cpu``, started with the batch: ``COMPUTES_SHARE`` or
        more, or not known): more in flight would need more cores, not threads."""
        meter = self.meter
        if not self.ctx.limiters or len(meter.latencies) < FIXED_NEED_MIN_CALLS:
            return None
        share = cpu.share()
        if share is None or share >= COMPUTES_SHARE:
            return None
        latency, most = statistics.median(meter.latencies), None
        for name, leaser in self.ctx.limiters.items():
            offer = getattr(leaser, "even_offer_per_s", lambda: 0.0)()  # all held back: an equal share each
            needed = math.ceil(offer * latency)
            if needed >= 2 * max(self.fixed_in_flight, 1) and (most is None or needed > most[3]):
                most = (name, offer, latency, needed)
        return most

    def reached(self) -> dict[str, float]:
        """For the batch's metrics: the concurrency its gate allowed when it ended and the most items in flight in
        its worker process while it ran (1 and 1 for items run one at a time, with no gate); under ``auto``, when
        ``max_concurrency`` has held fewer in flight than a declared limit needs, how many it needs
        (``AutoGate.capped_need``; under a fixed concurrency: ``fixed_short``); for an async handler that held the
        worker's event loop (``slurmctl.loop_watch``), its seconds (``loop_held_s``)."""
        fixed = self.fixed_short[3] if self.fixed_short else 0
        if self.gate is None:  # one at a time
            return {"concurrency": 1, "in_flight_max": 1, **({"concurrency_needed": fixed} if fixed else {})}
        reached: dict[str, float] = {"concurrency": int(self.gate.limit), "in_flight_max": int(self.in_flight_max)}
        needed = self.gate.capped_need() if isinstance(self.gate, inflight.AutoGate) else fixed
        if needed:
            reached["concurrency_needed"] = needed
        if self.loop_held_s:
            reached["loop_held_s"] = round(self.loop_held_s, 3)
        return reached

