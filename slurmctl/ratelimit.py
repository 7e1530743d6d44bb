"""Distributed rate limiting with token leases: the maths and the worker-side spender, independent of the backend.

The shared state of one limit is a GCRA ("generic cell rate algorithm") schedule: ``tat``, the time of the next free
request slot, in integer microseconds. Slots are spaced ``1/rate`` apart; up to ``burst`` of them may lie in the past
(an idle limit can burst). A worker *leases* ``n`` consecutive slots in one conditional write — ``tat += n/rate`` —
and then spends them locally, one request per slot, at the slot's time. So:

* the backend (DynamoDB, or SQLite on one machine) sees one write per lease, not one per request;
* across all workers, requests in any window of ``T`` seconds are at most ``rate * T + burst``: slots are disjoint;
* nothing is ever handed back by a dead worker, and nothing needs to be: a slot is a moment in time, so a dead
  worker's unused slots simply pass (``release`` returns the tail of a lease early when it is still the tail);
* refill needs no background process: it is implied by the clock;
* a 429 halves the shared rate for everyone (not below ``floor``), at most once per second, and pushes ``tat`` past
  any ``Retry-After``; the rate then recovers linearly to its target;
* ``paused`` stops new leases; ``slurmctl rate`` changes the target, effective at the next lease (leases never book
  more than ``horizon_s`` ahead, so within about a second).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

US = 1_000_000


def now_us() -> int:
    return int(time.time() * US)


@dataclass
class LimitSpec:
    """A limit as configured: requests per second, burst, adaptive bounds, lease size."""

    per_second: float
    burst: int = 1
    floor: float | None = None  # lowest rate after throttling (default: per_second / 10)
    ceiling: float | None = None  # highest rate `slurmctl rate` may set (default: per_second * 10)
    lease_size: int = 20
    horizon_s: float = 2.0  # never book slots further ahead than this (bounds how late pause/rate changes apply)
    late_s: float = 0.1  # a slot may still be used this late (a busy worker catching up sends a small burst)
    recovery_s: float = 30.0  # time to climb from floor back to the target after throttling

    @property
    def floor_rate(self) -> float:
        return self.floor if self.floor is not None else self.per_second / 10

    @property
    def ceiling_rate(self) -> float:
        return self.ceiling if self.ceiling is not None else self.per_second * 10


@dataclass
class LimitState:
    """What the backend stores for one limit (one DynamoDB item / one SQLite row)."""

    key: str
    tat: int  # µs
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

    @classmethod
    def new(cls, key: str, spec: LimitSpec, at_us: int) -> "LimitState":
        # tat in the past: a new limit starts idle (its burst is available)
        return cls(key=key, tat=0, target=spec.per_second, rate=spec.per_second, changed_at=at_us,
                   floor=spec.floor_rate, ceiling=spec.ceiling_rate, burst=spec.burst, recovery_s=spec.recovery_s)

    def effective_rate(self, at_us: int) -> float:
        """The rate in force now: the last decreased rate, recovering linearly to the target."""
        if self.rate >= self.target:
            return self.target
        climb = (self.target - self.floor) * max(0, at_us - self.changed_at) / (self.recovery_s * US)
        return min(self.target, self.rate + climb)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lease:
    start_us: int
    interval_us: int
    count: int

    @property
    def end_us(self) -> int:
        return self.start_us + self.interval_us * self.count


@dataclass(frozen=True)
class Wait:
    seconds: float
    paused: bool = False


def plan_lease(state: LimitState, n: int, at_us: int, horizon_s: float) -> tuple[int, Lease | Wait]:
    """Where ``n`` slots would start, and the new ``tat``; or how long to wait (paused, or booked too far ahead)."""
    if state.paused:
        return state.tat, Wait(0.5, paused=True)
    interval = max(1, round(US / state.effective_rate(at_us)))
    start = max(state.tat, at_us - state.burst * interval)
    if start > at_us + horizon_s * US:
        return state.tat, Wait((start - at_us) / US - horizon_s)
    return start + n * interval, Lease(start, interval, n)


def throttled_state(state: LimitState, at_us: int, retry_after_s: float | None) -> LimitState | None:
    """The state after a 429: rate halved (once per second at most), ``tat`` pushed past Retry-After."""
    changed = False
    if at_us - state.changed_at >= US or state.rate >= state.target:
        state.rate = max(state.floor, state.effective_rate(at_us) / 2)
        state.changed_at = at_us
        changed = True
    if retry_after_s:
        resume_at = at_us + int(retry_after_s * US)
        if resume_at > state.tat:
            state.tat = resume_at
            changed = True
    if changed:
        state.throttled += 1
        return state
    return None


class LimiterBackend(Protocol):
    """What a rate-limiter block provides (DynamoDB, or SQLite for one machine)."""

    def lease(self, key: str, spec: LimitSpec, n: int) -> Lease | Wait: ...

    def release(self, key: str, lease: Lease, unused: int) -> bool: ...

    def report_throttle(self, key: str, spec: LimitSpec, retry_after_s: float | None) -> None: ...

    def read(self, key: str) -> LimitState | None: ...

    def set_rate(self, key: str, spec: LimitSpec, per_second: float) -> LimitState: ...

    def set_paused(self, key: str, spec: LimitSpec, paused: bool) -> LimitState: ...


class Leaser:
    """One process's spender for one limit: leases slots from the backend and hands them out, one per request.

    Thread-safe. ``acquire(n)`` blocks until ``n`` slots are due and returns the seconds it waited.
    """

    def __init__(self, backend: LimiterBackend, key: str, spec: LimitSpec,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], int] = now_us):
        self.backend, self.key, self.spec = backend, key, spec
        self.sleep, self.clock = sleep, clock
        self.lock = threading.Lock()
        self.lease: Lease | None = None
        self.used = 0
        self.granted = 0
        self.expired = 0
        self.waited_s = 0.0
        self.backend_calls = 0
        self.paused_s = 0.0

    def _next_slot(self) -> int:
        """The time of this process's next slot, leasing more when the current lease is spent."""
        while True:
            lease = self.lease
            if lease is not None and self.used < lease.count:
                # A slot may be used late by up to `late_s` (or `burst` intervals); slots later than that have
                # passed unused: skip them, keep the rest of the lease.
                late_ok = self.clock() - max(max(1, self.spec.burst) * lease.interval_us, int(self.spec.late_s * US))
                first_usable = max(self.used, -(-(late_ok - lease.start_us) // lease.interval_us))
                if first_usable > self.used:
                    skipped = min(first_usable, lease.count) - self.used
                    self.expired += skipped
                    self.used += skipped
                    continue
                self.used += 1
                return lease.start_us + (self.used - 1) * lease.interval_us
            self.backend_calls += 1
            got = self.backend.lease(self.key, self.spec, self.spec.lease_size)
            if isinstance(got, Wait):
                # Spread the retries of workers that were all told to wait: no thundering herd on the backend.
                pause = got.seconds + random.uniform(0, self.spec.lease_size / self.spec.per_second)
                if got.paused:
                    self.paused_s += pause
                self.waited_s += pause
                self.sleep(pause)
                continue
            self.lease, self.used = got, 0
            self.granted += got.count

    def acquire(self, tokens: int = 1) -> float:
        with self.lock:
            waited = 0.0
            for _ in range(tokens):
                delay = (self._next_slot() - self.clock()) / US
                if delay > 0:
                    self.sleep(delay)
                    waited += delay
            self.waited_s += waited
            return waited

    def throttled(self, retry_after_s: float | None) -> None:
        """The API said 429: slow everyone down, and drop our own booked slots (they were booked too fast)."""
        with self.lock:
            self.backend.report_throttle(self.key, self.spec, retry_after_s)
            self._give_back()

    def close(self) -> None:
        with self.lock:
            self._give_back()

    def _give_back(self) -> None:
        lease = self.lease
        if lease is not None and self.used < lease.count:
            unused = lease.count - self.used
            if not self.backend.release(self.key, lease, unused):
                self.expired += unused  # someone booked after us: these slots just pass unused
            self.used = lease.count

    def metrics(self, name: str) -> dict[str, float]:
        return {f"ratelimit_{name}_granted": self.granted, f"ratelimit_{name}_wait_s": round(self.waited_s, 3),
                f"ratelimit_{name}_backend_calls": self.backend_calls,
                f"ratelimit_{name}_expired": self.expired, f"ratelimit_{name}_paused_s": round(self.paused_s, 3)}
