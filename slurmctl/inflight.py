"""Many items in flight in one worker process: its event loop, its concurrency control, a batch's items run together.

Concurrency is not cores. An API-bound job needs ``rate x latency`` calls in flight (Little's law): 500 requests/s
at 200 ms is 100 in flight, which one core drives easily when the calls wait on the network instead of on threads.
So a worker process runs one event loop (a daemon thread, ``worker_loop``) on which the items of every batch its
threads hold are in flight together: an async handler's coroutines directly, a sync handler's calls in a thread
pool (``concurrency: N`` or ``auto`` for a sync handler). A batch's thread hands its items to the loop and waits
for their outcomes, which it collects in input order, so a batch commits as before: once, when every one of its
items has an outcome.

How many are in flight at once is a gate:

* ``FixedGate``: ``concurrency: N``, at most N items of the batch at once.
* ``AutoGate``: ``concurrency: auto``, one per worker process and job, shared by its batches. It starts low. When a
  declared rate limit tells it the rate it offers this process (its fair share), it goes to that rate times the
  latency of the first answers at once (Little's law), plus a queue. Otherwise it doubles while more in flight brings
  more done (slow start), then climbs by a quarter (a half, then double, after steps that paid in a row), judging each
  step by the rate the calls are served at (Little's law: calls in progress over their latency). It stops growing when
  the job's rate limits are saturated (items queue for tokens in ``ctx.limit`` and no slot passes unused); it then
  holds, trimming only a long queue down to the calls in progress (Little's law: ``rate x latency``) plus half as many
  waiting, so the limiter never idles. Without a saturated limit it climbs while more in flight brings more done,
  steps back when it does not (the API queues our calls), and now and then probes lower, keeping the lower limit when
  the rate does not fall: so it follows an API that slows down. An answer of 429 (or any throttling error) shrinks it
  by 30 %: with no declared limit at once, at most once per round trip, each further 429 of that round trip keeping
  its own slot empty, and the slots it grows by open one per answer (a 429 then comes at once, and every call past the
  API's capacity is one), after which it climbs back fast to just below where the 429 came and holds there before
  probing past it; with a declared rate limit, at the end of an interval with more than a sporadic few (``SPORADIC``).
  With a declared rate limit neither throttling nor a probe takes it below the calls that spend the rate the limit
  offers this process (that rate x the latency: measured now, for throttling; the lowest measured, for a probe, so an
  API that queues our calls cannot talk it into more); it never exceeds ``max_concurrency``, and stops growing (then
  shrinks, below what a limit needs if it must) as the worker process nears its Dask memory limit (``MEMORY_HOLD``,
  ``MEMORY_SHRINK``). Its free slots go to the batch that started first, so a worker's batches start their items one
  after another and their tails (the last answers, the commit, the next batch's start) do not fall together.

What a gate reached lands in each batch's metrics (``concurrency``: the gate's limit when the batch ended,
``in_flight_max``: the most items in flight in the process during the batch, and ``concurrency_needed`` when
``max_concurrency`` is below what a declared limit needs), and from there in ``status`` and the progress artifact.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import itertools
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from slurmctl.loop_watch import LoopWatch, new_event_loop

T = TypeVar("T")
R = TypeVar("R")


ITEM_THREADS = ("slurmctl-items", "slurmctl-handler")  # the names of the threads that run items in flight: the
# worker's event loop, and the pool its sync handlers' calls run in (``_N`` after the name)


class EventLoopThread:
    """An asyncio loop running in a daemon thread: other threads hand it coroutines and wait for their results."""

    def __init__(self) -> None:
        self.loop, rounds = new_event_loop()  # its rounds counted, for the watch
        self.thread = threading.Thread(target=self.loop.run_forever, name=ITEM_THREADS[0], daemon=True)
        self.thread.start()
        self.watch = LoopWatch(self.thread, rounds)  # an async handler that blocks the loop is named

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run ``coro`` on the loop and block this (other) thread until it is done."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.watch.stop()
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


_loop: EventLoopThread | None = None
_pool: ThreadPoolExecutor | None = None
_gates: dict[tuple[str, int], "AutoGate"] = {}
_lock = threading.Lock()
_batches = itertools.count()  # batches in the order they started in this process: their priority at a shared gate


def batch_priority() -> int:
    """A new batch's priority at the process's gate: the batches that started earlier are served first."""
    return next(_batches)


def worker_loop() -> EventLoopThread:
    """This process's event loop for items in flight, started on first use."""
    global _loop
    with _lock:
        if _loop is None or not _loop.thread.is_alive():
            if _loop is None:
                atexit.register(close_worker)
                _import_before_items()
            _loop = EventLoopThread()
        return _loop


def _import_before_items() -> None:
    """Import now what a batch's first commit would import while items are in flight: pyarrow builds its first
    array from Python values only after importing pandas (~0.3 s of pure Python holding the GIL; profiled at 0.4 s in
    a worker's first commit, while the loop's requests waited to reach their rate-limit slots)."""
    try:
        import pandas  # noqa: F401
    except ImportError:  # pyarrow then has no pandas to import either
        pass


def close_worker() -> int:
    """The worker is stopping: close its handler instances (async ones on this loop, where their clients were built)
    and stop the loop. Returns how many were closed. Also run at interpreter exit."""
    from slurmctl.handler import close_handlers

    global _loop
    with _lock:
        loop, _loop = _loop, None
    if loop is None or not loop.thread.is_alive():
        return close_handlers()
    try:
        return close_handlers(run=loop.run)
    finally:
        loop.stop()


def thread_pool(size: int) -> ThreadPoolExecutor:
    """This process's threads for sync handlers run with ``concurrency: N``/``auto``: as many as the largest
    concurrency asked (threads are started only when that many calls are in flight)."""
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < size:
            old, _pool = _pool, ThreadPoolExecutor(size, thread_name_prefix=ITEM_THREADS[1])
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def auto_gate(job_id: str, maximum: int) -> "AutoGate":
    """The process's auto-concurrency gate for a job: its batches share one limit, which persists between them."""
    with _lock:
        gate = _gates.get((job_id, maximum))
        if gate is None:
            gate = _gates[(job_id, maximum)] = AutoGate(maximum, memory=memory_share)
        return gate


_memory_limit: int | None = None  # bytes: the Dask worker's memory limit (``set_memory_limit``); None: not known
_process: Any = None


def set_memory_limit(limit: int | None) -> None:
    """This process is a Dask worker allowed ``limit`` bytes (its ``memory_limit``; ``flows/worker_plugin.py`` sets
    it): the auto gates keep their items in flight within it (``memory_share``). None or 0: no limit."""
    global _memory_limit
    _memory_limit = int(limit) if limit else None


def memory_share() -> float | None:
    """This process's resident memory as a share of its worker's memory limit; None when it has none (a batch run
    outside Dask, a worker without a limit). One ``psutil`` read (~20 us), asked once per gate interval."""
    global _process
    if not _memory_limit:
        return None
    if _process is None or _process.pid != os.getpid():  # a worker forked from a template reads its own
        import psutil  # distributed's own dependency

        _process = psutil.Process()
    return _process.memory_info().rss / _memory_limit


class FixedGate:
    """``concurrency: N`` for one batch (``fixed_gate``): at most ``limit`` (N) of its items in flight, within its
    worker process's slots for the job (``shared``: N per worker thread, shared by the batches of the process, each
    thread running two, ``SHARDS_PER_THREAD``; the earlier batch first)."""

    def __init__(self, limit: int, shared: "AutoGate") -> None:
        self.limit = limit
        self.shared = shared
        self._slots: asyncio.Semaphore | None = None

    async def acquire(self, priority: int = 0) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        await self._slots.acquire()
        try:
            await self.shared.acquire(priority)
        except BaseException:
            self._slots.release()
            raise

    def release(self) -> None:
        self.shared.release()
        assert self._slots is not None
        self._slots.release()

    @property
    def in_flight(self) -> int:
        """The process's items in flight for the job (all its batches'), as under ``auto``."""
        return self.shared.in_flight

    def observe(self, latency_s: float) -> None:  # a fixed gate does not adapt
        pass

    def waiting(self, delta: int) -> None:  # ctx.limit's observer: a fixed gate does not adapt
        pass

    def throttled(self) -> None:
        pass

    def expired(self, slots: int) -> None:
        pass

    def offered(self, name: str, per_second: float, even_per_s: float | None = None) -> None:
        pass

    def watch(self) -> list[int]:  # the process's items in flight while the batch runs, as under ``auto``
        return self.shared.watch()

    def unwatch(self, cell: list[int]) -> int:
        return self.shared.unwatch(cell)


class AutoGate:
    """``concurrency: auto``: the in-flight limit of one worker process for one job, adapted every interval from
    what the completions say (see the module docstring). Lives on the worker's event loop: not thread-safe, and needs
    none (only the loop's thread touches it)."""

    START = 4
    MIN_INTERVAL_S = 0.25  # an interval lasts at least this, and 1.5 x the calls' latency
    MIN_DONE = 20  # completions an interval needs before its rate is compared (unless it lasted MAX_INTERVAL_S)
    MAX_INTERVAL_S = 5.0
    BACKOFF = 0.7  # on throttling
    # With a declared limit pacing the calls, 429s on this share of an interval's answers are jitter at the API's
    # burst, not too many calls at once: each waits its Retry-After, and the limiter halves the rate itself when they
    # come close together (a quota change). Shrinking for them starved the limiter: at 500/s, one 429 in ~300 answers
    # cut the calls in flight by 30 % nearly every interval, and slots passed with nobody waiting.
    SPORADIC = 0.02
    QUEUE_SHARE = 0.5  # a saturated limiter's queue is trimmed when longer than this share of the calls in progress
    FED = 2  # items waiting for tokens, on average, that mean the rate limits are saturated (one is being served)
    PAYS = 0.3  # a step up is kept when the rate rose by this share of the step (a step down: fell by less)
    PROBE_DOWN = 0.8
    HOLD = 4  # intervals a limit holds after a step that did not pay, before the next probe
    CAPPED_S = 10.0  # time held at the maximum, short of the calls a declared limit needs, before that is news
    # The worker process's memory, as a share of its Dask memory limit, at which the gate stops growing, and at which
    # it shrinks by a fifth an interval: each item in flight holds its request and its answer, and Dask pauses a
    # worker at 0.8 of its limit (no new task) and restarts it at 0.95, with the batches it holds.
    # A process that needs most of that for itself (a small memory_limit, a big model) keeps MEMORY_ROOM above its own
    # share for its calls, the thresholds moved up with it: holding at 4 in flight for memory it did not take would
    # starve the rate limits for nothing.
    MEMORY_HOLD = 0.6
    MEMORY_SHRINK = 0.7
    MEMORY_ROOM = 0.05

    def __init__(self, maximum: int = 256, start: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 memory: Callable[[], float | None] = lambda: None) -> None:
        self.maximum = max(1, maximum)
        self.limit = min(self.maximum, start or self.START)
        self.clock = clock
        self.memory = memory  # the process's memory as a share of its limit (``memory_share``), None: no limit
        self.memory_base = memory()  # before any item of this gate is in flight: what the calls' memory adds to
        self.memory_hold = max(self.MEMORY_HOLD, (self.memory_base or 0.0) + self.MEMORY_ROOM)
        self.memory_shrink = self.memory_hold + self.MEMORY_SHRINK - self.MEMORY_HOLD
        self.memory_held: tuple[int, float] | None = None  # (limit, share) when memory first held the gate
        self.in_flight = 0
        self.slow_start = True
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap: (priority, arrival, waiter)
        self._arrivals = itertools.count()
        self._watches: list[list[int]] = []
        self._last: tuple[int, float] | None = None  # (limit, rate) before the last step of the climb
        self._hold = 0
        self._paid = 0  # steps up in a row that paid: each climbs further (``_grown``)
        self._probe_down = False
        self._cut_until = 0.0  # throttling cut the gate: until then, each 429 keeps its slot empty ...
        self._parked = 0  # ... these many
        self._unopened = 0  # slots the limit grew by with no declared limit, opened one per answer (``observe``)
        self._ceiling = 0  # no declared limit: the mark a 429 left, the calls in flight less the one it refused
        self.token_waiters = 0  # items waiting in ctx.limit for a token right now
        self.offers: dict[str, float] = {}  # tokens/s each rate limit offers this process (ctx.limit tells us)
        self.even_offers: dict[str, float] = {}  # the same when every process spending it wants more (advice)
        self.base_latency: float | None = None  # the lowest mean latency of an interval: the API's own, unqueued
        self.capped_s = 0.0  # time spent at the maximum while a declared limit needed more in flight (``short_of``)
        self.batch_size, self.batches = 0, 0  # the job's batch_size and the batches a process runs at once (0: not
        # known): its items in flight are at most their product, whatever the gate allows (``supply``)
        self._reset(self.clock())
        self.history: list[tuple[float, int]] = []  # (when, limit) after each change, for tests and benchmarks

    def _reset(self, at: float) -> None:
        self.t0 = self.t_last = at
        self.done = 0
        self.latency_sum = 0.0
        self.throttles = 0
        self.starved = 0  # rate-limit slots that passed unused: nobody was waiting for a token
        self.waiter_area = 0.0  # integral of token waiters over time: their mean over the interval
        self.in_flight_area = 0.0

    def _tick(self) -> None:
        now = self.clock()
        self.waiter_area += self.token_waiters * (now - self.t_last)
        self.in_flight_area += self.in_flight * (now - self.t_last)
        self.t_last = now

    # --- the gate ----------------------------------------------------------------------------------------------------
    async def acquire(self, priority: int = 0) -> None:
        """Wait for a free slot. Waiters of a lower ``priority`` (an earlier batch, ``batch_priority``) go first, so
        a worker's batches start their items one after another instead of side by side: the older one has started
        all its items while the newer one still has items to start. Served side by side, a worker's two batches
        ran out of items to start at the same moment, and the rate limit's slots passed unused through both tails,
        commits and next starts (at 500/s, up to a tenth of a second's slots at a batch end)."""
        while self.in_flight >= self._open():
            waiter = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._arrivals), waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was woken, and will not take the slot: the next waiter may
                raise
        self._tick()
        self.in_flight += 1
        for watch in self._watches:
            watch[0] = max(watch[0], self.in_flight)

    def release(self) -> None:
        self._tick()
        self.in_flight -= 1
        self._wake()

    def observe(self, latency_s: float) -> None:
        """One handler call ended after ``latency_s`` (its time waiting for rate-limit tokens not included)."""
        self.done += 1
        self.latency_sum += latency_s
        if self._unopened:
            self._unopened -= 1
        self._maybe_adjust()
        self._wake()

    def _open(self) -> int:
        """The slots open now: the limit, less those that 429s emptied in the round trip after a cut, and less those
        it grew by that no answer has opened yet. With no declared limit, a 429 is the only sign of too many calls,
        and it comes at once: a limit doubled from 64 to 128 sent 64 calls together, half of them answered 429 in
        the same instant, and the batch's circuit breaker deferred its items to a retry round. Opened one per answer
        (as TCP's window grows with each acknowledgement), the calls past the API's capacity are a few."""
        if self._parked and self.clock() >= self._cut_until:
            self._parked = 0
        return max(1, self.limit - self._parked - self._unopened)

    def _wake(self) -> None:
        free = self._open() - self.in_flight
        while free > 0 and self._waiters:
            waiter = heapq.heappop(self._waiters)[2]
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    # --- what ctx.limit tells it -------------------------------------------------------------------------------------
    def waiting(self, delta: int) -> None:
        self._tick()
        self.token_waiters += delta

    def throttled(self) -> None:
        """An answer of 429 (or another throttling error). With no declared limit pacing the calls, too many are in
        flight for the API: the gate shrinks now, by ``BACKOFF``, at most once per round trip (the answers to calls
        sent before the cut say nothing new), and within that round trip each further 429 keeps its own slot empty
        (its item backs off; ``_open``). Shrinking once an interval let a throttled item's slot go to the next item
        at once, to be answered 429 at once in turn: against an API taking 20 calls at once the job got a storm of
        them, the circuit breaker deferred a fifth of its items to a retry round, and it reached 0.33 of what the
        API allows."""
        self.throttles += 1
        now = self.clock()
        if self.offers:
            return
        if now < self._cut_until:
            slots = self._open()
            if self.in_flight - 1 < slots and slots > 1:  # its slot would go to the next item: keep it empty
                self._parked += 1
            return
        opened = self._open()  # past the last cut's round trip: the limit less the slots no answer has opened yet
        self._ceiling = max(1, min(opened, self.in_flight) - 1)  # the API said no to the last call in flight
        self.limit, self._parked, self._unopened, self._paid = max(1, math.floor(opened * self.BACKOFF)), 0, 0, 0
        self.slow_start, self._last, self._hold = False, None, 0
        self._cut_until = now + self._round_trip()
        self.history.append((now, self.limit))

    def _round_trip(self) -> float:
        """How long the calls sent before a cut take to answer: the lowest mean latency of an interval, or this
        interval's so far, at least ``MIN_INTERVAL_S``."""
        latency = self.base_latency if self.base_latency is not None else (
            self.latency_sum / self.done if self.done else 0.0)
        return max(self.MIN_INTERVAL_S, latency)

    def expired(self, slots: int) -> None:
        self.starved += slots

    def offered(self, name: str, per_second: float, even_per_s: float | None = None) -> None:
        """The rate limit ``name`` offers this process ``per_second`` tokens (its fair share of the declared rate),
        and ``even_per_s`` when every process spending it wants more (an equal share: ``Leaser.even_offer_per_s``)."""
        self.offers[name] = per_second
        self.even_offers[name] = per_second if even_per_s is None else min(per_second, even_per_s)

    def watch(self) -> list[int]:
        """Start counting the most items in flight (a batch's ``in_flight_max``): the cell's ``[0]``, until
        ``unwatch``. Batches that overlap each count their own time."""
        cell = [self.in_flight]
        self._watches.append(cell)
        return cell

    def unwatch(self, cell: list[int]) -> int:
        self._watches.remove(cell)
        return cell[0]

    # --- the control -------------------------------------------------------------------------------------------------
    def _maybe_adjust(self) -> None:
        self._tick()  # the areas up to now: since the last acquire or release is part of the interval judged
        now = self.t_last
        elapsed = max(now - self.t0, 1e-9)
        if self.done == 0:
            return
        # In slow start with a declared limit, the first answer gives the latency Little's law needs: go there at
        # once (the interval's 1.5 latencies cost a job of 1 s answers its first second at a few calls in flight).
        need = self._littles_law()
        if need is None and elapsed < max(self.MIN_INTERVAL_S, 1.5 * self.latency_sum / self.done):
            return
        # Back below the mark a 429 left (``_recover``): no rates to compare. A probe down is judged first.
        recovering = self.limit < self._ceiling and not self.offers and self._last is None
        if (need is None and self.done < min(self.MIN_DONE, 2 * self.limit) and elapsed < self.MAX_INTERVAL_S
                and not recovering):
            return  # too few completions to compare rates yet (a few rounds of the calls in flight at least)
        rate = self.done / elapsed
        mean = self.latency_sum / self.done
        self.base_latency = mean if self.base_latency is None else min(self.base_latency, mean)
        waiters = self.waiter_area / elapsed
        used = self.in_flight_area / elapsed
        old = self.limit
        if need is not None:
            self.limit = need
            self.slow_start, self._last = False, None
        elif self.throttles and not self.offers:  # too many at once: ``throttled`` has cut the gate; hold
            self.slow_start, self._last = False, None
        elif self.throttles > self.SPORADIC * self.done and self.offers:
            self.limit = max(math.floor(self.limit * self.BACKOFF), min(self.limit, self._paced()))  # never up
            self.slow_start, self._last, self._hold = False, None, self.HOLD
        elif self.starved and waiters < self.limit / 2 and used >= 0.7 * self.limit:
            # The limiter had slots nobody was ready for: more must be in flight (a starved limiter is not saturated).
            self.limit = self._grown()
            self.slow_start, self._last = False, None
        elif waiters >= self.FED:
            # The rate limits are saturated: items queue for tokens, so more in flight would only queue longer. Hold,
            # and trim only a long queue, down to the calls in progress (Little's law: rate x latency, measured)
            # plus a queue that keeps the limiter fed through the calls' jitter. Never from the achieved rate alone:
            # a limiter starved for a moment would shrink the limit, and starve it more.
            calling = max(0.0, used - waiters)
            keep = max(self.FED * 2, self.QUEUE_SHARE * calling)
            if waiters > keep:
                self.limit = max(math.ceil(calling + keep), math.floor(self.limit * 0.9))
            self.slow_start, self._last = False, None
        elif used >= 0.7 * self.limit and recovering:
            self._recover()
        elif used >= 0.7 * self.limit:  # judge only a limit that is used
            # The rate the calls were served at, by Little's law: the calls in progress over their mean latency.
            # Counting the answers instead judged a step by where its interval's last answer fell in a wave: calls
            # that start together answer together, so 7 or 9 in flight both took three waves of 200 ms to bring 20
            # answers, and a step up that raised the calls served by a quarter looked as if it brought nothing.
            self._climb(max(0.0, used - waiters) / mean if mean > 0 else rate)
        else:
            self._last = None
        self._within_memory(old)
        self.limit = max(1, min(self.maximum, self.limit))
        if self.limit > old and not self.offers:  # a declared limit paces the calls: no need to open gradually
            self._unopened = min(self._unopened + self.limit - old, self.limit - 1)
        elif self.limit < old:
            self._unopened = 0
        if (self.limit >= self.maximum or self.supply < self.maximum) and self.short_of():
            self.capped_s += elapsed
        if self.limit != old:
            self.history.append((now, self.limit))
            if len(self.history) > 1000:
                del self.history[:500]
        self._reset(now)

    def _paced(self) -> int:
        """With a declared limit offering this process a rate: the calls in progress that spend it (rate x latency,
        measured). Throttling never shrinks the gate below it: the limiter paces the calls whatever the concurrency,
        so fewer in flight than that only leaves its slots unused (a 500/s job whose 429s came in bunches shrank
        to 80 in flight and ran at a sixth of its rate). 0 without a declared limit."""
        return math.ceil(self._offered_in_progress()) if self.offers and self.done else 0

    def _probe_floor(self) -> int:
        """With a declared limit: how low a probe may take the gate, the calls that spend the rate it offers at the
        lowest latency measured (Little's law). Below that its slots pass unused whatever the API does; the probes'
        rates are noisy, and at 1 s answers probing took a job to 163 in flight where 250 were needed (0.8 of its
        rate). The lowest latency, not the latest: an API that slows down because it queues our calls would
        otherwise raise the floor with every call added. 0 without a declared limit."""
        if not self.offers or self.base_latency is None:
            return 0
        return math.ceil(self.least_offer()[1] * self.base_latency)

    def _within_memory(self, old: int) -> None:
        """Memory bounds the gate as ``max_concurrency`` does: from ``MEMORY_HOLD`` of the worker's limit it grows
        no more, from ``MEMORY_SHRINK`` it shrinks by a fifth, whatever the rate limits need. Below that it grows
        only as far as the memory each call in flight holds now says fits under ``MEMORY_HOLD``: Little's law's
        jump (1,250 in flight at once for 1 s answers at 1,000/s) would otherwise overshoot before the next look."""
        share = self.memory()
        if share is None:
            return
        if share < self.memory_hold:
            ceiling = max(old, self._memory_room(share))
        else:
            ceiling = max(1, math.floor(old * 0.8)) if share >= self.memory_shrink else old
        if self.limit > ceiling:
            self.limit = ceiling
            self.slow_start, self._last = False, None
            if self.memory_held is None:
                self.memory_held = (ceiling, share)

    def _memory_room(self, share: float) -> int:
        """The calls in flight that fit under the hold threshold at what each one in flight now adds to the process's
        memory (its growth since the gate started, per call); no bound when that is not measurable yet."""
        grown = share - (self.memory_base or 0.0)
        if self.in_flight <= 0 or grown <= 0:
            return self.maximum
        return max(1, math.floor((self.memory_hold - (self.memory_base or 0.0)) * self.in_flight / grown))

    @property
    def supply(self) -> int:
        """The most items this process's batches hold at once (``batch_size`` x the batches it runs at once), which
        bounds its items in flight as ``maximum`` does (``maximum`` when not known)."""
        return self.batch_size * self.batches if self.batch_size and self.batches else self.maximum

    def short_of(self) -> int:
        """With a declared limit: the calls in flight that spend an equal share of it (``even_offers``) at the lowest
        latency measured, when ``max_concurrency`` or the items its batches hold (``supply``) are below them, else 0.
        The process then holds fewer in flight and the limit's slots pass unused: 1 s answers at 1,000/s per process
        need 1,000 in flight, and 256 spend a quarter of the rate; batches of 50 on one thread hold at most 100. Only
        the user can lift that (``slurmctl.pace_advice``). An equal share, not the rate offered: held back, every
        process leaves lanes unused that the others are then offered, and sizing on those overstated the need twice
        over."""
        if not self.even_offers or self.base_latency is None:
            return 0
        need = math.ceil(self.least_offer(even=True)[1] * self.base_latency)
        return need if need > min(self.maximum, self.supply) else 0

    def capped_need(self) -> int:
        """``short_of``, once the gate has spent ``CAPPED_S`` at its maximum short of it (a pattern, not a job's
        tail, where one worker's share of the limit grows as the others finish), else 0."""
        return self.short_of() if self.capped_s >= self.CAPPED_S else 0

    def _offered_in_progress(self) -> float:
        """Little's law for the rate the declared limits offer us: that rate x the calls' mean latency."""
        return self.least_offer()[1] * self.latency_sum / self.done

    def least_offer(self, even: bool = False) -> tuple[str, float]:
        """The declared limit that offers us the lowest rate, and that rate (``even``: an equal share of it). Read
        from a copy (one C-level call): a sync handler's thread may add a limit's first offer meanwhile, and a
        batch's thread asks too."""
        return min(dict(self.even_offers if even else self.offers).items(), key=lambda kv: kv[1])

    def _littles_law(self) -> int | None:
        """In slow start, with a declared limit offering us a rate and the calls' latency measured: how many must be
        in flight (Little's law, plus a queue that keeps the limiter fed), when that is more than the limit now. The
        gate goes there at once instead of doubling an interval at a time: at 1 s answers each doubling waited for
        enough answers, about 10 s to reach 50/s. Too many is harmless (items queue for tokens, and the saturated
        branch trims the queue)."""
        if not (self.slow_start and self.offers) or self.throttles:
            return None
        need = math.ceil(self._offered_in_progress() * (1 + self.QUEUE_SHARE / 2))
        return need if need > self.limit else None

    def _recover(self) -> None:
        """No declared limit, an interval with no 429 below the mark the last cut left (the calls in flight when the
        429 came, less the one it refused): halfway back there (at least one more), without weighing the rate. Below
        the mark the API took the calls before, and the cut was for the moment it said no. Climbing back as from
        scratch (a hold of four intervals, a probe down, then steps of a quarter, each weighed) kept the gate at
        0.6-0.8 of an API's cap on calls at once on average; TCP's congestion control, which meets the same
        sawtooth, regrows fast towards the window where it lost a packet and probes carefully past it (BIC, CUBIC).
        Past the mark the climb weighs each step as before, so an API that only queues more calls is not pushed."""
        self.limit = min(self._ceiling, self.limit + max(1, math.ceil((self._ceiling - self.limit) / 2)))
        self._last, self._hold = None, self.HOLD if self.limit == self._ceiling else 0  # there: hold, then probe

    def _climb(self, rate: float) -> None:
        """No limit saturated: find the concurrency past which more in flight brings no more done (hill climbing on
        ``rate``, the rate the calls are served at). A step up is kept when the rate rose with it (at least 30 % of
        the step), a step down when the rate did not fall with it; otherwise the previous limit comes back and holds
        a few intervals. While holding, the next probe alternates up and down, so a limit follows an API that slows
        down too."""
        last = self._last
        if last is not None:
            before, before_rate = last
            step = self.limit / before - 1
            if rate < before_rate * (1 + self.PAYS * step):  # up: did not pay; down: cost too much. Step back.
                self.limit, self._last, self._hold, self._paid = before, None, self.HOLD, 0
                self.slow_start = self.slow_start and step < 0
                return
            self._last = (self.limit, rate)  # the step paid (up) or cost nothing (down): go on the same way
            self._paid = self._paid + 1 if step > 0 else 0
            if step < 0:  # the API took no more at the mark a 429 left: the mark comes down too
                self._ceiling = min(self._ceiling, self.limit)
            self._step(down=step < 0)
            return
        if self._hold > 0:
            self._hold -= 1
            return
        self._probe_down = not self._probe_down and not self.slow_start
        self._last, self._paid = (self.limit, rate), 0
        self._step(down=self._probe_down)

    def _step(self, down: bool) -> None:
        floor = self._probe_floor()
        if down and self.limit > max(1, floor):
            self.limit = max(math.floor(self.limit * self.PROBE_DOWN), floor)
        elif not down and self.limit < self.maximum:
            self.limit = self.limit * 2 if self.slow_start else self._grown(self._paid)
        else:
            self._last = None  # nowhere to go

    def _grown(self, paid: int = 0) -> int:
        """A quarter more; after steps up that paid in a row, a half, then double (as TCP's BIC probes past the
        window where it last lost a packet): a worker left alone under an API's cap when the other finished its
        work climbed from 2 calls in flight back to the cap a quarter at a time, one interval per step."""
        return max(self.limit + 1, math.ceil(self.limit * (1 + 0.25 * 2 ** min(paid, 2))))


class FromThreads:
    """What ``ctx.limit`` tells a gate from a sync handler's threads (an item waiting for tokens, slots that passed
    unused), handed to the gate on its event loop, the one thread that touches it. Unseen, the items waiting
    for tokens in those threads counted as calls at the API: the climb judged each step by the calls in flight over
    their latency, so every step up paid, and a sync handler under a declared limit went to ``max_concurrency``
    (256 threads a process where 50 spend the rate) and lost a tenth of the rate to them on 2 cores."""

    def __init__(self, gate: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.gate, self.loop = gate, loop

    def waiting(self, delta: int) -> None:
        self.loop.call_soon_threadsafe(self.gate.waiting, delta)

    def expired(self, slots: int) -> None:
        self.loop.call_soon_threadsafe(self.gate.expired, slots)

    def offered(self, name: str, per_second: float, even_per_s: float | None = None) -> None:
        self.gate.offered(name, per_second, even_per_s)  # two dict writes: safe from any thread, needed at once


class SharedSlots(AutoGate):
    """``concurrency: N``'s slots of one worker process for one job (``fixed_gate``): N per worker thread, a fixed
    ``AutoGate`` (it counts, ranks the batches waiting and watches the process's peak; it never adapts). Each thread
    runs two batches, so one draining leaves the other's items going; without these, the two together kept 2N in
    flight per thread, twice what a user sizing N to an API's concurrency allowance counted on."""

    def __init__(self, slots: int) -> None:
        super().__init__(maximum=slots, start=slots)

    def _maybe_adjust(self) -> None:
        pass

    def throttled(self) -> None:
        pass


def fixed_gate(job_id: str, per_batch: int, threads: int) -> FixedGate:
    """``concurrency: N``: a batch's gate, at most N of its items in flight, within the process's ``N x threads``
    (its configured worker threads) for the job (``SharedSlots``, which persist between batches, like ``auto_gate``)."""
    slots = per_batch * max(1, threads)
    with _lock:
        shared = _gates.get((f"{job_id} fixed", slots))
        if shared is None:
            shared = _gates[(f"{job_id} fixed", slots)] = SharedSlots(slots)
    return FixedGate(per_batch, shared)


async def run_all(items: list[T], run_one: Callable[[T], Awaitable[R]], gate: Any,
                  stop: Callable[[], bool] = lambda: False,
                  deadline: Callable[[], float | None] = lambda: None, priority: int = 0) -> list[R | None]:
    """Run ``run_one`` over ``items`` with as many in flight as ``gate`` allows (``priority``: the batch's rank
    there), started in input order; return their results in input order. Once ``stop()`` says so (a batch's circuit
    breaker opened, the worker got SIGTERM), no further item starts: those not started are None. Items already in
    flight finish, unless ``deadline()`` (``time.monotonic()``, a SIGTERM's grace) passes first: those are cancelled
    and None too (a sync handler's thread runs on, its result unused)."""
    results: list[R | None] = [None] * len(items)
    tasks: set[asyncio.Task[None]] = set()
    started: list[asyncio.Task[None]] = []

    async def one(i: int, item: T) -> None:
        try:
            results[i] = await run_one(item)
        finally:
            gate.release()

    try:
        for i, item in enumerate(items):
            await gate.acquire(priority)
            if stop():
                gate.release()
                break
            task = asyncio.ensure_future(one(i, item))
            tasks.add(task)
            started.append(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            until = deadline()
            wait = None if until is None else until - time.monotonic()
            if wait is not None and wait <= 0:
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                break
            # Re-asked every 0.2 s: a SIGTERM may come while the last items are in flight.
            await asyncio.wait(set(tasks), timeout=0.2 if wait is None else min(wait, 0.2))
        for task in started:  # what an item raised (not its cancellation at the deadline) is the batch's
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    return results
