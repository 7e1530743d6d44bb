"""Distributed rate limiting with token leases: the maths and the worker-side spender, independent of the backend.

The shared state of one limit is a GCRA ("generic cell rate algorithm") schedule split into ``L`` interleaved
*lanes*: request slots lie on one grid ``1/rate`` apart, and lane ``j`` owns every ``L``-th of them (``tats[j]`` is
the time of its next free slot, in integer microseconds). A worker *leases* ``n`` slots of one lane in one
conditional write — ``tats[j] += n * L/rate`` — and spends them locally, one request per slot, at the slot's time.

Why lanes: a lease of consecutive slots must be spent by one worker at the full rate, which a worker whose request
takes longer than ``1/rate`` cannot do (its slots pass unused). A lane runs at ``rate/L`` (about 2/s by default), so
any worker can keep up with one, a fast worker holds several, and a lease can be long (``lease_size`` 32 slots) —
which is what keeps the backend at a few percent of a call per request. So:

* the backend (DynamoDB, or SQLite on one machine) sees one write per lease, not one per request;
* across all workers, requests in any window of ``T`` seconds are at most ``rate * T + burst``: slots are disjoint,
  and the lanes' grids interleave, so the sum of all lanes is evenly spaced at ``rate``;
* a dead worker's unused slots simply pass (a slot is a moment in time): it costs at most its leases;
* refill needs no background process: it is implied by the clock;
* leases are long, so changes cannot wait for the next lease. Pause, ``slurmctl rate`` and throttling (a 429 halves
  the shared rate, not below ``floor``, at most once per second, and honours ``Retry-After``) start a new *epoch*:
  every lane restarts at ``anchor`` (a grace period from now) and leases of older epochs are void. Workers learn of
  a new epoch through a cheap *signal* (the limit's row in SQLite, or a small object in the job's manifest store
  next to DynamoDB) that they check about once a second: a change applies everywhere within ~1-2 s.

The backend is the truth and the signal only makes changes fast: a lease is granted in the backend's current epoch
and refused while paused, so a worker that cannot read the signal learns of a change at its next lease at the latest.
Failures are never silent: a failed read is retried soon, logged once per outage and counted
(``ratelimit_<name>_signal_errors`` in the batch's metrics); a signal that cannot be published raises
``SignalNotPublished``.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, MutableMapping, Protocol

from slurmctl.ratelimit.outages import OutageLog

US = 1_000_000
LANE_RATE = 2.0  # requests/s of one lane by default: slow enough for a worker whose request takes ~250 ms
MAX_LANES = 64  # keeps the DynamoDB item under 1 KB (one write unit per lease)


log = logging.getLogger("slurmctl.ratelimit")


def now_us() -> int:
    return int(time.time() * US)


class SignalNotPublished(RuntimeError):
    """A limit's state changed in the backend, but the signal its workers poll could not be written.

    The change stands (the backend grants leases from its current state), so workers that did not hear of it follow
    it at their next lease; publishing again — running the same command again — repairs the signal.
    """


@dataclass
class LimitSpec:
    """A limit as configured: requests per second, burst, adaptive bounds, lease size, lanes."""

    per_second: float
    burst: int = 1
    floor: float | None = None  # lowest rate after throttling (default: per_second / 10)
    ceiling: float | None = None  # highest rate `slurmctl rate` may set (default: per_second * 10)
    lease_size: int = 32
    lanes: int | None = None  # interleaved schedules (default: one per LANE_RATE requests/s, at most MAX_LANES)
    horizon_s: float = 60.0  # never book a lease that starts further ahead than this (workers queue behind others)
    late_s: float = 0.1  # a slot may still be used this late (a busy worker catching up sends a small burst)
    recovery_s: float = 30.0  # time to climb from floor back to the target after throttling
    signal_s: float = 1.0  # how often a worker checks the limit's signal (pause, rate change, throttling)

    @property
    def floor_rate(self) -> float:
        return self.floor if self.floor is not None else self.per_second / 10

    @property
    def ceiling_rate(self) -> float:
        return self.ceiling if self.ceiling is not None else self.per_second * 10

    @property
    def lane_count(self) -> int:
        return self.lanes or max(1, min(MAX_LANES, math.ceil(self.per_second / LANE_RATE)))

    @property
    def lane_s(self) -> float:
        """Spacing of one lane's slots at the configured rate."""
        return self.lane_count / self.per_second

    @property
    def grace_us(self) -> int:
        """How far ahead a new epoch starts: every worker has seen the signal by then, so old leases are over."""
        return int((self.signal_s + 0.25) * US)


@dataclass
class LimitState:
    """What the backend stores for one limit (one DynamoDB item / one SQLite row)."""

    key: str
    tats: list[int]  # µs, next free slot of each lane
    target: float  # requests/s wanted (config or `slurmctl rate`)
    rate: float  # rate right after the last throttling decrease
    changed_at: int  # µs of that decrease
    floor: float
    ceiling: float
    burst: int
    recovery_s: float
    paused: bool = False
    granted: int = 0  # total slots leased (for status)
    throttled: int = 0  # times throttling was reported
    epoch: int = 0  # bumped by pause, resume, rate changes and throttling: older leases are void
    anchor: int = 0  # µs at which the current epoch's schedule starts

    @classmethod
    def new(cls, key: str, spec: LimitSpec, at_us: int) -> "LimitState":
        # Lanes idle (in the past) on one grid: the first slots of all lanes interleave.
        interval = round(US / spec.per_second)
        return cls(key=key, tats=[j * interval for j in range(spec.lane_count)], target=spec.per_second,
                   rate=spec.per_second, changed_at=at_us, floor=spec.floor_rate, ceiling=spec.ceiling_rate,
                   burst=spec.burst, recovery_s=spec.recovery_s)

    @property
    def lanes(self) -> int:
        return len(self.tats)

    def effective_rate(self, at_us: int) -> float:
        """The rate in force now: the last decreased rate, recovering linearly to the target."""
        if self.rate >= self.target:
            return self.target
        climb = (self.target - self.floor) * max(0, at_us - self.changed_at) / (self.recovery_s * US)
        return min(self.target, self.rate + climb)

    def restart(self, anchor_us: int, at_us: int) -> None:
        """A new epoch: every lane starts again at ``anchor``, interleaved at the rate in force."""
        interval = round(US / self.effective_rate(at_us))
        self.epoch += 1
        self.anchor = anchor_us
        self.tats = [anchor_us + j * interval for j in range(self.lanes)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lease:
    start_us: int
    interval_us: int
    count: int
    lane: int = 0
    epoch: int = 0

    @property
    def end_us(self) -> int:
        return self.start_us + self.interval_us * self.count


@dataclass(frozen=True)
class Wait:
    seconds: float
    paused: bool = False


@dataclass(frozen=True)
class Signal:
    """What workers poll between leases: the epoch, and whether the limit is paused."""

    epoch: int
    paused: bool


def earliest_slot_us(state: LimitState, at_us: int, interval_us: int) -> int:
    """The earliest slot a lease may start at: ``burst`` slots back (an idle limit can burst, no more)."""
    return at_us - state.burst * interval_us


def _lane_start(state: LimitState, lane: int, earliest: int, lane_interval: int) -> int:
    """The lane's next slot: its tat, or — an idle lane — its first grid point no earlier than ``earliest``."""
    tat = state.tats[lane]
    if tat >= earliest:
        return tat
    return tat + -(-(earliest - tat) // lane_interval) * lane_interval


def plan_lease(state: LimitState, n: int, at_us: int, horizon_s: float, *, exclude: Iterable[int] = (),
               prefer: int | None = None, spread: bool = False) -> Lease | Wait:
    """Which lane and slots a lease of ``n`` would get (its ``end_us`` is the lane's new tat); or how long to wait.

    Among the lanes not in ``exclude`` (those the worker already holds): ``prefer`` (the lane of the lease being
    renewed) while nothing is booked behind that lease; else one of the lanes free soonest, at random, so workers
    deciding from the same view don't all pick the same lane. With ``spread``, any lane free within the horizon will
    do and one far from the excluded lanes is taken, so one worker's slots are spread over the rate's grid.
    """
    if state.paused:
        return Wait(0.5, paused=True)
    interval = max(1, round(US / state.effective_rate(at_us)))
    lane_interval = interval * state.lanes
    earliest = earliest_slot_us(state, at_us, interval)
    held = set(exclude)
    lanes = [j for j in range(state.lanes) if j not in held] or list(range(state.lanes))
    starts = {j: _lane_start(state, j, earliest, lane_interval) for j in lanes}
    latest = at_us + int(horizon_s * US)
    if spread and held:
        def distance(j: int) -> int:
            return min(min(abs(j - h), state.lanes - abs(j - h)) for h in held)
        free = [j for j in lanes if starts[j] <= latest]
        if free:
            # far from our lanes, and random among the far ones: workers looking at once don't pick the same lane
            far = max(distance(j) for j in free)
            lane = random.choice([j for j in free if 2 * distance(j) >= far])
            return Lease(starts[lane], lane_interval, n, lane, state.epoch)
    first = min(starts.values())
    ready = [j for j in lanes if starts[j] <= max(at_us, first) + lane_interval]
    if prefer in starts and starts[prefer] <= max(at_us, first) + 4 * lane_interval:
        # A renewal keeps its lane while nobody has booked behind it (its next slot is right after the lease being
        # renewed): no hopping onto another worker's lane, which would push that worker onto a third one.
        lane = prefer
    else:
        # Workers starting together share one view of the lanes: a random free one, not all the same one.
        lane = random.choice(ready)
    start = starts[lane]
    if start > latest:
        return Wait((start - latest) / US)
    return Lease(start, lane_interval, n, lane, state.epoch)


def throttled_state(state: LimitState, at_us: int, retry_after_s: float | None, grace_us: int) -> bool:
    """Apply a 429 to the state: rate halved (at most once per second), a new epoch after Retry-After or the grace.

    Returns whether anything changed (reports within the same second, asking for no later resume, are absorbed).
    """
    halve = at_us - state.changed_at >= US or state.rate >= state.target
    resume_at = at_us + max(grace_us, int((retry_after_s or 0) * US))
    if not halve and resume_at <= state.anchor + US:
        return False
    if halve:
        state.rate = max(state.floor, state.effective_rate(at_us) / 2)
        state.changed_at = at_us
    state.throttled += 1
    state.restart(resume_at, at_us)
    return True


class LimiterBackend(Protocol):
    """What a rate-limiter block provides (DynamoDB, or SQLite for one machine)."""

    def lease(self, key: str, spec: LimitSpec, n: int, *, exclude: Iterable[int] = (), prefer: int | None = None,
              within_s: float | None = None, spread: bool = False) -> Lease | Wait: ...

    def release(self, key: str, lease: Lease, unused: int) -> bool: ...

    def report_throttle(self, key: str, spec: LimitSpec, retry_after_s: float | None) -> LimitState: ...

    def read(self, key: str) -> LimitState | None: ...

    def signal(self, key: str) -> Signal | None: ...

    def set_rate(self, key: str, spec: LimitSpec, per_second: float) -> LimitState: ...

    def set_paused(self, key: str, spec: LimitSpec, paused: bool) -> LimitState: ...


@dataclass
class _Held:
    """A lease this process is spending."""

    lease: Lease
    used: int = 0
    renewed: bool = False

    @property
    def left(self) -> int:
        return self.lease.count - self.used


@dataclass
class _Backoff:
    """When to next look for an extra lane with an old view of the lanes: doubling while every lane is taken, so a
    full limit costs (almost) no calls. Right after any lease the view is fresh, and looking is free."""

    at_us: int = 0
    step_s: float = 4.0

    def failed(self, now: int) -> None:
        self.at_us = now + int(self.step_s * US)
        self.step_s = min(self.step_s * 2, 64.0)

    def succeeded(self) -> None:
        self.step_s = 4.0

    def saturated(self, now: int) -> None:
        self.at_us, self.step_s = now + 64 * US, 64.0


class Leaser:
    """One process's spender for one limit: holds leases on one or more lanes and hands out their slots in time order.

    Thread-safe. ``acquire(n)`` blocks until ``n`` slots are due and returns the seconds it waited. How many lanes it
    holds follows how fast its caller is: it measures the caller's time between tokens and takes another lane while
    it could spend one more without falling behind (its request time within 80 % of its slots' spacing) and one is free.
    """

    PREFETCH = 2  # renew a lease when this many slots are left, so its lane continues without a gap
    FRESH_US = 250_000  # a view of the lanes this recent (from our last lease) is worth acting on
    SIGNAL_RETRY_S = 0.2  # a failed signal read is tried again this soon (then doubling, up to signal_s)
    PAUSE_RECHECK_S = 10.0  # while the signal says paused, ask the backend this often whether the pause holds

    def __init__(self, backend: LimiterBackend, key: str, spec: LimitSpec,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], int] = now_us):
        self.backend, self.key, self.spec = backend, key, spec
        self.sleep, self.clock = sleep, clock
        self.lock = threading.Lock()
        self.held: list[_Held] = []
        self.epoch = -1
        self.next_signal_us = 0
        self.more = _Backoff()
        self.leased_at_us = 0
        self.work_s: float | None = None  # the caller's time between tokens (moving average)
        self.returned_at: float | None = None
        self.granted = 0
        self.expired = 0
        self.waited_s = 0.0
        self.backend_calls = 0
        self.signal_calls = 0
        self.paused_s = 0.0
        self.asked_backend_us = 0  # when we last asked the backend for a lease (it is the truth; the signal a hint)
        seconds = lambda: self.clock() / US  # noqa: E731
        self.signal_log = OutageLog(log, f"reading the signal of rate limit {key!r}", clock=seconds)
        self.report_log = OutageLog(log, f"reporting throttling of rate limit {key!r}", clock=seconds)

    @property
    def signal_errors(self) -> int:
        return self.signal_log.failures

    @property
    def throttle_report_errors(self) -> int:
        return self.report_log.failures

    # --- how many lanes this process can spend -------------------------------------------------------------------
    def wanted_lanes(self) -> int:
        if self.work_s is None:
            return 1
        return max(1, min(self.spec.lane_count, int(self.spec.lane_s * 0.8 / max(self.work_s, 1e-4))))

    def _note_work(self) -> None:
        if self.returned_at is not None:
            sample = min(time.monotonic() - self.returned_at, self.spec.lane_s)
            self.work_s = sample if self.work_s is None else 0.8 * self.work_s + 0.2 * sample

    # --- leases ----------------------------------------------------------------------------------------------------
    def _lease(self, **kw: Any) -> Lease | Wait:
        self.backend_calls += 1
        self.asked_backend_us = self.clock()
        got = self.backend.lease(self.key, self.spec, self.spec.lease_size, **kw)
        if isinstance(got, Lease):
            if got.epoch > self.epoch:
                self.held = [h for h in self.held if h.lease.epoch >= got.epoch]
                self.epoch = got.epoch
            self.held.append(_Held(got))
            self.granted += got.count
            self.leased_at_us = self.clock()
        return got

    def _lanes_held(self, but: _Held | None = None) -> list[int]:
        return [h.lease.lane for h in self.held if h is not but and not h.renewed and h.left > 0]

    def _top_up(self) -> None:
        """Renew leases about to run out; take another lane if the caller could spend it and one is free."""
        now = self.clock()
        for h in list(self.held):
            if not h.renewed and h.left <= self.PREFETCH:
                h.renewed = True
                self._lease(exclude=self._lanes_held(but=h), prefer=h.lease.lane)
        while (len(self._lanes_held()) < self.wanted_lanes() and len(self._lanes_held()) < self.spec.lane_count
               and (now >= self.more.at_us or now - self.leased_at_us < self.FRESH_US)):
            # A lane free within one lane spacing is idle (or about to be): nobody else is spending it.
            got = self._lease(exclude=self._lanes_held(), within_s=self.spec.lane_s, spread=True)
            if isinstance(got, Wait):
                if now - self.leased_at_us < self.FRESH_US:
                    self.more.saturated(now)  # a fresh view says every lane is taken: stop probing with old ones
                else:
                    self.more.failed(now)
                self.leased_at_us = 0  # (the loop ends here either way)
                break
            self.more.succeeded()

    def _check_signal(self) -> None:
        """At most every ``signal_s``: a new epoch voids our leases; a pause holds us here until resumed.

        The signal is a hint, the backend the truth: every lease carries its epoch, and the backend grants leases only
        in its current epoch and never while paused. So a worker that cannot read the signal keeps spending the leases
        it holds — it follows a change at its next lease at the latest, the same bound as for a limit shared with
        another job — and tries the signal again soon; the failure is logged once per outage and counted. A signal
        older than our epoch (a lease told us of a newer one) is stale and ignored, and while the signal says paused
        we ask the backend every ``PAUSE_RECHECK_S``: a resume whose signal could not be published holds no one.
        """
        while self.clock() >= self.next_signal_us:
            self.next_signal_us = self.clock() + int(self.spec.signal_s * US)
            self.signal_calls += 1
            try:
                sig = self.backend.signal(self.key)
            except Exception as exc:
                self.signal_log.failed(exc)
                retry_s = self.SIGNAL_RETRY_S * 2 ** min(self.signal_log.consecutive - 1, 16)
                self.next_signal_us = self.clock() + int(min(self.spec.signal_s, retry_s) * US)
                return
            self.signal_log.succeeded()
            if sig is None or sig.epoch < self.epoch:
                return  # nothing signalled yet, or older news than our last lease brought
            if sig.epoch > self.epoch:
                self.held, self.epoch = [], sig.epoch
                self.more = _Backoff()
            if not sig.paused:
                return
            if self.clock() - self.asked_backend_us >= int(self.PAUSE_RECHECK_S * US):
                return  # a lease asks the backend whether the pause still holds (and waits if it does)
            self.paused_s += self.spec.signal_s
            self.waited_s += self.spec.signal_s
            self.sleep(self.spec.signal_s)

    def _wait_until(self, slot_us: int) -> tuple[float, bool]:
        """Sleep until our slot, checking the signal on the way: a slot can lie a lease span ahead (seconds), and a
        pause, rate change or throttling signalled meanwhile voids it. Returns (seconds slept, whether the slot still
        stands); a voided slot is given up and the caller asks for a new one (after the pause, at the new rate)."""
        epoch, slept = self.epoch, 0.0
        while True:
            now = self.clock()
            if now >= slot_us:
                return slept, True
            step = min(slot_us, max(self.next_signal_us, now)) - now
            if step > 0:
                self.sleep(step / US)
                slept += step / US
            if self.clock() < slot_us:
                self._check_signal()
                if self.epoch != epoch:
                    return slept, False

    def _next_slot(self) -> int:
        """The time of this process's next slot, leasing more when needed."""
        while True:
            self._check_signal()
            self._top_up()
            late_ok = self.clock() - int(max(self.spec.late_s, self.spec.burst / self.spec.per_second) * US)
            best: tuple[int, _Held] | None = None
            for h in self.held:
                lease = h.lease
                # Slots later than `late_ok` have passed unused: skip them, keep the rest of the lease.
                first_usable = max(h.used, -(-(late_ok - lease.start_us) // lease.interval_us))
                if first_usable > h.used:
                    skipped = min(first_usable, lease.count) - h.used
                    self.expired += skipped
                    h.used += skipped
                if h.left > 0:
                    slot = lease.start_us + h.used * lease.interval_us
                    if best is None or slot < best[0]:
                        best = (slot, h)
            self.held = [h for h in self.held if h.left > 0 or not h.renewed]
            if best is not None:
                best[1].used += 1
                return best[0]
            self.held = [h for h in self.held if h.left > 0]
            got = self._lease()
            if isinstance(got, Wait):
                # Spread the retries of workers that were all told to wait: no thundering herd on the backend.
                pause = got.seconds + random.uniform(0, self.spec.signal_s)
                if got.paused:
                    self.paused_s += pause
                    self.next_signal_us = 0
                self.waited_s += pause
                self.sleep(pause)

    def acquire(self, tokens: int = 1, tally: MutableMapping[str, float] | None = None) -> float:
        """Block until ``tokens`` slots are due; return the seconds waited for them. ``tally`` (e.g. a batch's
        metrics) gets what this call cost besides: backend calls, expired slots, time paused, signal errors."""
        with self.lock:
            before = self._counters()
            try:
                self._note_work()
                waited = 0.0
                for i in range(tokens):
                    if i:  # tokens asked for at once: the caller spends them as fast as they come
                        self.work_s = 0.8 * (self.work_s or 0.0)
                    while True:
                        slept, valid = self._wait_until(self._next_slot())
                        waited += slept
                        if valid:
                            break
                self.waited_s += waited
                self.returned_at = time.monotonic()
                return waited
            finally:
                self._tally(before, tally)

    def throttled(self, retry_after_s: float | None, tally: MutableMapping[str, float] | None = None) -> None:
        """The API said 429: slow everyone down (a new epoch); our own leases were booked too fast, drop them."""
        with self.lock:
            before = self._counters()
            self.backend_calls += 1
            try:
                state = self.backend.report_throttle(self.key, self.spec, retry_after_s)
            except Exception as exc:
                # Never hide the API's error behind the limiter's (the caller re-raises the API's): count and log
                # this one, and stop spending our leases; other workers report their 429s, and our next lease
                # follows whatever the backend says.
                self.report_log.failed(exc)
                self.held = []
            else:
                self.report_log.succeeded()
                if state.epoch > self.epoch:
                    self.held, self.epoch = [], state.epoch
            self._tally(before, tally)

    def _counters(self) -> dict[str, float]:
        return {"backend_calls": self.backend_calls, "expired": self.expired, "paused_s": self.paused_s,
                "signal_errors": self.signal_errors, "throttle_report_errors": self.throttle_report_errors}

    def _tally(self, before: dict[str, float], tally: MutableMapping[str, float] | None) -> None:
        """Add what changed since ``before`` (all of it by this call: we hold the lock) to ``tally``."""
        if tally is None:
            return
        for name, value in self._counters().items():
            if value != before[name]:
                tally[name] = round(tally.get(name, 0) + value - before[name], 3)

    def close(self) -> None:
        with self.lock:
            now = self.clock()
            for h in self.held:
                future = min(h.left, max(0, -(-(h.lease.end_us - now) // h.lease.interval_us)))
                if future > 0 and future == h.left:  # the lease's unused tail, nothing skipped before it
                    self.backend_calls += 1
                    if not self.backend.release(self.key, h.lease, future):
                        self.expired += future  # someone booked after us: these slots just pass unused
                elif h.left:
                    self.expired += h.left
            self.held = []

    def metrics(self, name: str) -> dict[str, float]:
        return {f"ratelimit_{name}_granted": self.granted, f"ratelimit_{name}_wait_s": round(self.waited_s, 3),
                f"ratelimit_{name}_backend_calls": self.backend_calls,
                f"ratelimit_{name}_expired": self.expired, f"ratelimit_{name}_paused_s": round(self.paused_s, 3),
                f"ratelimit_{name}_signal_errors": self.signal_errors,
                f"ratelimit_{name}_throttle_report_errors": self.throttle_report_errors}
